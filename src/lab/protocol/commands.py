"""Binary control-channel commands: ids, parsed records and builders.

Every integer is big-endian and every command starts with a u16 id. Ids 10 and above carry a
u16 request id at offset 2. Layouts follow MeshAgent meshcore/agentcore.c
(MeshServer_ProcessCommand, MeshServer_SendAgentInfo) and MeshCentral meshagent.js.
A message whose first byte is ``{`` is JSON, whatever the websocket opcode.

This module does no I/O. Parsing raises PeerProtocolError for anything the agent should not
send; building raises LocalProtocolError for values the agent would reject.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import struct
from typing import Any

from lab.errors import LocalProtocolError, PeerProtocolError

HASH_SIZE = 48
NONCE_SIZE = 48

#: Request id that MeshCentral puts on update blocks and expects back in the acks.
UPDATE_BLOCK_REQUEST_ID = 1

#: Largest update block payload: 4 + 65531 bytes fill the agent's 65535-byte reassembly limit.
MAX_BLOCK_SIZE = 65531
MIN_BLOCK_SIZE = 1024


class CommandId(enum.IntEnum):
    AUTH_REQUEST = 1
    AUTH_VERIFY = 2
    AUTH_INFO = 3
    AUTH_CONFIRM = 4
    SERVER_ID = 5
    CORE_MODULE = 10
    CORE_MODULE_HASH = 11
    AGENT_HASH = 12
    AGENT_UPDATE = 13
    AGENT_UPDATE_BLOCK = 14
    AGENT_TAG = 15
    CORE_OK = 16
    COMPRESSED_CORE_MODULE = 20
    AGENT_COMMIT_DATE = 30
    HOST_INFO = 31


class Capability(enum.IntFlag):
    """Capability bits from AuthInfo (MeshAgent meshcore/agentcore.h)."""

    DESKTOP = 0x01
    TERMINAL = 0x02
    FILES = 0x04
    CONSOLE = 0x08
    JAVASCRIPT = 0x10
    TEMPORARY = 0x20
    RECOVERY = 0x40
    RESERVED = 0x80
    COMPRESSION = 0x100


# ---------------------------------------------------------------------------------------------
# Records of what the agent sends. Each is a frozen, noun-named dataclass.


@dataclasses.dataclass(frozen=True)
class AuthRequest:
    certificate_hash: bytes
    nonce: bytes


@dataclasses.dataclass(frozen=True)
class AuthVerify:
    certificate: bytes
    signature: bytes


@dataclasses.dataclass(frozen=True)
class AuthInfo:
    info_version: int
    agent_id: int
    agent_version: int
    platform_type: int
    mesh_id: bytes
    capabilities: Capability
    hostname: str


@dataclasses.dataclass(frozen=True)
class AuthConfirm:
    """From the agent: it already trusts the server's TLS certificate from an earlier session."""


@dataclasses.dataclass(frozen=True)
class ServerIdReport:
    server_id: bytes


@dataclasses.dataclass(frozen=True)
class CoreModuleHashReply:
    request_id: int
    core_hash: bytes | None  # None: no core is loaded


@dataclasses.dataclass(frozen=True)
class AgentHashReply:
    request_id: int
    agent_hash: bytes


@dataclasses.dataclass(frozen=True)
class UpdateBlockAck:
    request_id: int


@dataclasses.dataclass(frozen=True)
class AgentTag:
    tag: bytes


@dataclasses.dataclass(frozen=True)
class AgentCommitDate:
    text: str


@dataclasses.dataclass(frozen=True)
class HostInfo:
    text: str


@dataclasses.dataclass(frozen=True)
class JsonMessage:
    value: dict[str, Any]


AgentMessage = (
    AuthRequest
    | AuthVerify
    | AuthInfo
    | AuthConfirm
    | ServerIdReport
    | CoreModuleHashReply
    | AgentHashReply
    | UpdateBlockAck
    | AgentTag
    | AgentCommitDate
    | HostInfo
    | JsonMessage
)

_AUTH_INFO_HEADER = struct.Struct(">HIIII48sIH")


