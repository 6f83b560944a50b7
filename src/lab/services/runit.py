"""Adapter for runit, driven through sv.

The MeshAgent installer has no runit support: its getServiceType() returns ``unknown`` when
PID 1 is runit, so the agent reports platformType 0 and writes no service files. This adapter
exists so that the lab can detect runit, read service states and report that limit.
"""

from __future__ import annotations

import re

from lab.services.base import DEFAULT_LOG_LINES, NOT_FOUND, ServiceManager, ServiceStatus

_NO_INSTALLER_SUPPORT = "the MeshAgent installer writes no runit service, so there is nothing to read"

# First field of `sv status` output, before any "; log: ..." part: "run: NAME: (pid 123) 8s",
# "down: NAME: 1s, normally up", "finish: NAME: (pid 123) 0s" or "fail: NAME: REASON".
_SV_STATUS = re.compile(r"^(?P<state>run|down|finish|fail|warning): [^:]+: (?P<detail>.*)$")
_SV_PID = re.compile(r"\(pid (\d+)\)")


class Runit(ServiceManager):
    """runit: services are folders under $SVDIR (default /etc/service) supervised by runsv."""

    name = "runit"
    platform_type = 0

    def status(self, name: str) -> ServiceStatus:
        # sv exits with the number of services it could not query, so 0 or 1 here. An unknown
        # service prints "fail: NAME: unable to change to service directory: file does not exist".
        result = self._run(["sv", "status", name], check=False)
        output = result.output
        first_line = output.strip().splitlines()[0] if output.strip() else ""
        service_part = first_line.split(";", 1)[0]
        match = _SV_STATUS.match(service_part)
        if match is None:
            return ServiceStatus(
                running=False, pid=None, state=first_line or f"exit status {result.exit_status}", raw=output
            )

        state = match.group("state")
        detail = match.group("detail")
        if state == "fail" and "unable to change to service directory" in detail:
            return ServiceStatus(running=False, pid=None, state=NOT_FOUND, raw=output)

        pid_match = _SV_PID.search(detail)
        running = state == "run"
        pid = int(pid_match.group(1)) if running and pid_match else None
        return ServiceStatus(
            running=running,
            pid=pid,
            state=f"{state}: {detail}" if state in ("fail", "warning") else state,
            raw=output,
        )

    # sv start, stop and restart print "ok: ..." and exit 0 on success, "fail: ..." or
    # "timeout: ..." and exit 1 on failure, and target.run raises CommandError then.

    def start(self, name: str) -> None:
        self._run(["sv", "start", name])

    def stop(self, name: str) -> None:
        self._run(["sv", "stop", name])

    def restart(self, name: str) -> None:
        self._run(["sv", "restart", name])

    def logs(self, name: str, lines: int = DEFAULT_LOG_LINES) -> str:
        raise self.unsupported("logs", _NO_INSTALLER_SUPPORT)

    def service_files(self, name: str) -> list[str]:
        """Return an empty list, because the installer writes no runit service files."""
        return []

    def agent_executable(self, name: str) -> str:
        raise self.unsupported("agent_executable", _NO_INSTALLER_SUPPORT)
