"""A Python double of the MeshAgent side of the control channel, for unit and server tests.

AgentDouble is a state machine with no I/O: `opening_messages` returns what the agent sends
right after the websocket upgrade, and `receive` takes one server message and returns the
replies. It follows the rules of the 2022 agent (MeshAgent meshcore/agentcore.c). Before both
authentication steps complete, it handles only ids 1, 2 and 4. It appends and acknowledges
update blocks, and the final AgentUpdate compares the hash of the appended bytes.

InMemoryLink connects a double to an AgentSession without sockets, and AgentClient runs a
double over TLS and a real websocket against a LabServer on the loopback address.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime
import functools
import hashlib
import io
import json
import os
import ssl
import struct
import zipfile
import zlib
from collections.abc import Callable
from typing import Any

import h11
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from lab.protocol.session import AgentSession

POLICY_GUID = bytes.fromhex("B996015880544A19B7F7E9BE44914C19")
ZIP_MAGIC = b"PK\x03\x04"
COMMIT_DATE = b"2022-Nov-2 23:01:45-0700\0"
HOST_INFO = b"Debian GNU/Linux 12 (bookworm) - x64"
#: Capabilities the 2022 agent always reports: CONSOLE, JAVASCRIPT and COMPRESSION.
DEFAULT_CAPABILITIES = 0x118
#: Largest frame payload that the agent sends. Longer messages go out as continuation frames.
AGENT_FRAME_SIZE = 4096


# ---------------------------------------------------------------------------------------------
# Keys and certificates


@dataclasses.dataclass(frozen=True)
class NodeIdentity:
    """The agent's own RSA-3072 key and its self-signed node certificate."""

    key: rsa.RSAPrivateKey
    certificate_der: bytes

    @property
    def node_id(self) -> bytes:
        return key_hash(self.key.public_key())


def node_identity(index: int = 0) -> NodeIdentity:
    """Return a cached node identity. Distinct indexes give distinct keys."""
    return _cached_node_identity(index)


@functools.cache
def _cached_node_identity(index: int) -> NodeIdentity:
    key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "MeshNodeCertificate")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1000 + index)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .sign(key, hashes.SHA384())
    )
    return NodeIdentity(key, certificate.public_bytes(serialization.Encoding.DER))


