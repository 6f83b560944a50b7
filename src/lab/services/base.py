"""The service-manager interface that every init-system adapter implements.

One subclass exists per init system. Each one runs the manager's own commands on a `Target`
and parses their output, and the exit-status meaning of every command is documented where the
command is built. Facts about the files the MeshAgent installer writes come from
modules/service-manager.js in the Ylianst/MeshAgent repository.
"""

from __future__ import annotations

import abc
import dataclasses
import re
import shlex
from typing import ClassVar

from lab.errors import ServiceManagerError
from lab.providers.base import ExecResult, Target

#: `ServiceStatus.state` of a service that the manager does not know.
NOT_FOUND = "not-found"

#: Default number of log lines that `ServiceManager.logs` returns.
DEFAULT_LOG_LINES = 100

# Lists "PID EXECUTABLE" for every process whose /proc/PID/exe link is readable (kernel
# threads have none). The trailing `true` makes the exit status 0 whatever the last readlink did.
_PROC_EXE_LISTING = (
    'for d in /proc/[0-9]*; do e=$(readlink "$d/exe" 2>/dev/null) && echo "${d#/proc/} $e"; done; true'
)

# The kernel appends this to /proc/PID/exe when the file was replaced or removed after the
# process started, which is what the agent's self-update does to the running binary.
_DELETED_SUFFIX = " (deleted)"


@dataclasses.dataclass(frozen=True)
class ServiceStatus:
    """State of one service as its manager reports it."""

    running: bool
    pid: int | None
    #: The manager's own state text, such as ``active (running)`` or ``stop/waiting``, or
    #: `NOT_FOUND` for a service the manager does not know.
    state: str
    #: Output of the command that produced this status, kept for reports.
    raw: str

    @property
    def found(self) -> bool:
        return self.state != NOT_FOUND


class ServiceManager(abc.ABC):
    """Controls and inspects services of one init system on one target."""

    #: Short name used in messages and reports, such as ``systemd``.
    name: ClassVar[str]

    #: The agent's MeshAgent_Posix_PlatformTypes value for this manager (meshcore/agentcore.h),
    #: which the agent logs as ``PLATFORM_TYPE: n``. The value 0 means the agent treats it as unknown.
    platform_type: ClassVar[int]

    def __init__(self, target: Target) -> None:
        self.target = target

    def __repr__(self) -> str:
        return f"{type(self).__name__}(target={self.target.name!r})"

    # Operations every adapter implements.

    @abc.abstractmethod
    def status(self, name: str) -> ServiceStatus:
        """Query the manager for the state of service `name`."""

    @abc.abstractmethod
    def start(self, name: str) -> None:
        """Start service `name`, raising CommandError if the manager reports a failure."""

    @abc.abstractmethod
    def stop(self, name: str) -> None:
        """Stop service `name`, raising CommandError if the manager reports a failure."""

    @abc.abstractmethod
    def restart(self, name: str) -> None:
        """Restart service `name`, raising CommandError if the manager reports a failure."""

    @abc.abstractmethod
    def logs(self, name: str, lines: int = DEFAULT_LOG_LINES) -> str:
        """Return up to the last `lines` log lines that the manager keeps for service `name`."""

    @abc.abstractmethod
    def service_files(self, name: str) -> list[str]:
        """List the service definition files that the MeshAgent installer writes for `name`.

        Only files that exist on the target are listed, so an empty list means the service is
        not installed.
        """

    @abc.abstractmethod
    def agent_executable(self, name: str) -> str:
        """Read the path of the agent executable that service `name` starts from its definition."""

    # Operations with a shared implementation.

    def main_pid(self, name: str) -> int | None:
        """Return the PID that the manager tracks for service `name`, or None if it is not running.

        For managers that supervise the agent through a wrapper (the JavaScript wrapper of the
        init.d script, supervise-daemon, daemon(8)), this is the wrapper's PID and the agent runs
        as its child. `agent_pids` lists the agent processes themselves.
        """
        return self.status(name).pid

    def agent_pids(self, name: str, executable: str | None = None) -> list[int]:
        """List the PIDs of running processes whose executable is the agent installed for `name`.

        `executable` overrides the path read from the service definition. A process whose
        binary was replaced after it started (the kernel marks it ``(deleted)``) still counts,
        because it is an agent that has not been restarted yet.
        """
        path = executable if executable is not None else self.agent_executable(name)
        return sorted(pid for pid, image in self._process_images() if self._image_matches(image, path))

    def disable_restart(self, name: str) -> None:
        """Make the manager unable to start service `name` again, to inject a failed restart."""
        raise self.unsupported("disable_restart", "this manager offers no way to block a restart")

    def restore_restart(self, name: str) -> None:
        """Undo `disable_restart` for service `name`."""
        raise self.unsupported("restore_restart", "this manager offers no way to block a restart")

    # Helpers for subclasses.

    def unsupported(self, operation: str, reason: str) -> ServiceManagerError:
        """Build the error that an adapter raises for an operation it cannot perform."""
        return ServiceManagerError(self.name, operation, reason)

    def _run(self, command: str | list[str], *, check: bool = True) -> ExecResult:
        return self.target.run(command, check=check)

    def _read_text(self, path: str, operation: str, name: str) -> str:
        """Read a text file from the target, raising ServiceManagerError if it is missing."""
        try:
            data = self.target.get_file(path)
        except FileNotFoundError:
            raise self.unsupported(
                operation, f"{path} not found on {self.target.name}; is service {name!r} installed?"
            ) from None
        return data.decode("utf-8", errors="replace")

    def _existing(self, paths: list[str]) -> list[str]:
        return [path for path in paths if self.target.file_exists(path)]

    def _read_pidfile(self, path: str) -> int | None:
        """Return the PID stored in `path`, or None if the file is missing or contains no number."""
        try:
            text = self.target.get_file(path).decode("ascii", errors="replace")
        except FileNotFoundError:
            return None
        return parse_pid(text)

    def _process_images(self) -> list[tuple[int, str]]:
        """List (PID, executable path) for every process, read from /proc/PID/exe."""
        result = self._run(_PROC_EXE_LISTING)
        processes = []
        for line in result.output.splitlines():
            pid_text, _, image = line.strip().partition(" ")
            if pid_text.isdigit() and image:
                processes.append((int(pid_text), image))
        return processes

    @staticmethod
    def _image_matches(image: str, executable: str) -> bool:
        return image.removesuffix(_DELETED_SUFFIX) == executable


def parse_pid(text: str) -> int | None:
    """Return the first line of `text` as a positive PID, or None if it is not one."""
    lines = text.strip().splitlines()
    if not lines:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*", lines[0])
    if match is None:
        return None
    pid = int(match.group(1))
    return pid if pid > 0 else None


def parse_ps_listing(output: str) -> list[tuple[int, str]]:
    """Parse ``ps -o pid=,COLUMN=`` output into (PID, column text) pairs."""
    processes = []
    for line in output.splitlines():
        pid_text, _, text = line.strip().partition(" ")
        if pid_text.isdigit() and text.strip():
            processes.append((int(pid_text), text.strip()))
    return processes


def quote(value: str) -> str:
    """Quote `value` for a POSIX shell."""
    return shlex.quote(value)
