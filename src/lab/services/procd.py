"""Adapter for procd, the init system of OpenWrt, driven through its init scripts and ubus."""

from __future__ import annotations

import json
import re

from lab.services.base import DEFAULT_LOG_LINES, NOT_FOUND, ServiceManager, ServiceStatus, quote

# /etc/init.d/NAME status prints one of these lines (procd.sh _procd_status in OpenWrt) and exits
# 0 for "running", "running (N/M)" and "active with no instances", 3 for "inactive" (procd does
# not know the service), 4 for "unknown instance ..." and 5 for "not running". The shell exits
# 127 with "/etc/init.d/NAME: not found" when the script is missing.
_STATUS_SCRIPT_MISSING = 127

# The installer's init script starts the service with: procd_set_param command /bin/sh "PATH.sh"
_PROCD_COMMAND = re.compile(r'procd_set_param command /bin/sh "([^"]+)"')
# The installer's PATH.sh contains: cd "INSTALL_PATH" and exec "./TARGET" PARAMETERS
_SH_CHDIR = re.compile(r'^cd "([^"]+)"', re.MULTILINE)
_SH_EXEC = re.compile(r'^exec "\./([^"]+)"', re.MULTILINE)


def init_script(name: str) -> str:
    return f"/etc/init.d/{name}"


def default_start_script(name: str) -> str:
    """Return the path of the start script that the installer writes with its default install path."""
    return f"/usr/local/mesh_services/{name}/{name}.sh"


class Procd(ServiceManager):
    """procd: the installer writes /etc/init.d/NAME (USE_PROCD=1) and a start script NAME.sh.

    procd runs ``/bin/sh NAME.sh``, which replaces itself with the agent through ``exec``, so
    the PID that procd reports is the agent's own PID.
    """

    name = "procd"
    platform_type = 7

    def status(self, name: str) -> ServiceStatus:
        result = self._run([init_script(name), "status"], check=False)
        output = result.output
        if result.exit_status == _STATUS_SCRIPT_MISSING:
            return ServiceStatus(running=False, pid=None, state=NOT_FOUND, raw=output)

        state = (
            output.strip().splitlines()[-1].strip() if output.strip() else f"exit status {result.exit_status}"
        )
        running = result.exit_status == 0 and state.startswith("running")
        if not running:
            return ServiceStatus(running=False, pid=None, state=state, raw=output)

        listing, listing_output = self._service_list(name)
        pid = _first_running_pid(listing.get(name, {}))
        return ServiceStatus(running=pid is not None, pid=pid, state=state, raw=output + listing_output)

    def _service_list(self, name: str) -> tuple[dict, str]:
        """Return procd's description of service `name` and the ubus output it was parsed from."""
        # `ubus call service list` exits 0 and prints a JSON object keyed by service name; the
        # object is empty when procd does not know the service. A non-zero exit (ubus or procd
        # not running) raises CommandError.
        result = self._run(["ubus", "call", "service", "list", json.dumps({"name": name})])
        text = result.output.strip()
        if not text:
            return {}, result.output
        try:
            listing = json.loads(text)
        except json.JSONDecodeError as error:
            raise self.unsupported(
                "status",
                f"ubus printed invalid JSON ({error}): {text[:200]!r}. Check that procd and ubusd run on the target.",
            ) from None
        return (listing if isinstance(listing, dict) else {}), result.output

    # rc.common exits with the status of the procd call, non-zero when ubus fails, and
    # target.run raises CommandError then.

    def start(self, name: str) -> None:
        self._run([init_script(name), "start"])

    def stop(self, name: str) -> None:
        self._run([init_script(name), "stop"])

    def restart(self, name: str) -> None:
        self._run([init_script(name), "restart"])

    def logs(self, name: str, lines: int = DEFAULT_LOG_LINES) -> str:
        """Return the lines of the logd ring buffer that mention `name`, read with logread.

        The ring buffer is in memory, so it keeps only recent messages and is empty after a reboot.
        """
        return self._run(f"logread -e {quote(name)} | tail -n {int(lines)}").output

    def service_files(self, name: str) -> list[str]:
        return self._existing([init_script(name), self._start_script(name)])

    def agent_executable(self, name: str) -> str:
        start_script = self._start_script(name)
        text = self._read_text(start_script, "agent_executable", name)
        chdir = _SH_CHDIR.search(text)
        target = _SH_EXEC.search(text)
        if chdir is None or target is None:
            raise self.unsupported(
                "agent_executable",
                f'{start_script} lacks the cd "..." and exec "./..." lines that the installer writes',
            )
        return f"{chdir.group(1).rstrip('/')}/{target.group(1)}"

    def _start_script(self, name: str) -> str:
        """Read the start script path from the init script, falling back to the default install path."""
        try:
            text = self.target.get_file(init_script(name)).decode("utf-8", errors="replace")
        except FileNotFoundError:
            return default_start_script(name)
        match = _PROCD_COMMAND.search(text)
        return match.group(1) if match else default_start_script(name)


def _first_running_pid(service: dict) -> int | None:
    instances = service.get("instances", {}) if isinstance(service, dict) else {}
    for instance in instances.values():
        if isinstance(instance, dict) and instance.get("running") and isinstance(instance.get("pid"), int):
            return instance["pid"]
    return None