def key_hash(public_key: rsa.RSAPublicKey) -> bytes:
    """SHA-384 of the PKCS#1 RSAPublicKey DER, which is how the agent hashes a certificate key."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
    return hashlib.sha384(der).digest()


def file_hash(data: bytes) -> bytes:
    """Hash an update file the way a POSIX agent does: an embedded .msh trailer is left out."""
    if len(data) >= 20 and data[-16:] == POLICY_GUID:
        (length,) = struct.unpack(">I", data[-20:-16])
        if length <= len(data) - 20:
            return hashlib.sha384(data[: len(data) - 20 - length]).digest()
    return hashlib.sha384(data).digest()


# ---------------------------------------------------------------------------------------------
# The agent state machine


@dataclasses.dataclass
class AgentDouble:
    """The agent's side of one control-channel connection.

    `tls_hash` is the SHA-384 of the server certificate as the agent saw it during TLS, and
    `server_id` is the key hash that the agent's .msh ServerID names. With `resumed`, the agent
    already trusts `tls_hash` and opens with AuthConfirm followed by AuthInfo.
    """

    server_id: bytes
    mesh_id: bytes
    tls_hash: bytes = b""
    identity: NodeIdentity = dataclasses.field(default_factory=node_identity)
    resumed: bool = False
    agent_hash: bytes = dataclasses.field(default_factory=lambda: hashlib.sha384(b"agent double").digest())
    hostname: str = "double"
    capabilities: int = DEFAULT_CAPABILITIES
    #: When set, block acknowledgements carry this request id instead of echoing the block's.
    ack_request_id: int | None = None
    nonce: bytes = dataclasses.field(default_factory=lambda: os.urandom(48))

    # State, set as messages arrive.
    server_nonce: bytes | None = dataclasses.field(default=None, init=False)
    sent_auth_info: int = dataclasses.field(default=0, init=False)
    server_verified: bool = dataclasses.field(default=False, init=False)
    confirmed: bool = dataclasses.field(default=False, init=False)
    log: list[str] = dataclasses.field(default_factory=list, init=False)
    update_file: bytearray = dataclasses.field(default_factory=bytearray, init=False)
    update_started: bool = dataclasses.field(default=False, init=False)
    update_blocks: int = dataclasses.field(default=0, init=False)
    #: None until the final AgentUpdate arrives, then whether its hash matched the file.
    update_verified: bool | None = dataclasses.field(default=None, init=False)
    #: The new binary after a verified update, unzipped if it came as a zip. None if unzipping failed.
    installed_binary: bytes | None = dataclasses.field(default=None, init=False)
    stalled: bool = dataclasses.field(default=False, init=False)
    core: bytes | None = dataclasses.field(default=None, init=False)
    core_ok: bool = dataclasses.field(default=False, init=False)
    json_received: list[dict[str, Any]] = dataclasses.field(default_factory=list, init=False)

    @property
    def authenticated(self) -> bool:
        return self.confirmed and (self.server_verified or self.resumed)

    # -- messages the agent sends --------------------------------------------------------------

    def opening_messages(self) -> list[bytes]:
        """Return the messages that the agent sends right after the websocket upgrade."""
        messages = [
            struct.pack(">H", 30) + COMMIT_DATE,
            struct.pack(">H", 31) + HOST_INFO,
            struct.pack(">H", 5) + self.server_id,
        ]
        if self.resumed:
            messages.append(struct.pack(">H", 4))
        messages.append(self.auth_request())
        if self.resumed:
            messages.append(self.auth_info())
        return messages

    def auth_request(self) -> bytes:
        return struct.pack(">H", 1) + self.tls_hash + self.nonce

    def auth_info(self) -> bytes:
        self.sent_auth_info += 1
        hostname = self.hostname.encode()
        header = struct.pack(">HIIII48sIH", 3, 1, 6, 0, 1, self.mesh_id, self.capabilities, len(hostname))
        return header + hostname

    def auth_verify(self, server_hash: bytes, server_nonce: bytes) -> bytes:
        signature = self.identity.key.sign(
            server_hash + server_nonce + self.nonce, padding.PKCS1v15(), hashes.SHA384()
        )
        certificate = self.identity.certificate_der
        return struct.pack(">HH", 2, len(certificate)) + certificate + signature

    # -- messages the agent receives -----------------------------------------------------------

    def receive(self, message: bytes | str) -> list[bytes]:
        """Process one server message and return the agent's replies."""
        if isinstance(message, str):
            message = message.encode()
        if message[:1] == b"{":
            self.json_received.append(_json_object(message))
            return []
        if len(message) < 2:
            self.log.append(f"dropped a {len(message)}-byte message")
            return []
        (command,) = struct.unpack_from(">H", message)
        if command < 10:
            return self._receive_auth(command, message)
        if not self.authenticated:
            self.log.append(f"dropped command {command} before authentication")
            return []
        if len(message) < 4:
            self.log.append(f"dropped command {command}: shorter than 4 bytes")
            return []
        (request_id,) = struct.unpack_from(">H", message, 2)
        return self._receive_command(command, request_id, message)

    def _receive_auth(self, command: int, message: bytes) -> list[bytes]:
        if self.authenticated:
            self.log.append(f"ignored auth command {command} after authentication")
            return []
        if command == 1:
            if len(message) != 98:
                self.log.append("ignored an AuthRequest of the wrong length")
                return []
            server_hash, self.server_nonce = message[2:50], message[50:98]
            if server_hash != self.tls_hash:
                self.log.append("Bad server certificate hash")
                return []
            return [self.auth_verify(server_hash, self.server_nonce)]
        if command == 2:
            return self._receive_server_verify(message)
        if command == 4:
            self.confirmed = True
            if self.server_verified or self.resumed:
                return [struct.pack(">H", 15)]
            return []
        return []

    def _receive_server_verify(self, message: bytes) -> list[bytes]:
        if len(message) <= 8 or self.server_nonce is None:
            self.log.append("ignored an AuthVerify")
            return []
        (length,) = struct.unpack_from(">H", message, 2)
        certificate = x509.load_der_x509_certificate(message[4 : 4 + length])
        signature = message[4 + length :]
        public_key = certificate.public_key()
        assert isinstance(public_key, rsa.RSAPublicKey)
        if key_hash(public_key) != self.server_id:
            self.log.append("Server certificate mismatch")
            return []
        try:
            public_key.verify(
                signature, self.tls_hash + self.nonce + self.server_nonce, padding.PKCS1v15(), hashes.SHA384()
            )
        except InvalidSignature:
            self.log.append("Invalid server signature")
            return []
        self.server_verified = True
        replies = [self.auth_info()]
        if self.confirmed:
            replies.append(struct.pack(">H", 15))
        return replies

    def _receive_command(self, command: int, request_id: int, message: bytes) -> list[bytes]:
        header = struct.pack(">HH", command, request_id)
        match command:
            case 10 | 20:
                return self._receive_core(command, request_id, message)
            case 11:
                if self.core is None:
                    return [header]
                return [header + hashlib.sha384(self.core).digest()]
            case 12:
                return [header + self.agent_hash]
            case 13:
                return self._receive_update(message)
            case 14:
                return self._receive_block(request_id, message[4:])
            case 16:
                self.core_ok = True
                return []
        self.log.append(f"ignored command {command}")
        return []

    def _receive_core(self, command: int, request_id: int, message: bytes) -> list[bytes]:
        reply = struct.pack(">HH", 11, request_id)
        if len(message) == 4:
            self.core = None
            return [reply]
        if len(message) <= 52:
            return []
        expected_hash, payload = message[4:52], message[52:]
        if command == 20:
            try:
                payload = zlib.decompress(payload, -15)
            except zlib.error:
                payload = b""
        if hashlib.sha384(payload).digest() != expected_hash:
            self.core = None
            return [reply]
        self.core = payload
        return [reply + expected_hash]

    def _receive_update(self, message: bytes) -> list[bytes]:
        if len(message) == 4:
            self.update_file = bytearray()
            self.update_started = True
            self.update_blocks = 0
            return []
        if len(message) != 52:
            return []
        self.update_verified = file_hash(bytes(self.update_file)) == message[4:]
        if not self.update_verified:
            self.log.append("Hash FAILED")
            self.update_file = bytearray()
            return []
        data = bytes(self.update_file)
        self.installed_binary = _unzip_single(data) if data[:4] == ZIP_MAGIC and len(data) >= 30 else data
        return []

    def _receive_block(self, request_id: int, data: bytes) -> list[bytes]:
        if not data:
            # The agent counts an empty block as a failed write and sleeps between retries.
            self.stalled = True
            return []
        self.update_file += data
        self.update_blocks += 1
        ack_id = request_id if self.ack_request_id is None else self.ack_request_id
        return [struct.pack(">HH", 14, ack_id)]


