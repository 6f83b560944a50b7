"""Adapter for FreeBSD rc.d scripts, driven through service(8)."""

from __future__ import annotations

import re

from lab.services.base import DEFAULT_LOG_LINES, NOT_FOUND, ServiceManager, ServiceStatus, parse_ps_listing

# rc.subr prints "NAME is running as pid 1234." and exits 0, or "NAME is not running." and
# exits 1. service(8) prints "NAME does not exist in /etc/rc.d or the local startup
# directories (/usr/local/etc/rc.d), or is not executable." and exits 1 for an unknown script.
_RUNNING = re.compile(r"is running as pid (\d+)")
_UNKNOWN = "does not exist in /etc/rc.d"

# The installer's rc script contains: command_args="-P ${pidfile} -r -f \"PATH\" PARAMETERS"
_DAEMON_TARGET = re.compile(r'-f \\"([^"\\]+)\\"')


def rc_script(name: str) -> str:
    return f"/usr/local/etc/rc.d/{name}"


class FreeBSD(ServiceManager):
    """FreeBSD rc.d: the installer writes /usr/local/etc/rc.d/NAME that runs daemon(8).

    daemon(8) supervises the agent, restarts it when it exits (``-r``) and writes its own PID to
    /var/run/NAME.pid (``-P``), so `main_pid` returns the supervisor's PID. The ``one`` variants
    of the rc commands are used, as the agent itself does, so that they work whether or not
    NAME_enable is set in rc.conf.
    """

    name = "freebsd"
    platform_type = 5

    def status(self, name: str) -> ServiceStatus:
        result = self._run(["service", name, "onestatus"], check=False)
        output = result.output
        if _UNKNOWN in output:
            return ServiceStatus(running=False, pid=None, state=NOT_FOUND, raw=output)
        match = _RUNNING.search(output)
        if result.ok and match is not None:
            return ServiceStatus(running=True, pid=int(match.group(1)), state="running", raw=output)
        return ServiceStatus(running=False, pid=None, state="not running", raw=output)

    # rc.subr exits 1 when an action fails, and target.run raises CommandError then.

    def start(self, name: str) -> None:
        self._run(["service", name, "onestart"])

    def stop(self, name: str) -> None:
        self._run(["service", name, "onestop"])

    def restart(self, name: str) -> None:
        self._run(["service", name, "onerestart"])

    def logs(self, name: str, lines: int = DEFAULT_LOG_LINES) -> str:
        """Return the end of /var/log/messages.

        daemon(8) runs the agent with ``-f``, which sends its output to /dev/null, so syslog
        contains only the messages of the system and of daemon itself.
        """
        return self._run(["tail", "-n", str(lines), "/var/log/messages"]).output

    def service_files(self, name: str) -> list[str]:
        # On pfSense the installer also copies the script to NAME.sh, which pfSense needs to start it at boot.
        return self._existing([rc_script(name), f"{rc_script(name)}.sh"])

    def agent_executable(self, name: str) -> str:
        text = self._read_text(rc_script(name), "agent_executable", name)
        match = _DAEMON_TARGET.search(text)
        if match is None:
            raise self.unsupported(
                "agent_executable", f'{rc_script(name)} has no -f \\"PATH\\" in command_args'
            )
        return match.group(1)

    def _process_images(self) -> list[tuple[int, str]]:
        # FreeBSD mounts no /proc by default. daemon(8) starts the agent with its full path as
        # argv[0], so the first word of args is the executable path.
        # NOTE: a path that contains spaces is cut at the first space and never matches.
        result = self._run(["ps", "-axww", "-o", "pid=,args="])
        return [(pid, args.split(" ", 1)[0]) for pid, args in parse_ps_listing(result.output)]
