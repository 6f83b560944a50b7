"""Server side of one agent's control channel, as a state machine with no I/O.

Feed each complete websocket message from the agent to `receive_message`; it returns events.
Take the messages to send with `messages_to_send`: bytes go out as one binary frame each and
str as one text frame, and every message must go out unfragmented because the agent
reassembles fragmented messages only up to 65535 bytes.

Handshake rules enforced here (MeshAgent meshcore/agentcore.c, MeshCentral meshagent.js):

* the server replies to the agent's AuthRequest with its own, echoing the agent's TLS hash;
* it sends AuthVerify only when the agent did not open with AuthConfirm, which means the agent
  already trusts the server's TLS certificate;
* AuthRequest, AuthVerify and AuthInfo are each accepted once per connection;
* the server sends AuthConfirm once the agent's signature verified and AuthInfo arrived, and
  only then accepts non-handshake commands.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import io
import os
import zipfile
import zlib
from collections.abc import Callable
from typing import Any

from lab.errors import LocalProtocolError, PeerProtocolError
from lab.protocol import commands
from lab.protocol.auth import sign_server_proof, verify_agent_proof
from lab.protocol.commands import (
    MAX_BLOCK_SIZE,
    MIN_BLOCK_SIZE,
    UPDATE_BLOCK_REQUEST_ID,
    AgentCommitDate,
    AgentHashReply,
    AgentTag,
    AuthConfirm,
    AuthInfo,
    AuthRequest,
    AuthVerify,
    CoreModuleHashReply,
    HostInfo,
    JsonMessage,
    ServerIdReport,
    UpdateBlockAck,
)
from lab.protocol.events import (
    AgentAuthenticated,
    AgentHashReported,
    AgentNotice,
    BlockAcknowledged,
    CommitDateReported,
    ConsoleMessage,
    CoreHashReported,
    CoreInfoReported,
    Event,
    HostInfoReported,
    JsonReceived,
    ProtocolViolation,
    UpdateDownloaded,
    UpdateHashSent,
    UpdateTransferStarted,
)

from cryptography.hazmat.primitives.asymmetric import rsa

Message = bytes | str

# Commands that the agent may send before the handshake completes.
_HANDSHAKE_MESSAGES = (AuthRequest, AuthVerify, AuthInfo, AuthConfirm, ServerIdReport, AgentCommitDate, HostInfo, AgentTag)


@functools.lru_cache(maxsize=4)
def zip_agent_binary(binary: bytes) -> bytes:
    """Pack an agent binary the way MeshCentral does for compressed updates.

    The result is a zip with one deflated entry named ``meshagent``. The agent unzips it only
    after the final hash, which is then the SHA-384 of these zip bytes, has matched. Results
    are cached because an A/B run zips the same two binaries in every cycle.
    """
    buffer = io.BytesIO()
    entry = zipfile.ZipInfo("meshagent", date_time=(2020, 1, 1, 0, 0, 0))
    entry.external_attr = 0o755 << 16
    entry.compress_type = zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(entry, binary, compresslevel=9)
    return buffer.getvalue()


@dataclasses.dataclass
class NativeUpdate:
    """Payload, final hash and pacing of one native update.

    `payload` is sent in blocks and `final_hash` closes the transfer. Normally the payload is
    the new binary and the hash is its agent hash. With `compressed`, the payload is the zip of
    the binary and the hash is the SHA-384 of the zip. Fault injection passes other values on purpose.
    `block_filter` can rewrite each block before it is sent, given its index and data, and
    `before_final_hash` runs once every block is acknowledged, just before the final hash is queued.
    """

    payload: bytes
    final_hash: bytes
    block_size: int = MAX_BLOCK_SIZE
    first_block_size: int | None = None
    compressed: bool = False
    clear_core: bool = True
    block_filter: Callable[[int, bytes], bytes] | None = None
    before_final_hash: Callable[[], None] | None = None

    @classmethod
    def for_binary(
        cls,
        binary: bytes,
        agent_hash: bytes,
        *,
        block_size: int = MAX_BLOCK_SIZE,
        first_block_size: int | None = None,
        compress: bool = False,
        clear_core: bool = True,
    ) -> NativeUpdate:
        if compress:
            archive = zip_agent_binary(binary)
            return cls(archive, hashlib.sha384(archive).digest(), block_size, first_block_size, True, clear_core)
        return cls(binary, agent_hash, block_size, first_block_size, False, clear_core)

    def __post_init__(self) -> None:
        for name, size in (("block size", self.block_size), ("first block size", self.first_block_size)):
            if size is not None and not MIN_BLOCK_SIZE <= size <= MAX_BLOCK_SIZE:
                raise LocalProtocolError(f"{name} {size} is outside {MIN_BLOCK_SIZE}..{MAX_BLOCK_SIZE} bytes")


class TransferState(enum.Enum):
    IDLE = "idle"
    SENDING = "sending"
    HASH_SENT = "hash sent"


class AgentSession:
    """The control channel of one connected agent, from the server's side."""

    def __init__(
        self,
        *,
        tls_hash: bytes,
        server_id: bytes,
        agent_certificate: bytes,
        agent_key: rsa.RSAPrivateKey,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self._tls_hash = tls_hash
        self._server_id = server_id
        self._agent_certificate = agent_certificate
        self._agent_key = agent_key
        self._random_bytes = random_bytes
        self._outgoing: list[Message] = []

        self._agent_trusts_server = False
        self._agent_request: AuthRequest | None = None
        self._server_nonce: bytes | None = None
        self._sent_hash: bytes | None = None
        self.node_id: bytes | None = None
        self.info: AuthInfo | None = None
        self.authenticated = False
        self.protocol_errors = 0

        self._update: NativeUpdate | None = None
        self._update_offset = 0
        self._update_blocks = 0
        self.transfer_state = TransferState.IDLE

    # -- input ---------------------------------------------------------------------------------

    def receive_message(self, data: bytes) -> list[Event]:
        """Process one complete message from the agent and return the events it caused.

        A message that breaks the protocol is counted and reported as a ProtocolViolation
        event; the session stays usable.
        """
        try:
            message = commands.parse_agent_message(data)
            if not self.authenticated and not isinstance(message, (*_HANDSHAKE_MESSAGES, JsonMessage)):
                raise PeerProtocolError(f"{type(message).__name__} received before the handshake completed")
            return self._handle(message)
        except PeerProtocolError as error:
            self.protocol_errors += 1
            return [ProtocolViolation(str(error))]

    def _handle(self, message: commands.AgentMessage) -> list[Event]:
        match message:
            case AgentCommitDate(text=text):
                return [CommitDateReported(text)]
            case HostInfo(text=text):
                return [HostInfoReported(text)]
            case ServerIdReport(server_id=server_id):
                if server_id != self._server_id:
                    raise PeerProtocolError(
                        f"agent expects server id {server_id.hex()[:16]}..., this server is "
                        f"{self._server_id.hex()[:16]}...; its .msh ServerID is stale"
                    )
                return []
            case AuthConfirm():
                if self._agent_request is None:
                    self._agent_trusts_server = True
                return []
            case AuthRequest():
                return self._handle_auth_request(message)
            case AuthVerify():
                return self._handle_auth_verify(message)
            case AuthInfo():
                if self.info is not None:
                    raise PeerProtocolError("AuthInfo received twice on one connection")
                self.info = message
                return self._complete_handshake()
            case AgentTag():
                return []
            case AgentHashReply(agent_hash=agent_hash):
                return [AgentHashReported(agent_hash)]
            case CoreModuleHashReply(core_hash=core_hash):
                return [CoreHashReported(core_hash)]
            case UpdateBlockAck(request_id=request_id):
                return self._handle_block_ack(request_id)
            case JsonMessage(value=value):
                return _json_events(value)
        raise AssertionError(f"unhandled message {message!r}")

    def _handle_auth_request(self, message: AuthRequest) -> list[Event]:
        if self._agent_request is not None:
            raise PeerProtocolError("AuthRequest received twice on one connection")
        self._agent_request = message
        self._server_nonce = self._random_bytes(commands.NONCE_SIZE)
        self._sent_hash = message.certificate_hash
        self._outgoing.append(commands.build_auth_request(self._sent_hash, self._server_nonce))
        if not self._agent_trusts_server:
            signature = sign_server_proof(self._agent_key, self._tls_hash, message.nonce, self._server_nonce)
            self._outgoing.append(commands.build_auth_verify(self._agent_certificate, signature))
        if message.certificate_hash != self._tls_hash:
            raise PeerProtocolError(
                "agent reports a TLS certificate hash that differs from this server's certificate; "
                "something between them presents another certificate"
            )
        return []

    def _handle_auth_verify(self, message: AuthVerify) -> list[Event]:
        if self._agent_request is None or self._server_nonce is None or self._sent_hash is None:
            raise PeerProtocolError("AuthVerify received before AuthRequest")
        if self.node_id is not None:
            raise PeerProtocolError("AuthVerify received twice on one connection")
        self.node_id = verify_agent_proof(
            message.certificate, message.signature, self._sent_hash, self._server_nonce, self._agent_request.nonce
        )
        return self._complete_handshake()

    def _complete_handshake(self) -> list[Event]:
        if self.authenticated or self.node_id is None or self.info is None:
            return []
        self.authenticated = True
        self._outgoing.append(commands.build_auth_confirm())
        return [AgentAuthenticated(self.node_id, self.info, self._agent_trusts_server)]

    def _handle_block_ack(self, request_id: int) -> list[Event]:
        update = self._update
        if self.transfer_state is not TransferState.SENDING or update is None:
            raise PeerProtocolError(f"update block acknowledgement (request id {request_id}) with no transfer running")
        if request_id != UPDATE_BLOCK_REQUEST_ID:
            raise PeerProtocolError(f"update block acknowledgement has request id {request_id}, expected 1")
        events: list[Event] = [BlockAcknowledged(self._update_offset, len(update.payload))]
        if self._update_offset >= len(update.payload):
            if update.before_final_hash is not None:
                update.before_final_hash()
            self._outgoing.append(commands.build_agent_update_end(update.final_hash))
            self.transfer_state = TransferState.HASH_SENT
            events.append(UpdateHashSent(update.final_hash))
        else:
            self._send_next_block()
        return events

    # -- output --------------------------------------------------------------------------------

    def messages_to_send(self) -> list[Message]:
        """Return and clear the messages waiting to be sent, oldest first."""
        outgoing, self._outgoing = self._outgoing, []
        return outgoing

    def _require_authenticated(self, operation: str) -> None:
        if not self.authenticated:
            raise LocalProtocolError(f"cannot {operation} before the handshake completed")

    def request_agent_hash(self) -> None:
        self._require_authenticated("request the agent hash")
        self._outgoing.append(commands.build_agent_hash_request())

    def request_core_hash(self) -> None:
        self._require_authenticated("request the core hash")
        self._outgoing.append(commands.build_core_module_hash_request())

    def clear_core(self) -> None:
        self._require_authenticated("clear the core")
        self._outgoing.append(commands.build_core_module_clear())

    def push_core(self, script: bytes, *, compress: bool = False) -> bytes:
        """Send a JavaScript core with the usual 4 zero bytes in front; return the core hash."""
        self._require_authenticated("push a core")
        payload = bytes(4) + script
        core_hash = hashlib.sha384(payload).digest()
        compressed = None
        if compress:
            deflater = zlib.compressobj(9, zlib.DEFLATED, -15)
            compressed = deflater.compress(payload) + deflater.flush()
        self._outgoing.append(commands.build_core_module(payload, core_hash, compressed_payload=compressed))
        return core_hash

    def send_core_ok(self) -> None:
        self._require_authenticated("send CoreOk")
        self._outgoing.append(commands.build_core_ok())

    def send_json(self, value: dict[str, Any]) -> None:
        self._require_authenticated("send a JSON command")
        self._outgoing.append(commands.build_json(value))

    def start_native_update(self, update: NativeUpdate) -> None:
        """Begin a native update: optionally clear the core, send AgentUpdate, then the first block.

        The first block goes out without waiting for an acknowledgement, as MeshCentral does;
        every later block waits for the acknowledgement of the one before.
        """
        self._require_authenticated("start an update")
        if self.transfer_state is TransferState.SENDING:
            raise LocalProtocolError("an update transfer is already running on this connection")
        self._update = update
        self._update_offset = 0
        self._update_blocks = 0
        self.transfer_state = TransferState.SENDING
        if update.clear_core:
            self._outgoing.append(commands.build_core_module_clear())
        self._outgoing.append(commands.build_agent_update_start())
        self._send_next_block()

    def _send_next_block(self) -> None:
        update = self._update
        assert update is not None
        size = update.block_size
        if self._update_blocks == 0 and update.first_block_size is not None:
            size = update.first_block_size
        block = update.payload[self._update_offset : self._update_offset + size]
        self._update_offset += len(block)
        if update.block_filter is not None:
            block = update.block_filter(self._update_blocks, block)
        self._update_blocks += 1
        self._outgoing.append(commands.build_agent_update_block(block))

    def transfer_started_event(self) -> UpdateTransferStarted:
        update = self._update
        if update is None:
            raise LocalProtocolError("no update transfer was started")
        return UpdateTransferStarted(len(update.payload), update.block_size, update.compressed)


def _json_events(value: dict[str, Any]) -> list[Event]:
    """Translate the JSON messages that the recovery core and the agent send into events."""
    action = value.get("action")
    if action == "coreinfo":
        return [CoreInfoReported(str(value.get("value", "")))]
    if action == "agentupdatedownloaded":
        return [UpdateDownloaded()]
    if action == "msg" and value.get("type") == "console":
        return [ConsoleMessage(str(value.get("value", "")))]
    if action == "sessions" and value.get("type") == "msg" and isinstance(value.get("value"), dict):
        notices: list[Event] = []
        for entry in value["value"].values():
            if isinstance(entry, dict) and "msg" in entry:
                notices.append(AgentNotice(str(entry["msg"])))
        return notices or [JsonReceived(value)]
    return [JsonReceived(value)]
