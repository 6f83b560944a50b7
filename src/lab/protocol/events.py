"""Events that a control-channel session reports to the server shell.

The runner, the report and the progress display all consume these records. They carry no
timestamps: the shell stamps each event as it takes it from the session.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from lab.protocol.commands import AuthInfo


@dataclasses.dataclass(frozen=True)
class CommitDateReported:
    text: str


@dataclasses.dataclass(frozen=True)
class HostInfoReported:
    text: str


@dataclasses.dataclass(frozen=True)
class AgentAuthenticated:
    """The handshake completed: the server sent AuthConfirm."""

    node_id: bytes
    info: AuthInfo
    resumed: bool  # the agent trusted the server's TLS certificate from an earlier session


@dataclasses.dataclass(frozen=True)
class ConnectionClosed:
    """The connection ended; the last event a connection delivers."""

    reason: str


@dataclasses.dataclass(frozen=True)
class AgentHashReported:
    agent_hash: bytes


@dataclasses.dataclass(frozen=True)
class CoreHashReported:
    core_hash: bytes | None


@dataclasses.dataclass(frozen=True)
class UpdateTransferStarted:
    total_bytes: int
    block_size: int
    compressed: bool


@dataclasses.dataclass(frozen=True)
class BlockAcknowledged:
    acknowledged_bytes: int
    total_bytes: int


@dataclasses.dataclass(frozen=True)
class UpdateHashSent:
    """The last block was acknowledged and the final AgentUpdate with the hash was sent."""

    update_hash: bytes


@dataclasses.dataclass(frozen=True)
class CoreInfoReported:
    value: str


@dataclasses.dataclass(frozen=True)
class ConsoleMessage:
    text: str


@dataclasses.dataclass(frozen=True)
class AgentNotice:
    """A user-facing notice from the agent's core, such as a failed self-update."""

    text: str


@dataclasses.dataclass(frozen=True)
class UpdateDownloaded:
    """The recovery core downloaded the update and its hash matched."""


@dataclasses.dataclass(frozen=True)
class JsonReceived:
    value: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ProtocolViolation:
    """The agent sent something that breaks the protocol; the session goes on."""

    description: str


Event = (
    CommitDateReported
    | HostInfoReported
    | AgentAuthenticated
    | AgentHashReported
    | CoreHashReported
    | UpdateTransferStarted
    | BlockAcknowledged
    | UpdateHashSent
    | CoreInfoReported
    | ConsoleMessage
    | AgentNotice
    | UpdateDownloaded
    | JsonReceived
    | ProtocolViolation
    | ConnectionClosed
)
