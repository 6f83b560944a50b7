"""Adapter for systemd, driven through systemctl and journalctl."""

from __future__ import annotations

from lab.services.base import DEFAULT_LOG_LINES, NOT_FOUND, ServiceManager, ServiceStatus

# The installer writes the unit to the first of these folders that exists.
_UNIT_FOLDERS = ("/lib/systemd/system", "/usr/lib/systemd/system")

_SHOW_PROPERTIES = "LoadState,ActiveState,SubState,MainPID"


def unit_name(name: str) -> str:
    """Return the unit name for service `name`, adding the ``.service`` suffix if missing."""
    return name if name.endswith(".service") else f"{name}.service"


def parse_show(output: str) -> dict[str, str]:
    """Parse the ``KEY=VALUE`` lines that ``systemctl show`` prints."""
    properties = {}
    for line in output.splitlines():
        key, separator, value = line.partition("=")
        if separator:
            properties[key.strip()] = value.strip()
    return properties


class Systemd(ServiceManager):
    """systemd: the installer writes NAME.service with Restart=on-failure."""

    name = "systemd"
    platform_type = 1

    def status(self, name: str) -> ServiceStatus:
        # `systemctl show` exits 0 for loaded and unknown units alike (LoadState=not-found).
        # A non-zero status means systemctl could not reach systemd, so it raises CommandError.
        result = self._run(["systemctl", "show", f"--property={_SHOW_PROPERTIES}", unit_name(name)])
        properties = parse_show(result.output)
        load_state = properties.get("LoadState", "")
        if load_state == "not-found":
            return ServiceStatus(running=False, pid=None, state=NOT_FOUND, raw=result.output)

        active_state = properties.get("ActiveState", "")
        sub_state = properties.get("SubState", "")
        main_pid = int(properties.get("MainPID", "0") or 0)
        return ServiceStatus(
            running=active_state == "active" and sub_state == "running",
            pid=main_pid if main_pid > 0 else None,
            state=f"{active_state} ({sub_state})",
            raw=result.output,
        )

    # systemctl start, stop and restart exit non-zero (1, or 5 for an unknown unit) on failure,
    # and target.run raises CommandError then.

    def start(self, name: str) -> None:
        self._run(["systemctl", "start", unit_name(name)])

    def stop(self, name: str) -> None:
        self._run(["systemctl", "stop", unit_name(name)])

    def restart(self, name: str) -> None:
        self._run(["systemctl", "restart", unit_name(name)])

    def logs(self, name: str, lines: int = DEFAULT_LOG_LINES) -> str:
        """Return the journal of the unit.

        The installer's unit sets StandardOutput=null, so the journal contains systemd's own
        messages about the unit (starts, stops, exit statuses, restarts), not agent output.
        """
        command = [
            "journalctl",
            "--no-pager",
            "--output=short-iso",
            f"--lines={lines}",
            f"--unit={unit_name(name)}",
        ]
        return self._run(command).output

    def service_files(self, name: str) -> list[str]:
        # On merged-/usr systems /lib is a link to /usr/lib, so both paths name the same file.
        # The installer writes to the first folder that exists, and only that path is listed.
        for folder in _UNIT_FOLDERS:
            path = f"{folder}/{unit_name(name)}"
            if self.target.file_exists(path):
                return [path]
        return []

    def agent_executable(self, name: str) -> str:
        files = self.service_files(name)
        if not files:
            raise self.unsupported(
                "agent_executable", f"no unit file {unit_name(name)} in {' or '.join(_UNIT_FOLDERS)}"
            )
        text = self._read_text(files[0], "agent_executable", name)
        for line in text.splitlines():
            if line.startswith("ExecStart="):
                # The installer escapes spaces in the path as \x20 and separates arguments by spaces.
                command = line.removeprefix("ExecStart=").lstrip("-@:+!")
                return command.split(" ", 1)[0].replace("\\x20", " ")
        raise self.unsupported(
            "agent_executable",
            f"{files[0]} has no ExecStart= line. Reinstall the agent so that the installer rewrites the unit.",
        )

    def disable_restart(self, name: str) -> None:
        """Mask the unit so that systemd refuses every start, including Restart=on-failure."""
        self._run(["systemctl", "mask", unit_name(name)])

    def restore_restart(self, name: str) -> None:
        self._run(["systemctl", "unmask", unit_name(name)])