def _json_object(message: bytes) -> dict[str, Any]:
    value = json.loads(message)
    assert isinstance(value, dict)
    return value


def _unzip_single(data: bytes) -> bytes | None:
    """Extract the one entry of an update zip, or return None when it is not exactly one."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        entries = archive.infolist()
        if len(entries) != 1:
            return None
        return archive.read(entries[0])


def json_message(value: dict[str, Any]) -> bytes:
    """Encode a JSON command as the agent's core sends it."""
    return json.dumps(value).encode()


# ---------------------------------------------------------------------------------------------
# In-memory link between a double and an AgentSession


@dataclasses.dataclass
class InMemoryLink:
    """Two in-memory endpoints: messages go straight between a double and a session."""

    session: AgentSession
    agent: AgentDouble
    events: list[Any] = dataclasses.field(default_factory=list)
    server_messages: list[bytes | str] = dataclasses.field(default_factory=list)

    def send_to_server(self, messages: list[bytes]) -> list[Any]:
        """Deliver agent messages to the session and return the events they caused."""
        new_events = []
        for message in messages:
            new_events.extend(self.session.receive_message(message))
        self.events.extend(new_events)
        return new_events

    def pump(self, max_rounds: int = 10_000) -> list[Any]:
        """Exchange messages until both sides are quiet, and return the session events of the exchange.

        Raises RuntimeError if the two sides are still talking after `max_rounds` rounds.
        """
        new_events = []
        for _ in range(max_rounds):
            outgoing = self.session.messages_to_send()
            if not outgoing:
                return new_events
            self.server_messages.extend(outgoing)
            for message in outgoing:
                new_events.extend(self.send_to_server(self.agent.receive(message)))
        raise RuntimeError(f"session and agent double still exchanging messages after {max_rounds} rounds")

    def connect(self) -> list[Any]:
        """Send the agent's opening messages, run the handshake and return its events."""
        events = self.send_to_server(self.agent.opening_messages())
        return events + self.pump()


