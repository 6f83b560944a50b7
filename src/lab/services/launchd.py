"""Adapter for launchd on macOS, driven through launchctl."""

from __future__ import annotations

import plistlib
import re

from lab.errors import ServiceManagerError
from lab.services.base import (
    DEFAULT_LOG_LINES,
    NOT_FOUND,
    ServiceManager,
    ServiceStatus,
    parse_ps_listing,
    quote,
)

# launchctl exits 113 and prints 'Could not find service "NAME" in domain for ...' when the
# label is not loaded in the system domain. Both `print` and `list NAME` behave this way.
_NOT_LOADED = "Could not find service"
# macOS before 10.10 has no `launchctl print` and prints this text instead.
_NO_PRINT = "Unrecognized subcommand"

# Lines one tab deep in `launchctl print system/NAME` output; nested blocks are indented further.
_PRINT_STATE = re.compile(r"^\tstate = (.+)$", re.MULTILINE)
_PRINT_PID = re.compile(r"^\tpid = (\d+)$", re.MULTILINE)
# `launchctl list NAME` prints a dictionary with a line such as: "PID" = 1234;
_LIST_PID = re.compile(r'"PID" = (\d+);')


def plist_path(name: str) -> str:
    return f"/Library/LaunchDaemons/{name}.plist"


class Launchd(ServiceManager):
    """launchd: the installer writes /Library/LaunchDaemons/NAME.plist with Label NAME.

    The agent restarts itself after an update with ``launchctl kickstart -k system/NAME``.
    """

    name = "launchd"
    platform_type = 3

    def status(self, name: str) -> ServiceStatus:
        result = self._run(["launchctl", "print", f"system/{name}"], check=False)
        output = result.output
        if _NO_PRINT in output:
            return self._status_from_list(name)
        if _NOT_LOADED in output:
            return ServiceStatus(running=False, pid=None, state=NOT_FOUND, raw=output)
        if not result.ok:
            raise self.unsupported(
                "status",
                f"launchctl print system/{name} exited with status {result.exit_status}: {output.strip()}",
            )

        state_match = _PRINT_STATE.search(output)
        pid_match = _PRINT_PID.search(output)
        state = state_match.group(1).strip() if state_match else "unknown"
        pid = int(pid_match.group(1)) if pid_match else None
        return ServiceStatus(running=state == "running" and pid is not None, pid=pid, state=state, raw=output)

    def _status_from_list(self, name: str) -> ServiceStatus:
        result = self._run(["launchctl", "list", name], check=False)
        output = result.output
        if _NOT_LOADED in output or not result.ok:
            return ServiceStatus(running=False, pid=None, state=NOT_FOUND, raw=output)
        pid_match = _LIST_PID.search(output)
        pid = int(pid_match.group(1)) if pid_match else None
        # `launchctl list` omits the PID key while the job is loaded but not running.
        return ServiceStatus(
            running=pid is not None, pid=pid, state="running" if pid else "not running", raw=output
        )

    # launchctl exits non-zero when an action fails, and target.run raises CommandError then.
    # NOTE: these commands follow launchctl(1) of macOS 10.11 and later; no macOS target has run them yet.

    def start(self, name: str) -> None:
        """Load the plist if launchd does not know the label, then start the job."""
        if not self.status(name).found:
            self._run(["launchctl", "bootstrap", "system", plist_path(name)])
        self._run(["launchctl", "kickstart", f"system/{name}"])

    def stop(self, name: str) -> None:
        """Unload the job, because KeepAlive would start a job stopped by a signal again."""
        self._run(["launchctl", "bootout", f"system/{name}"])

    def restart(self, name: str) -> None:
        self._run(["launchctl", "kickstart", "-k", f"system/{name}"])

    def logs(self, name: str, lines: int = DEFAULT_LOG_LINES) -> str:
        """Return the unified-log lines of the last day from processes named like the agent executable."""
        try:
            process = self.agent_executable(name).rsplit("/", 1)[-1]
        except ServiceManagerError:
            # The plist is missing or unreadable, so the label is the best guess at the process name.
            process = name
        predicate = f'process == "{process}"'
        return self._run(
            f"log show --style syslog --last 1d --predicate {quote(predicate)} | tail -n {int(lines)}"
        ).output

    def service_files(self, name: str) -> list[str]:
        return self._existing([plist_path(name)])

    def agent_executable(self, name: str) -> str:
        path = plist_path(name)
        try:
            data = self.target.get_file(path)
        except FileNotFoundError:
            raise self.unsupported(
                "agent_executable", f"{path} not found on {self.target.name}; is service {name!r} installed?"
            ) from None
        try:
            plist = plistlib.loads(data)
        except (plistlib.InvalidFileException, ValueError) as error:
            raise self.unsupported(
                "agent_executable", f"{path} is not a valid property list: {error}"
            ) from None
        arguments = plist.get("ProgramArguments") if isinstance(plist, dict) else None
        if not arguments:
            raise self.unsupported("agent_executable", f"{path} has no ProgramArguments")
        return str(arguments[0])

    def _process_images(self) -> list[tuple[int, str]]:
        # macOS has no /proc. Its ps prints the full path of each executable in the comm column.
        result = self._run(["ps", "-axww", "-o", "pid=,comm="])
        return parse_ps_listing(result.output)
