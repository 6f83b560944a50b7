"""Exceptions raised by updatelab, grouped by where the failure happened.

LabError
├── ConfigError                 bad input from the user: options, files, scenario files
│   └── AgentFileError          a --binary that is missing or not a MeshAgent executable
├── PrerequisiteError           a tool or service the lab needs is missing (npm, Docker, KVM)
├── AgentPackageError           fetching or reading the meshcentral npm package failed
├── ProtocolError               a message broke the MeshAgent control-channel protocol
│   ├── PeerProtocolError       the agent sent it (malformed, truncated, unknown, oversized)
│   └── LocalProtocolError      the lab tried to send or do something invalid
├── ProviderError               a provider (local, docker, vagrant) failed
│   ├── CommandError            a command on a target exited non-zero
│   ├── ImageBuildError         an image recipe failed to build
│   └── TargetBootError         a target did not come up
└── ServiceManagerError         a service-manager adapter cannot do what was asked

Messages state the facts first (which file, target, command, exit status), then what to do.
"""

from __future__ import annotations


class LabError(Exception):
    """Base class of every error that updatelab raises on purpose."""


class ConfigError(LabError):
    """Invalid user input: a command-line option, a file or a scenario."""


class AgentFileError(ConfigError):
    """A file given as an agent binary is missing or is not a MeshAgent executable."""


class PrerequisiteError(LabError):
    """A program, service or device that the lab needs is not available."""


class AgentPackageError(LabError):
    """Fetching or reading the meshcentral npm package failed."""


class ProtocolError(LabError):
    """A control-channel message that breaks the MeshAgent protocol."""


class PeerProtocolError(ProtocolError):
    """The agent sent a malformed, truncated, unknown or oversized message."""

    #: Websocket close code sent when the error ends the connection (1002: protocol error).
    close_code = 1002


class LocalProtocolError(ProtocolError):
    """The lab attempted an operation that the protocol state does not allow."""


class ProviderError(LabError):
    """A provider failed to create, use or destroy a target."""


class CommandError(ProviderError):
    """A command run on a target exited with a non-zero status.

    The command, the exit status and the tail of its output are kept as attributes and repeated
    in the message.
    """

    def __init__(self, target: str, command: str, exit_status: int, output: str) -> None:
        self.target = target
        self.command = command
        self.exit_status = exit_status
        self.output = output
        tail = "\n".join(output.rstrip().splitlines()[-15:])
        super().__init__(f"{target}: command {command!r} exited with status {exit_status}\n{tail}")


class ImageBuildError(ProviderError):
    """An image recipe failed to build; the message names the failing step and the log tail."""


class TargetBootError(ProviderError):
    """A target container or VM did not reach a usable state."""


class ServiceManagerError(LabError):
    """A service-manager adapter cannot perform the requested operation."""

    def __init__(self, manager: str, operation: str, reason: str) -> None:
        self.manager = manager
        self.operation = operation
        super().__init__(f"{manager}: {operation} failed: {reason}")