def make_session(server_identity: Any, **kwargs: Any) -> AgentSession:
    """Create an AgentSession for a lab server identity (lab.certs.ServerIdentity)."""
    return AgentSession(
        tls_hash=server_identity.tls_hash,
        server_id=server_identity.server_id,
        agent_certificate=server_identity.certificate_der,
        agent_key=server_identity.key,
        **kwargs,
    )


def make_link(server_identity: Any, **agent_options: Any) -> InMemoryLink:
    """Create a session and a double that trusts the same server identity."""
    options = {"server_id": server_identity.server_id, "mesh_id": os.urandom(48), "tls_hash": server_identity.tls_hash}
    options.update(agent_options)
    return InMemoryLink(make_session(server_identity), AgentDouble(**options))


# ---------------------------------------------------------------------------------------------
# Websocket frames as the agent writes them


def client_frame(
    opcode: int,
    payload: bytes,
    *,
    fin: bool = True,
    mask: bytes | None = b"\x37\xfa\x21\x3d",
    rsv: int = 0,
    length_form: str | None = None,
) -> bytes:
    """Encode one client frame. `mask=None` leaves it unmasked, as the 2021 agent does.

    `length_form` forces the 7-bit, 16-bit or 64-bit length encoding ("7", "16" or "64");
    by default the shortest one is used.
    """
    first = (0x80 if fin else 0) | (rsv & 0x70) | opcode
    mask_bit = 0x80 if mask is not None else 0
    length = len(payload)
    if length_form is not None:
        form = length_form
    elif length < 126:
        form = "7"
    elif length < 1 << 16:
        form = "16"
    else:
        form = "64"
    if form == "7":
        header = struct.pack(">BB", first, mask_bit | length)
    elif form == "16":
        header = struct.pack(">BBH", first, mask_bit | 126, length)
    else:
        header = struct.pack(">BBQ", first, mask_bit | 127, length)
    if mask is None:
        return header + payload
    masked = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
    return header + mask + masked


def agent_frames(message: bytes, *, text: bool = False, mask: bytes | None = b"\x37\xfa\x21\x3d") -> bytes:
    """Encode a message as the agent does: frames of at most 4096 bytes with continuations."""
    chunks = [message[i : i + AGENT_FRAME_SIZE] for i in range(0, len(message), AGENT_FRAME_SIZE)] or [b""]
    encoded = []
    for index, chunk in enumerate(chunks):
        if index > 0:
            opcode = 0x0
        elif text:
            opcode = 0x1
        else:
            opcode = 0x2
        encoded.append(client_frame(opcode, chunk, fin=index == len(chunks) - 1, mask=mask))
    return b"".join(encoded)


# ---------------------------------------------------------------------------------------------
# TLS websocket client


class ClientError(Exception):
    """The server sent the client double a response that it did not expect."""


@dataclasses.dataclass(frozen=True)
class ServerFrame:
    opcode: int
    payload: bytes

    @property
    def close_code(self) -> int | None:
        if self.opcode != 0x8 or len(self.payload) < 2:
            return None
        return struct.unpack(">H", self.payload[:2])[0]


def client_ssl_context() -> ssl.SSLContext:
    # The agent accepts any server certificate at the TLS layer and checks the key hash later.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


