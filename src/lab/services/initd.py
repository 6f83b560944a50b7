"""Adapters for /etc/init.d scripts: classic SysV init and OpenRC.

The MeshAgent installer treats both as its ``init`` platform (platformType 2). It writes an
OpenRC script when /sbin/openrc-run exists and its own shell script otherwise.
"""

from __future__ import annotations

import re

from lab.services.base import DEFAULT_LOG_LINES, NOT_FOUND, ServiceManager, ServiceStatus, quote

# `disable_restart` moves init scripts here, outside /etc/init.d, so that no tool finds them.
DISABLED_SCRIPTS_FOLDER = "/var/tmp/updatelab-disabled"

# Status lines of the installer's SysV script: "NAME start/running, process PID" when the PID in
# /var/run/NAME.pid is alive, "NAME stop/waiting" otherwise. The script exits 0 in both cases.
_SCRIPT_STATUS = re.compile(
    r"^\S+ (?P<goal>start|stop)/(?P<state>[\w-]+)(?:, process (?P<pid>\d+))?\s*$", re.MULTILINE
)

# OpenRC prints " * status: STATE" and exits with a code that also encodes the state
# (OpenRC sh/supervise-daemon.sh supervise_status and its openrc-run.sh equivalent).
_OPENRC_STATUS = re.compile(r"status: (?P<state>[\w-]+)")
_OPENRC_EXIT_STATES = {
    0: "started",
    3: "stopped",
    4: "stopping",
    8: "starting",
    16: "inactive",
    32: "crashed",
    64: "unsupervised",
}


def init_script(name: str) -> str:
    return f"/etc/init.d/{name}"


def pidfile(name: str) -> str:
    return f"/var/run/{name}.pid"


class SysVinit(ServiceManager):
    """SysV init with the installer's /etc/init.d script, driven through ``service``.

    The script starts ``meshagent -b64exec ...``, a JavaScript wrapper that runs the real agent
    as its child and starts it again when it exits, and stores the wrapper's PID in
    /var/run/NAME.pid. Its output goes to /var/log/NAME.log.
    """

    name = "sysvinit"
    platform_type = 2

    def status(self, name: str) -> ServiceStatus:
        # `service` prints "NAME: unrecognized service" and exits 1 when /etc/init.d/NAME is
        # missing. Otherwise it returns the script's status: the installer's script always exits
        # 0, and other scripts follow LSB (0 running, 1 to 3 not running, 4 unknown).
        result = self._run(["service", name, "status"], check=False)
        output = result.output
        if "unrecognized service" in output:
            return ServiceStatus(running=False, pid=None, state=NOT_FOUND, raw=output)

        match = _SCRIPT_STATUS.search(output)
        if match is not None:
            running = match.group("goal") == "start" and match.group("state") == "running"
            pid = int(match.group("pid")) if match.group("pid") else None
            if running and pid is None:
                pid = self._read_pidfile(pidfile(name))
            return ServiceStatus(
                running=running, pid=pid, state=f"{match.group('goal')}/{match.group('state')}", raw=output
            )

        running = result.exit_status == 0
        pid = self._read_pidfile(pidfile(name)) if running else None
        return ServiceStatus(
            running=running, pid=pid, state=_last_line(output, result.exit_status), raw=output
        )

    # The installer's script exits 0 even when start or stop fails, so only a missing script
    # (exit 1, "unrecognized service") raises CommandError here.

    def start(self, name: str) -> None:
        self._run(["service", name, "start"])

    def stop(self, name: str) -> None:
        self._run(["service", name, "stop"])

    def restart(self, name: str) -> None:
        self._run(["service", name, "restart"])

    def logs(self, name: str, lines: int = DEFAULT_LOG_LINES) -> str:
        """Return the end of /var/log/NAME.log, where the init script sends the wrapper's output.

        The wrapper discards the agent's own output, so the file is often empty. Raises
        CommandError if the file is missing.
        """
        return self._run(["tail", "-n", str(lines), f"/var/log/{name}.log"]).output

    def service_files(self, name: str) -> list[str]:
        return self._existing([init_script(name)])

    def agent_executable(self, name: str) -> str:
        text = self._read_text(init_script(name), "agent_executable", name)
        match = re.search(r"^SCRIPT=(.+)$", text, re.MULTILINE)
        if match is None:
            raise self.unsupported(
                "agent_executable",
                f"{init_script(name)} has no SCRIPT= line; it was not written by the MeshAgent installer",
            )
        return match.group(1).strip()

    def disable_restart(self, name: str) -> None:
        """Move /etc/init.d/NAME away so that ``service NAME restart`` fails."""
        source = init_script(name)
        if not self.target.file_exists(source):
            raise self.unsupported("disable_restart", f"{source} not found on {self.target.name}")
        self._run(f"mkdir -p {DISABLED_SCRIPTS_FOLDER} && mv {quote(source)} {quote(_disabled_path(name))}")

    def restore_restart(self, name: str) -> None:
        """Move the init script that `disable_restart` moved away back to /etc/init.d."""
        saved = _disabled_path(name)
        if not self.target.file_exists(saved):
            raise self.unsupported(
                "restore_restart", f"{saved} not found on {self.target.name}; was disable_restart called?"
            )
        self._run(["mv", saved, init_script(name)])


