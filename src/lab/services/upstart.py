"""Adapter for Upstart, driven through initctl."""

from __future__ import annotations

import re
import shlex

from lab.services.base import DEFAULT_LOG_LINES, NOT_FOUND, ServiceManager, ServiceStatus

# "NAME start/running, process 1234", "NAME stop/waiting" or, for a job with several processes,
# "NAME start/post-start, (post-start) process 1234".
_INITCTL_STATUS = re.compile(
    r"^\S+ (?P<goal>start|stop)/(?P<state>[\w-]+)(?:, (?:\([\w-]+\) )?process (?P<pid>\d+))?", re.MULTILINE
)


def job_file(name: str) -> str:
    return f"/etc/init/{name}.conf"


class Upstart(ServiceManager):
    """Upstart: the installer writes /etc/init/NAME.conf with ``respawn`` and ``exec``."""

    name = "upstart"
    platform_type = 4

    def status(self, name: str) -> ServiceStatus:
        # initctl status exits 0 for a known job, running or not, and exits 1 with
        # "initctl: Unknown job: NAME" for an unknown one.
        result = self._run(["initctl", "status", name], check=False)
        output = result.output
        if "Unknown job" in output:
            return ServiceStatus(running=False, pid=None, state=NOT_FOUND, raw=output)

        match = _INITCTL_STATUS.search(output)
        if match is None:
            return ServiceStatus(
                running=False,
                pid=None,
                state=output.strip() or f"exit status {result.exit_status}",
                raw=output,
            )
        running = match.group("goal") == "start" and match.group("state") == "running"
        pid = int(match.group("pid")) if match.group("pid") else None
        return ServiceStatus(
            running=running, pid=pid, state=f"{match.group('goal')}/{match.group('state')}", raw=output
        )

    # initctl start, stop and restart exit 1 when the job is unknown or already in the requested
    # state ("Job is already running", "Unknown instance"), and target.run raises CommandError.

    def start(self, name: str) -> None:
        self._run(["initctl", "start", name])

    def stop(self, name: str) -> None:
        self._run(["initctl", "stop", name])

    def restart(self, name: str) -> None:
        self._run(["initctl", "restart", name])

    def logs(self, name: str, lines: int = DEFAULT_LOG_LINES) -> str:
        """Return the end of /var/log/upstart/NAME.log, where Upstart keeps a job's console output.

        Raises CommandError if the file is missing, which happens while the job has printed nothing.
        """
        return self._run(["tail", "-n", str(lines), f"/var/log/upstart/{name}.log"]).output

    def service_files(self, name: str) -> list[str]:
        return self._existing([job_file(name)])

    def agent_executable(self, name: str) -> str:
        text = self._read_text(job_file(name), "agent_executable", name)
        for line in text.splitlines():
            if line.startswith("exec "):
                # The installer writes: exec "INSTALL_PATH/TARGET" PARAMETERS
                return shlex.split(line.removeprefix("exec "))[0]
        raise self.unsupported("agent_executable", f"{job_file(name)} has no exec line")
