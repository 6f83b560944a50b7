"""The interface shared by every provider: local host, Docker containers and Vagrant VMs.

A provider turns a target name into a running machine (a `Target`) and removes it again.
The cycle runner only talks to `Target`, so the same deploy, verify and evidence steps run on
every kind of machine.
"""

from __future__ import annotations

import abc
import dataclasses
import re
import shlex
from collections.abc import Sequence

from lab.errors import CommandError


@dataclasses.dataclass(frozen=True)
class ExecResult:
    """Outcome of one command run on a target."""

    command: str
    exit_status: int
    output: str

    @property
    def ok(self) -> bool:
        return self.exit_status == 0


class Target(abc.ABC):
    """One running machine that the lab can run commands on and copy files to and from.

    Subclasses implement `_run`, `put_file` and `get_file`; quoting and error handling live here.
    """

    #: Target name, such as ``debian12-systemd``; used in messages and report rows.
    name: str

    #: Address at which processes inside the target reach the lab server.
    server_address: str

    def run(self, command: str | Sequence[str], *, timeout: float = 120.0, check: bool = True) -> ExecResult:
        """Run a shell command (a string) or an argument vector and return its result.

        Raises CommandError when `check` is true and the command exits non-zero.
        """
        if isinstance(command, str):
            text = command
        else:
            text = shlex.join(command)
        result = self._run(text, timeout=timeout)
        if check and not result.ok:
            raise CommandError(self.name, text, result.exit_status, result.output)
        return result

    @abc.abstractmethod
    def _run(self, command: str, *, timeout: float) -> ExecResult:
        """Run `command` with ``/bin/sh -c`` as root and return stdout and stderr combined."""

    @abc.abstractmethod
    def put_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """Write `data` to the absolute `path` on the target, creating parent folders."""

    @abc.abstractmethod
    def get_file(self, path: str) -> bytes:
        """Read the absolute `path` from the target; raise FileNotFoundError if it is missing."""

    def file_exists(self, path: str) -> bool:
        return self.run(["test", "-e", path], check=False).ok


def check_run_id(run_id: str) -> None:
    """Raise ValueError unless `run_id` can be part of container, network and libvirt names."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", run_id):
        raise ValueError(f"invalid run id {run_id!r}: use letters, digits, '-', '_' and '.'")


class Provider(abc.ABC):
    """Creates and destroys targets of one kind for one lab run."""

    #: Short name used on the command line: ``local``, ``docker`` or ``vagrant``.
    name: str

    @abc.abstractmethod
    def preflight(self) -> None:
        """Raise PrerequisiteError naming what is missing and how to install or start it."""

    @abc.abstractmethod
    def create(self, target_name: str) -> Target:
        """Start the named target and return it once it is ready for commands."""

    @abc.abstractmethod
    def destroy(self, target: Target) -> None:
        """Remove the target. Calling it twice, or after a crash, is harmless."""

    @abc.abstractmethod
    def destroy_all(self) -> None:
        """Remove everything this provider created for the current run."""