def _require_length(name: str, data: bytes, expected: int) -> None:
    if len(data) != expected:
        raise PeerProtocolError(f"{name}: expected {expected} bytes, received {len(data)}")


def _parse_json(data: bytes) -> JsonMessage:
    try:
        value = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as error:
        # ValueError covers invalid UTF-8, invalid JSON and integers longer than Python's
        # 4300-digit conversion limit. RecursionError covers deeply nested arrays or objects.
        raise PeerProtocolError(f"invalid JSON message of {len(data)} bytes: {error}") from None
    if not isinstance(value, dict):
        raise PeerProtocolError(f"JSON message is a {type(value).__name__}, expected an object")
    return JsonMessage(value)


def parse_agent_message(data: bytes) -> AgentMessage:
    """Parse one complete websocket message from the agent.

    Raises PeerProtocolError for a message that is truncated, has a wrong length for its
    command, or has an unknown command id.
    """
    if data[:1] == b"{":
        return _parse_json(data)
    if len(data) < 2:
        raise PeerProtocolError(f"message of {len(data)} bytes is too short for a command id")

    (raw_id,) = struct.unpack_from(">H", data)
    try:
        command = CommandId(raw_id)
    except ValueError:
        raise PeerProtocolError(f"unknown command id {raw_id} in a {len(data)}-byte message") from None

    if command >= 10 and command not in (CommandId.AGENT_TAG, CommandId.AGENT_COMMIT_DATE, CommandId.HOST_INFO):
        if len(data) < 4:
            raise PeerProtocolError(f"{command.name}: {len(data)} bytes, shorter than the 4-byte header")
        (request_id,) = struct.unpack_from(">H", data, 2)
    else:
        request_id = 0

    match command:
        case CommandId.AUTH_REQUEST:
            _require_length("AUTH_REQUEST", data, 2 + HASH_SIZE + NONCE_SIZE)
            return AuthRequest(data[2:50], data[50:98])
        case CommandId.AUTH_VERIFY:
            if len(data) < 4:
                raise PeerProtocolError(f"AUTH_VERIFY: {len(data)} bytes, shorter than the 4-byte header")
            (certificate_length,) = struct.unpack_from(">H", data, 2)
            if certificate_length == 0 or len(data) <= 4 + certificate_length:
                raise PeerProtocolError(
                    f"AUTH_VERIFY: certificate length {certificate_length} leaves no signature "
                    f"in {len(data)} bytes"
                )
            return AuthVerify(data[4 : 4 + certificate_length], data[4 + certificate_length :])
        case CommandId.AUTH_INFO:
            if len(data) < _AUTH_INFO_HEADER.size:
                raise PeerProtocolError(f"AUTH_INFO: {len(data)} bytes, expected at least {_AUTH_INFO_HEADER.size}")
            _, info_version, agent_id, agent_version, platform_type, mesh_id, capabilities, hostname_length = (
                _AUTH_INFO_HEADER.unpack_from(data)
            )
            _require_length("AUTH_INFO", data, _AUTH_INFO_HEADER.size + hostname_length)
            hostname = data[_AUTH_INFO_HEADER.size :].decode("utf-8", errors="replace")
            return AuthInfo(
                info_version, agent_id, agent_version, platform_type, mesh_id, Capability(capabilities), hostname
            )
        case CommandId.AUTH_CONFIRM:
            return AuthConfirm()
        case CommandId.SERVER_ID:
            _require_length("SERVER_ID", data, 2 + HASH_SIZE)
            return ServerIdReport(data[2:])
        case CommandId.CORE_MODULE_HASH:
            if len(data) == 4:
                return CoreModuleHashReply(request_id, None)
            _require_length("CORE_MODULE_HASH", data, 4 + HASH_SIZE)
            return CoreModuleHashReply(request_id, data[4:])
        case CommandId.AGENT_HASH:
            _require_length("AGENT_HASH", data, 4 + HASH_SIZE)
            return AgentHashReply(request_id, data[4:])
        case CommandId.AGENT_UPDATE_BLOCK:
            _require_length("AGENT_UPDATE_BLOCK acknowledgement", data, 4)
            return UpdateBlockAck(request_id)
        case CommandId.AGENT_TAG:
            return AgentTag(data[2:].rstrip(b"\0"))
        case CommandId.AGENT_COMMIT_DATE:
            return AgentCommitDate(data[2:].rstrip(b"\0").decode("ascii", errors="replace"))
        case CommandId.HOST_INFO:
            return HostInfo(data[2:].decode("utf-8", errors="replace"))
        case _:
            raise PeerProtocolError(f"{command.name} ({int(command)}) is a server-to-agent command")


