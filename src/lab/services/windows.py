"""Adapter for the Windows Service Control Manager, driven through sc.exe and PowerShell.

Commands are built as single strings for cmd.exe, the default shell of Windows OpenSSH, because
the POSIX quoting that `Target.run` applies to argument lists does not work there.
"""

from __future__ import annotations

import re

from lab.services.base import DEFAULT_LOG_LINES, NOT_FOUND, ServiceManager, ServiceStatus, parse_ps_listing

# sc.exe exits 0 on success and otherwise with the Win32 error code, such as 1060
# (ERROR_SERVICE_DOES_NOT_EXIST) for an unknown service name.
ERROR_SERVICE_DOES_NOT_EXIST = 1060

# Lines of `sc.exe queryex NAME`: "STATE : 4  RUNNING" and "PID : 1234" (0 while stopped).
_STATE = re.compile(r"^\s*STATE\s*:\s*(\d+)\s+(\w+)", re.MULTILINE)
_PID = re.compile(r"^\s*PID\s*:\s*(\d+)", re.MULTILINE)
# Line of `sc.exe qc NAME`: BINARY_PATH_NAME : "C:\Program Files\Mesh Agent\MeshAgent.exe"
_BINARY_PATH = re.compile(r"^\s*BINARY_PATH_NAME\s*:\s*(.+?)\s*$", re.MULTILINE)

# Service name that the agent uses on Windows when none is configured (meshcore/agentcore.c).
DEFAULT_SERVICE_NAME = "Mesh Agent"


def powershell(script: str) -> str:
    """Return a cmd.exe command line that runs `script` in PowerShell and fails on the first error.

    PowerShell exits 1 when the script ends with an error. The script must not contain double
    quotes, because cmd.exe passes it inside them.
    """
    if '"' in script:
        raise ValueError(f"PowerShell script for cmd.exe must not contain double quotes: {script!r}")
    return f"powershell -NoProfile -NonInteractive -Command \"$ErrorActionPreference = 'Stop'; {script}\""


def powershell_string(value: str) -> str:
    """Quote `value` as a single-quoted PowerShell string."""
    return "'" + value.replace("'", "''") + "'"


class WindowsScm(ServiceManager):
    """Windows services: the installer registers the agent with the Service Control Manager.

    Windows keeps no service definition file, so `service_files` raises ServiceManagerError.
    """

    name = "windows"
    platform_type = 10

    def status(self, name: str) -> ServiceStatus:
        result = self._run(f"sc.exe queryex {self._sc_name(name)}", check=False)
        output = result.output
        if result.exit_status == ERROR_SERVICE_DOES_NOT_EXIST:
            return ServiceStatus(running=False, pid=None, state=NOT_FOUND, raw=output)
        if not result.ok:
            raise self.unsupported(
                "status", f"sc.exe queryex exited with status {result.exit_status}: {output.strip()}"
            )

        state_match = _STATE.search(output)
        pid_match = _PID.search(output)
        state = state_match.group(2) if state_match else "UNKNOWN"
        pid = int(pid_match.group(1)) if pid_match else 0
        return ServiceStatus(
            running=state == "RUNNING", pid=pid if pid > 0 else None, state=state, raw=output
        )

    # Start-Service, Stop-Service and Restart-Service wait until the service reaches the new
    # state, unlike sc.exe start and stop, and PowerShell then exits 1 on failure.

    def start(self, name: str) -> None:
        self._run(powershell(f"Start-Service -Name {powershell_string(name)}"))

    def stop(self, name: str) -> None:
        self._run(powershell(f"Stop-Service -Force -Name {powershell_string(name)}"))

    def restart(self, name: str) -> None:
        self._run(powershell(f"Restart-Service -Force -Name {powershell_string(name)}"))

    def logs(self, name: str, lines: int = DEFAULT_LOG_LINES) -> str:
        """Return recent Service Control Manager events of the System log that mention `name`.

        They record starts, stops and unexpected exits of the service, newest first. The scan
        covers the newest 2000 SCM events.
        """
        pattern = powershell_string(f"*{name}*")
        script = (
            "Get-WinEvent -MaxEvents 2000 -FilterHashtable @{LogName='System'; ProviderName='Service Control Manager'}"
            f" | Where-Object {{ $_.Message -like {pattern} }}"
            f" | Select-Object -First {int(lines)}"
            " | Format-List TimeCreated, Id, Message | Out-String -Width 4096"
        )
        return self._run(powershell(script)).output

    def service_files(self, name: str) -> list[str]:
        raise self.unsupported(
            "service_files",
            rf"the Service Control Manager keeps services in the registry (HKLM\SYSTEM\CurrentControlSet\Services\{name}), not in files",
        )

    def agent_executable(self, name: str) -> str:
        # sc.exe qc exits like sc.exe queryex: 0, or 1060 for an unknown service.
        result = self._run(f"sc.exe qc {self._sc_name(name)}")
        match = _BINARY_PATH.search(result.output)
        if match is None:
            raise self.unsupported(
                "agent_executable", f"sc.exe qc printed no BINARY_PATH_NAME line for {name!r}"
            )
        return _executable_from_command_line(match.group(1))

    def _process_images(self) -> list[tuple[int, str]]:
        script = (
            "Get-CimInstance Win32_Process | ForEach-Object { '{0} {1}' -f $_.ProcessId, $_.ExecutablePath }"
        )
        return parse_ps_listing(self._run(powershell(script)).output)

    @staticmethod
    def _image_matches(image: str, executable: str) -> bool:
        # Windows paths are case-insensitive.
        return image.casefold() == executable.casefold()

    def _sc_name(self, name: str) -> str:
        if '"' in name:
            raise self.unsupported(
                "status", f"service name {name!r} contains a double quote, which cmd.exe cannot pass"
            )
        return f'"{name}"'


def _executable_from_command_line(command_line: str) -> str:
    """Return the executable of a Windows service command line, quoted or not."""
    if command_line.startswith('"'):
        return command_line[1:].split('"', 1)[0]
    match = re.match(r"(.+?\.exe)\b", command_line, re.IGNORECASE)
    return match.group(1) if match else command_line.split(" ", 1)[0]
