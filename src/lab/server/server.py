"""The simulated MeshCentral server: one TLS listener for the control channel and the downloads.

This is the asyncio shell around `lab.protocol.session.AgentSession`. It accepts TLS
connections, routes ``GET <agent path>`` websocket upgrades to one task per agent, serves
``GET /update/<token>`` downloads for the recovery core from the same certificate, and passes
each authenticated agent connection to the caller waiting for its MeshID.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import errno
import ipaddress
import logging
import socket
import ssl
from collections.abc import Callable
from typing import Any

import h11

from lab.certs import ServerIdentity
from lab.errors import LabError, PeerProtocolError
from lab.protocol import frames
from lab.protocol.events import AgentAuthenticated, ConnectionClosed, Event, ProtocolViolation
from lab.protocol.session import AgentSession

logger = logging.getLogger(__name__)

#: Largest websocket message accepted from an agent. Its largest normal message is AuthVerify
#: (a certificate and a signature, about 1.5 KB); console output from a core is larger but
#: far below this.
DEFAULT_MAX_MESSAGE_SIZE = 1024 * 1024
#: Largest HTTP request head, which ends at the first blank line.
MAX_REQUEST_HEAD = 16 * 1024
#: Connections that break the protocol this many times are closed.
MAX_PROTOCOL_ERRORS = 50
DOWNLOAD_CHUNK_SIZE = 64 * 1024
#: Seconds to wait for a peer to complete the TLS close before dropping the connection.
CLOSE_TIMEOUT = 2.0


@dataclasses.dataclass(frozen=True)
class TimedEvent:
    """An event from one agent connection with the time it was taken from the session."""

    time: float  # seconds on the event loop's monotonic clock
    connection_id: int
    event: Event


@dataclasses.dataclass
class Download:
    """A file that the recovery core downloads from ``/update/<token>``.

    A `status` other than 200 is sent instead of the data, `bytes_per_second` throttles the
    body, and `before_last_chunk` runs just before the last chunk goes out. They exist for fault
    injection.
    """

    data: bytes
    status: int = 200
    bytes_per_second: float | None = None
    on_progress: Callable[[int, int], None] | None = None
    before_last_chunk: Callable[[], None] | None = None
    requests: int = 0


class ServerError(LabError):
    """The lab server could not start."""


class AgentConnection:
    """One websocket connection from an agent, with its session and its event queue."""

    def __init__(self, connection_id: int, session: AgentSession, peer: str) -> None:
        self.id = connection_id
        self.session = session
        self.peer = peer
        self.events: asyncio.Queue[TimedEvent] = asyncio.Queue()
        self.closed = asyncio.Event()
        self.close_reason = ""
        self.unmasked_frames = 0
        self._send: Callable[[], Any] | None = None

    @property
    def mesh_id(self) -> bytes | None:
        info = self.session.info
        return info.mesh_id if info else None

    async def flush(self) -> None:
        """Send every message that the session has queued; a closed connection drops them."""
        if self._send is not None and not self.closed.is_set():
            try:
                await self._send()
            except (ConnectionError, ssl.SSLError) as error:
                logger.debug("connection %d: send failed: %r", self.id, error)

    async def next_event(self, timeout: float) -> TimedEvent:
        """Return the next event, or raise TimeoutError after `timeout` seconds."""
        # asyncio.timeout, unlike wait_for on Python 3.11, never swallows a cancellation
        # (Ctrl-C) that arrives as the awaited item completes.
        async with asyncio.timeout(timeout):
            return await self.events.get()

    async def wait_closed(self, timeout: float) -> bool:
        """Wait until the connection closes; return False if it is still open after `timeout`."""
        try:
            async with asyncio.timeout(timeout):
                await self.closed.wait()
        except TimeoutError:
            return False
        return True


class LabServer:
    """TLS listener that speaks the MeshAgent control channel and serves update downloads."""

    def __init__(
        self,
        identity: ServerIdentity,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        agent_path: str = "/agent.ashx",
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        on_event: Callable[[AgentConnection, TimedEvent], None] | None = None,
    ) -> None:
        if listens_everywhere(host):
            raise ServerError(f"refusing to bind to {host!r}: bind to loopback or the lab network's gateway")
        self.identity = identity
        self.host = host
        self.port = port
        self.agent_path = agent_path
        self.max_message_size = max_message_size
        self.on_event = on_event
        self.downloads: dict[str, Download] = {}
        #: Port of a fault proxy in front of this server; `agent_url` names it instead of `port`.
        self.advertised_port: int | None = None
        #: Port of a proxy in front of this server's downloads; `download_url` names it instead of `port`.
        self.advertised_download_port: int | None = None
        self.protocol_errors = 0
        self.connection_count = 0
        self._server: asyncio.Server | None = None
        self._closing = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._waiting: dict[bytes, asyncio.Queue[AgentConnection]] = collections.defaultdict(asyncio.Queue)
        self._ssl_context = identity.ssl_context()

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(
                self._accept, self.host, self.port, ssl=self._ssl_context, limit=MAX_REQUEST_HEAD
            )
        except OSError as error:
            if error.errno == errno.EADDRNOTAVAIL:
                advice = f"{self.host} is not an address of this machine. Use 127.0.0.1 or the lab network's gateway."
            else:
                advice = "Pick another --port, or stop the program that uses it."
            raise ServerError(f"cannot listen on {self.host}:{self.port}: {error.strerror}. {advice}") from error
        self.port = self._server.sockets[0].getsockname()[1]
        self._closing = False
        logger.info("server listening on %s:%d", self.host, self.port)

    async def close(self) -> None:
        self._closing = True
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        logger.info("server on %s:%d stopped", self.host, self.port)

    async def restart(self, downtime: float) -> None:
        """Stop listening and drop every connection, then listen again on the same port after `downtime` seconds."""
        await self.close()
        self._server = None
        await asyncio.sleep(downtime)
        await self.start()

    async def __aenter__(self) -> LabServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def agent_url(self) -> str:
        """Return the URL that an agent's .msh names: the fault proxy's while one runs."""
        return f"wss://{self.host}:{self.advertised_port or self.port}{self.agent_path}"

    def download_url(self, token: str) -> str:
        return f"https://{self.host}:{self.advertised_download_port or self.port}/update/{token}"

    # -- routing -------------------------------------------------------------------------------

    def pending_connection(self, mesh_id: bytes) -> AgentConnection | None:
        """Return the oldest authenticated connection of this MeshID not yet taken, or None."""
        queue = self._waiting[mesh_id]
        return None if queue.empty() else queue.get_nowait()

    async def next_connection(self, mesh_id: bytes, timeout: float) -> AgentConnection:
        """Return the next authenticated connection of the agent with this MeshID.

        Raises TimeoutError when none arrives within `timeout` seconds.
        """
        async with asyncio.timeout(timeout):
            return await self._waiting[mesh_id].get()

    # -- connections ---------------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        peer = _format_peer(writer.get_extra_info("peername"))
        raw_socket = writer.get_extra_info("socket")
        if raw_socket is not None:
            raw_socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            async with asyncio.timeout(30):
                head = await reader.readuntil(b"\r\n\r\n")
            await self._dispatch(head, reader, writer, peer)
        except asyncio.LimitOverrunError:
            logger.warning("%s: request head longer than %d bytes; closing", peer, MAX_REQUEST_HEAD)
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError, TimeoutError) as error:
            logger.debug("%s: connection ended: %r", peer, error)
        except asyncio.CancelledError:
            # close() cancels the connection tasks it owns; ending quietly keeps asyncio's
            # stream callback from logging the cancellation as an error.
            pass
        finally:
            if self._closing:
                # The agent may never complete the TLS close, so do not wait for it.
                if not writer.transport.is_closing():
                    writer.transport.abort()
            else:
                writer.close()
                try:
                    async with asyncio.timeout(CLOSE_TIMEOUT):
                        await writer.wait_closed()
                except (ConnectionError, ssl.SSLError):
                    pass  # the connection is already gone
                except (TimeoutError, asyncio.CancelledError):
                    # A cancellation here comes from asyncio.run tearing the loop down; ending
                    # quietly keeps the stream callback from logging it as an error.
                    writer.transport.abort()
            self._tasks.discard(task)

    async def _dispatch(
        self, head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str
    ) -> None:
        if len(head) > MAX_REQUEST_HEAD:
            logger.warning("%s: request head of %d bytes exceeds %d; closing", peer, len(head), MAX_REQUEST_HEAD)
            return
        parser = h11.Connection(h11.SERVER)
        parser.receive_data(head)
        try:
            request = parser.next_event()
        except h11.RemoteProtocolError as error:
            logger.warning("%s: invalid HTTP request: %s", peer, error)
            return
        if not isinstance(request, h11.Request):
            logger.warning("%s: incomplete HTTP request head", peer)
            return
        target = request.target.decode("latin-1")
        headers = {name.lower(): value.lower() for name, value in request.headers}
        if target == self.agent_path and b"websocket" in headers.get(b"upgrade", b""):
            await self._serve_agent(request, reader, writer, peer)
        elif request.method == b"GET" and target.startswith("/update/"):
            await self._serve_download(parser, target.removeprefix("/update/"), writer, peer)
        else:
            logger.info("%s: %s %s not found", peer, request.method.decode(), target)
            await _send_http(parser, writer, 404, b"not found\n")

    async def _serve_download(self, parser: h11.Connection, token: str, writer: asyncio.StreamWriter, peer: str) -> None:
        download = self.downloads.get(token)
        if download is None:
            logger.warning("%s: download %r not found", peer, token)
            await _send_http(parser, writer, 404, b"not found\n")
            return
        download.requests += 1
        if download.status != 200:
            logger.info("%s: download %s: responded with HTTP %d as configured", peer, token, download.status)
            await _send_http(parser, writer, download.status, b"error injected by updatelab\n")
            return

        total = len(download.data)
        logger.info("%s: download %s started, %d bytes", peer, token, total)
        # The server closes the connection after one response, and the header says so, so the
        # client does not try to reuse it.
        headers = [
            (b"content-type", b"application/octet-stream"),
            (b"content-length", str(total).encode()),
            (b"connection", b"close"),
        ]
        writer.write(parser.send(h11.Response(status_code=200, headers=headers)))
        sent = 0
        while sent < total:
            chunk = download.data[sent : sent + DOWNLOAD_CHUNK_SIZE]
            if sent + len(chunk) >= total and download.before_last_chunk is not None:
                download.before_last_chunk()
            writer.write(parser.send(h11.Data(data=chunk)))
            await writer.drain()
            sent += len(chunk)
            if download.on_progress is not None:
                download.on_progress(sent, total)
            if download.bytes_per_second:
                await asyncio.sleep(len(chunk) / download.bytes_per_second)
        writer.write(parser.send(h11.EndOfMessage()))
        await writer.drain()
        logger.info("%s: download %s finished", peer, token)

    async def _serve_agent(
        self, request: h11.Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str
    ) -> None:
        client_key = dict(request.headers).get(b"sec-websocket-key", b"").decode("latin-1").strip()
        if not client_key:
            logger.warning("%s: websocket upgrade without Sec-WebSocket-Key; closing", peer)
            return
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            + f"Sec-WebSocket-Accept: {frames.accept_key(client_key)}\r\n\r\n".encode()
        )

        self.connection_count += 1
        connection = AgentConnection(
            self.connection_count,
            AgentSession(
                tls_hash=self.identity.tls_hash,
                server_id=self.identity.server_id,
                agent_certificate=self.identity.certificate_der,
                agent_key=self.identity.key,
            ),
            peer,
        )
        frame_reader = frames.FrameReader(self.max_message_size)
        send_lock = asyncio.Lock()

        async def send_pending() -> None:
            async with send_lock:
                for message in connection.session.messages_to_send():
                    if isinstance(message, str):
                        writer.write(frames.encode_frame(frames.Opcode.TEXT, message.encode()))
                    else:
                        writer.write(frames.encode_frame(frames.Opcode.BINARY, message))
                await writer.drain()

        connection._send = send_pending
        logger.info("connection %d from %s opened", connection.id, peer)
        try:
            await self._read_agent_frames(connection, frame_reader, reader, writer, send_pending)
        except (ConnectionError, ssl.SSLError) as error:
            connection.close_reason = connection.close_reason or f"connection lost: {error!r}"
        finally:
            connection.unmasked_frames = frame_reader.unmasked_frames
            connection.closed.set()
            reason = connection.close_reason or "closed"
            connection.events.put_nowait(TimedEvent(asyncio.get_running_loop().time(), connection.id, ConnectionClosed(reason)))
            logger.info(
                "connection %d from %s closed: %s", connection.id, peer, connection.close_reason or "closed"
            )

    async def _read_agent_frames(
        self,
        connection: AgentConnection,
        frame_reader: frames.FrameReader,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        send_pending: Callable[[], Any],
    ) -> None:
        while True:
            data = await reader.read(65536)
            if not data:
                connection.close_reason = connection.close_reason or "connection lost"
                return
            # Frames that came before a bad one in the same read are handled first, in order.
            framing_error: PeerProtocolError | None = None
            try:
                frame_reader.receive_data(data)
            except PeerProtocolError as error:
                framing_error = error
            connection.unmasked_frames = frame_reader.unmasked_frames

            for frame in frame_reader.events():
                match frame:
                    case frames.DataMessage(data=message):
                        self._deliver(connection, connection.session.receive_message(message))
                        if connection.session.protocol_errors >= MAX_PROTOCOL_ERRORS:
                            connection.close_reason = f"{MAX_PROTOCOL_ERRORS} protocol errors"
                            writer.write(frames.encode_close(1002, "too many protocol errors"))
                            return
                    case frames.PingFrame(payload=payload):
                        writer.write(frames.encode_frame(frames.Opcode.PONG, payload))
                    case frames.PongFrame():
                        pass
                    case frames.CloseFrame(code=code):
                        connection.close_reason = f"agent closed with code {code}"
                        writer.write(frames.encode_close(1000))
                        await writer.drain()
                        return

            if framing_error is not None:
                # The replies to the messages handled above go out before the close frame.
                await send_pending()
                if isinstance(framing_error, frames.MessageTooBig):
                    self._deliver(connection, [ProtocolViolation(str(framing_error))])
                    connection.close_reason = "oversized message"
                    writer.write(frames.encode_close(1009, "message too big"))
                else:
                    self._deliver(connection, [ProtocolViolation(f"invalid websocket framing: {framing_error}")])
                    connection.close_reason = "invalid websocket framing"
                    reason = "invalid payload" if framing_error.close_code == 1007 else "protocol error"
                    writer.write(frames.encode_close(framing_error.close_code, reason))
                await writer.drain()
                return
            await send_pending()

    def _deliver(self, connection: AgentConnection, events: list[Event]) -> None:
        now = asyncio.get_running_loop().time()
        for event in events:
            timed = TimedEvent(now, connection.id, event)
            if isinstance(event, ProtocolViolation):
                self.protocol_errors += 1
                logger.warning("connection %d from %s: protocol error: %s", connection.id, connection.peer, event.description)
            else:
                logger.debug("connection %d: %s", connection.id, event)
            if self.on_event is not None:
                self.on_event(connection, timed)
            connection.events.put_nowait(timed)
            if isinstance(event, AgentAuthenticated):
                self._waiting[event.info.mesh_id].put_nowait(connection)


def listens_everywhere(host: str) -> bool:
    """Return True when binding to `host` would listen on every address, as 0.0.0.0, ::, 0 or "" do."""
    if not host.strip():
        return True
    try:
        addresses = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return False  # the bind itself fails with a clear error
    for *_, address in addresses:
        try:
            if ipaddress.ip_address(address[0].split("%")[0]).is_unspecified:
                return True
        except ValueError:
            continue
    return False


async def _send_http(parser: h11.Connection, writer: asyncio.StreamWriter, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode()), (b"connection", b"close")]
    writer.write(parser.send(h11.Response(status_code=status, headers=headers)))
    writer.write(parser.send(h11.Data(data=body)))
    writer.write(parser.send(h11.EndOfMessage()))
    await writer.drain()


def _format_peer(peername: Any) -> str:
    if isinstance(peername, tuple) and len(peername) >= 2:
        return f"{peername[0]}:{peername[1]}"
    return str(peername)