# ---------------------------------------------------------------------------------------------
# Builders for what the server sends. Each returns one complete message, sent as one frame.


def _header(command: CommandId, request_id: int = 0) -> bytes:
    if not 0 <= request_id <= 0xFFFF:
        raise LocalProtocolError(f"invalid request id {request_id}: the header has 16 bits for it (0 to 65535)")
    return struct.pack(">HH", command, request_id)


def _require_hash(name: str, value: bytes) -> None:
    if len(value) != HASH_SIZE:
        raise LocalProtocolError(f"{name} must be {HASH_SIZE} bytes, got {len(value)}")


def build_auth_request(certificate_hash: bytes, nonce: bytes) -> bytes:
    _require_hash("certificate hash", certificate_hash)
    if len(nonce) != NONCE_SIZE:
        raise LocalProtocolError(f"nonce must be {NONCE_SIZE} bytes, got {len(nonce)}")
    return struct.pack(">H", CommandId.AUTH_REQUEST) + certificate_hash + nonce


def build_auth_verify(certificate: bytes, signature: bytes) -> bytes:
    if not 0 < len(certificate) <= 0xFFFF:
        raise LocalProtocolError(f"certificate of {len(certificate)} bytes does not fit a u16 length")
    return struct.pack(">HH", CommandId.AUTH_VERIFY, len(certificate)) + certificate + signature


def build_auth_confirm() -> bytes:
    return struct.pack(">H", CommandId.AUTH_CONFIRM)


def build_core_module(payload: bytes, core_hash: bytes, *, compressed_payload: bytes | None = None, request_id: int = 0) -> bytes:
    """Build a CORE_MODULE message, or COMPRESSED_CORE_MODULE when `compressed_payload` is given.

    `core_hash` is the SHA-384 of the uncompressed payload, 4-byte prefix included. A compressed
    payload must be raw DEFLATE (no zlib header), which is what the agent inflates.
    """
    _require_hash("core hash", core_hash)
    if compressed_payload is not None:
        return _header(CommandId.COMPRESSED_CORE_MODULE, request_id) + core_hash + compressed_payload
    return _header(CommandId.CORE_MODULE, request_id) + core_hash + payload


def build_core_module_clear(request_id: int = 0) -> bytes:
    return _header(CommandId.CORE_MODULE, request_id)


def build_core_module_hash_request(request_id: int = 0) -> bytes:
    return _header(CommandId.CORE_MODULE_HASH, request_id)


def build_agent_hash_request(request_id: int = 0) -> bytes:
    return _header(CommandId.AGENT_HASH, request_id)


def build_agent_update_start(request_id: int = 0) -> bytes:
    return _header(CommandId.AGENT_UPDATE, request_id)


def build_agent_update_block(data: bytes, request_id: int = UPDATE_BLOCK_REQUEST_ID) -> bytes:
    """Build one update block. An empty block is legal on the wire but stalls the agent."""
    return _header(CommandId.AGENT_UPDATE_BLOCK, request_id) + data


def build_agent_update_end(file_hash: bytes, request_id: int = 0) -> bytes:
    _require_hash("update hash", file_hash)
    return _header(CommandId.AGENT_UPDATE, request_id) + file_hash


def build_core_ok(request_id: int = 0) -> bytes:
    return _header(CommandId.CORE_OK, request_id)


def build_json(value: dict[str, Any]) -> str:
    """Serialize a JSON command; the server sends it as a text frame."""
    return json.dumps(value, separators=(",", ":"))