class OpenRC(SysVinit):
    """OpenRC, driven through rc-service.

    The installer's script sets supervisor=supervise-daemon unless crash restart is turned off.
    supervise-daemon then writes its own PID to /var/run/NAME.pid and runs the agent as its
    child, so `main_pid` returns the supervisor's PID. Without a supervisor the file contains
    the agent's PID.
    """

    name = "openrc"
    platform_type = 2

    def status(self, name: str) -> ServiceStatus:
        # rc-service prints " * rc-service: service `NAME' does not exist" and exits 1 for an
        # unknown service. For a known one the exit status encodes the state (_OPENRC_EXIT_STATES).
        result = self._run(["rc-service", name, "status"], check=False)
        output = result.output
        if "does not exist" in output:
            return ServiceStatus(running=False, pid=None, state=NOT_FOUND, raw=output)

        match = _OPENRC_STATUS.search(output)
        if match is not None:
            state = match.group("state")
        else:
            state = _OPENRC_EXIT_STATES.get(result.exit_status, _last_line(output, result.exit_status))
        running = state == "started"
        pid = self._read_pidfile(pidfile(name)) if running else None
        return ServiceStatus(running=running, pid=pid, state=state, raw=output)

    # rc-service exits non-zero when the action fails, and target.run raises CommandError then.

    def start(self, name: str) -> None:
        self._run(["rc-service", name, "start"])

    def stop(self, name: str) -> None:
        self._run(["rc-service", name, "stop"])

    def restart(self, name: str) -> None:
        self._run(["rc-service", name, "restart"])

    def logs(self, name: str, lines: int = DEFAULT_LOG_LINES) -> str:
        """Return the syslog lines that mention `name` from /var/log/messages.

        supervise-daemon reports starts, exits and respawns to syslog, and the agent's own
        output is not kept. Raises CommandError if /var/log/messages is missing, which happens
        when no syslog daemon runs on the target.
        """
        command = (
            f"grep -F -- {quote(name)} /var/log/messages | tail -n {int(lines)}; test -e /var/log/messages"
        )
        return self._run(command).output

    def agent_executable(self, name: str) -> str:
        text = self._read_text(init_script(name), "agent_executable", name)
        match = re.search(r'^command="([^"]+)"', text, re.MULTILINE)
        if match is None:
            raise self.unsupported("agent_executable", f'{init_script(name)} has no command="..." line')
        return match.group(1)

    def disable_restart(self, name: str) -> None:
        """Move /etc/init.d/NAME away so that ``rc-service`` and ``service`` cannot restart it.

        supervise-daemon keeps running and still respawns an agent that crashes, because it
        does not read the script again.
        """
        super().disable_restart(name)


def _disabled_path(name: str) -> str:
    return f"{DISABLED_SCRIPTS_FOLDER}/{name}"


def _last_line(output: str, exit_status: int) -> str:
    lines = output.strip().splitlines()
    return lines[-1].strip() if lines else f"exit status {exit_status}"