async def open_tls(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(host, port, ssl=client_ssl_context(), server_hostname=host)


class AgentClient:
    """An AgentDouble connected to a LabServer over TLS and a websocket.

    Frames are masked unless `masked` is False. Every wait is bounded by a timeout in seconds.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, agent: AgentDouble, masked: bool) -> None:
        self.reader = reader
        self.writer = writer
        self.agent = agent
        self.masked = masked
        self.frames_received: list[ServerFrame] = []

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        agent: AgentDouble,
        *,
        masked: bool = True,
        path: str = "/agent.ashx",
        timeout: float = 10,
    ) -> AgentClient:
        reader, writer = await asyncio.wait_for(open_tls(host, port), timeout)
        ssl_object = writer.get_extra_info("ssl_object")
        agent.tls_hash = hashlib.sha384(ssl_object.getpeercert(binary_form=True)).digest()

        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        if not status_line.startswith("HTTP/1.1 101"):
            raise ClientError(f"expected 101 Switching Protocols, received {status_line!r}")
        headers = dict(line.split(": ", 1) for line in header_lines if line)
        expected = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest())
        if headers.get("Sec-WebSocket-Accept") != expected.decode():
            raise ClientError(f"wrong Sec-WebSocket-Accept {headers.get('Sec-WebSocket-Accept')!r}")
        return cls(reader, writer, agent, masked)

    # -- sending -------------------------------------------------------------------------------

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def send_message(self, message: bytes, *, text: bool = False) -> None:
        mask = os.urandom(4) if self.masked else None
        await self.send_raw(agent_frames(message, text=text, mask=mask))

    async def send_messages(self, messages: list[bytes]) -> None:
        for message in messages:
            await self.send_message(message, text=message[:1] == b"{")

    # -- receiving -----------------------------------------------------------------------------

    async def receive_frame(self, timeout: float) -> ServerFrame:
        """Read one server frame, raising ClientError if it is masked or fragmented."""
        first, second = await asyncio.wait_for(self.reader.readexactly(2), timeout)
        if second & 0x80:
            raise ClientError("the server sent a masked frame")
        length = second & 0x7F
        if length == 126:
            (length,) = struct.unpack(">H", await asyncio.wait_for(self.reader.readexactly(2), timeout))
        elif length == 127:
            (length,) = struct.unpack(">Q", await asyncio.wait_for(self.reader.readexactly(8), timeout))
        payload = await asyncio.wait_for(self.reader.readexactly(length), timeout)
        if not first & 0x80:
            raise ClientError("the server sent a fragmented frame")
        frame = ServerFrame(first & 0x0F, payload)
        self.frames_received.append(frame)
        return frame

    async def serve_until(self, condition: Callable[[], bool], timeout: float = 10, max_frames: int = 10_000) -> None:
        """Pass server messages to the double and send its replies until `condition()` holds.

        Raises TimeoutError after `timeout` seconds and ClientError when the server closes.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for _ in range(max_frames):
            if condition():
                return
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError("condition not reached")
            frame = await self.receive_frame(remaining)
            if frame.opcode == 0x8:
                raise ClientError(f"server closed the connection with code {frame.close_code}")
            if frame.opcode in (0x1, 0x2):
                message: bytes | str = frame.payload.decode() if frame.opcode == 0x1 else frame.payload
                await self.send_messages(self.agent.receive(message))
        raise ClientError(f"condition not reached after {max_frames} frames")

    async def handshake(self, timeout: float = 10) -> None:
        """Send the opening messages and reply to the server until the agent is authenticated."""
        await self.send_messages(self.agent.opening_messages())
        await self.serve_until(lambda: self.agent.authenticated, timeout)

    async def receive_close(self, timeout: float = 10, max_frames: int = 1000) -> ServerFrame:
        """Skip data frames until the server's close frame arrives, and return it."""
        for _ in range(max_frames):
            frame = await self.receive_frame(timeout)
            if frame.opcode == 0x8:
                return frame
        raise ClientError(f"no close frame within {max_frames} frames")

    async def close(self) -> None:
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), 5)
        except (ConnectionError, ssl.SSLError, TimeoutError):
            pass


async def http_get(host: str, port: int, target: str, timeout: float = 10) -> tuple[h11.Response, bytes]:
    """Send one HTTPS GET and return the response head and body, parsed with h11."""
    reader, writer = await asyncio.wait_for(open_tls(host, port), timeout)
    connection = h11.Connection(h11.CLIENT)
    writer.write(connection.send(h11.Request(method="GET", target=target, headers=[("Host", f"{host}:{port}")])))
    writer.write(connection.send(h11.EndOfMessage()))
    await writer.drain()
    response: h11.Response | None = None
    body = bytearray()
    try:
        for _ in range(100_000):
            event = connection.next_event()
            if event is h11.NEED_DATA:
                connection.receive_data(await asyncio.wait_for(reader.read(65536), timeout))
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                break
    finally:
        writer.close()
    if response is None:
        raise ClientError(f"no HTTP response for GET {target}")
    return response, bytes(body)
