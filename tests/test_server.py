"""Tests of lab.server.LabServer on 127.0.0.1 with the TLS websocket client double.

Every test that misbehaves on one connection also keeps a well-behaved client connected at
the same time and checks that the server still serves it. Its handshake must complete and an
agent-hash request must get a reply.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable

import pytest

from agent_double import AgentClient, AgentDouble, agent_frames, client_frame, http_get, node_identity, open_tls
from lab.certs import generate_identity
from lab.protocol.events import AgentAuthenticated, AgentHashReported, ConsoleMessage, ProtocolViolation
from lab.server.server import AgentConnection, Download, LabServer, ServerError

HOST = "127.0.0.1"
TIMEOUT = 10


@pytest.fixture(scope="module")
def identity():
    return generate_identity([HOST])


def run(coroutine: Awaitable[None], timeout: float = 60) -> None:
    asyncio.run(asyncio.wait_for(coroutine, timeout))


def new_agent(identity, index: int = 0, **options) -> AgentDouble:
    return AgentDouble(server_id=identity.server_id, mesh_id=os.urandom(48), identity=node_identity(index), **options)


async def next_event_of(connection: AgentConnection, kind: type, timeout: float = TIMEOUT, max_events: int = 1000):
    """Return the next event of `kind` from the connection, skipping others."""
    for _ in range(max_events):
        timed = await connection.next_event(timeout)
        if isinstance(timed.event, kind):
            return timed.event
    raise AssertionError(f"no {kind.__name__} within {max_events} events")


async def check_served(server: LabServer, client: AgentClient) -> None:
    """Complete the client's handshake and check that an agent-hash request gets a reply."""
    await client.serve_until(lambda: client.agent.authenticated, TIMEOUT)
    connection = await server.next_connection(client.agent.mesh_id, TIMEOUT)
    connection.session.request_agent_hash()
    await connection.flush()
    await client.serve_until(lambda: any(f.payload[:2] == b"\x00\x0c" for f in client.frames_received), TIMEOUT)
    event = await next_event_of(connection, AgentHashReported)
    assert event.agent_hash == client.agent.agent_hash


async def with_bystander(identity, action: Callable[[LabServer], Awaitable[None]], **server_options) -> LabServer:
    """Run `action` while a second, well-behaved client is connected, then check it is served."""
    async with LabServer(identity, HOST, 0, **server_options) as server:
        bystander = await AgentClient.connect(HOST, server.port, new_agent(identity, 1))
        await bystander.send_messages(bystander.agent.opening_messages())
        await action(server)
        await check_served(server, bystander)
        await bystander.close()
    return server


async def wait_for_errors(server: LabServer, count: int, timeout: float = TIMEOUT) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while server.protocol_errors < count and loop.time() < deadline:
        await asyncio.sleep(0.01)


# -- handshake -----------------------------------------------------------------------------------


def test_full_handshake(identity):
    async def scenario():
        async with LabServer(identity, HOST, 0) as server:
            client = await AgentClient.connect(HOST, server.port, new_agent(identity))
            await client.handshake(TIMEOUT)
            connection = await server.next_connection(client.agent.mesh_id, TIMEOUT)
            event = await next_event_of(connection, AgentAuthenticated)
            assert event.node_id == node_identity().node_id
            assert event.resumed is False
            assert client.agent.server_verified
            assert server.protocol_errors == 0
            await client.close()

    run(scenario())


def test_handshake_tls_hash_is_server_certificate(identity):
    async def scenario():
        async with LabServer(identity, HOST, 0) as server:
            client = await AgentClient.connect(HOST, server.port, new_agent(identity))
            assert client.agent.tls_hash == identity.tls_hash
            await client.close()

    run(scenario())


def test_resumed_handshake(identity):
    async def scenario():
        async with LabServer(identity, HOST, 0) as server:
            client = await AgentClient.connect(HOST, server.port, new_agent(identity, resumed=True))
            await client.handshake(TIMEOUT)
            assert [f.payload[:2] for f in client.frames_received] == [b"\x00\x01", b"\x00\x04"]
            connection = await server.next_connection(client.agent.mesh_id, TIMEOUT)
            assert (await next_event_of(connection, AgentAuthenticated)).resumed is True
            await client.close()

    run(scenario())


def test_unmasked_client(identity):
    async def scenario():
        async with LabServer(identity, HOST, 0) as server:
            client = await AgentClient.connect(HOST, server.port, new_agent(identity), masked=False)
            await client.handshake(TIMEOUT)
            connection = await server.next_connection(client.agent.mesh_id, TIMEOUT)
            await check_served_connection(connection, client)
            await client.close()
            assert await connection.wait_closed(TIMEOUT)
            assert connection.unmasked_frames >= 6

    async def check_served_connection(connection, client):
        connection.session.request_agent_hash()
        await connection.flush()
        await client.serve_until(lambda: any(f.payload[:2] == b"\x00\x0c" for f in client.frames_received), TIMEOUT)
        assert (await next_event_of(connection, AgentHashReported)).agent_hash == client.agent.agent_hash

    run(scenario())


def test_large_fragmented_message(identity):
    async def scenario():
        async with LabServer(identity, HOST, 0) as server:
            client = await AgentClient.connect(HOST, server.port, new_agent(identity))
            await client.handshake(TIMEOUT)
            connection = await server.next_connection(client.agent.mesh_id, TIMEOUT)
            text = "x" * 20_000
            await client.send_message(b'{"action":"msg","type":"console","value":"' + text.encode() + b'"}', text=True)
            event = await next_event_of(connection, ConsoleMessage)
            assert event.text == text
            await client.close()

    run(scenario())


# -- malformed input on an open connection -------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [b"\x00", b"\x00\x0c\x00", b"\x00\x01" + bytes(20), b"\x03\xe7\x00\x00", b"{not json"],
    ids=["one-byte", "truncated-header", "truncated-auth-request", "unknown-command", "invalid-json"],
)
def test_malformed_message_counted(identity, message):
    async def action(server: LabServer):
        client = await AgentClient.connect(HOST, server.port, new_agent(identity))
        await client.handshake(TIMEOUT)
        await client.send_message(message)
        await wait_for_errors(server, 1)
        assert server.protocol_errors == 1
        await check_still_served(server, client)
        await client.close()

    async def check_still_served(server, client):
        connection = await server.next_connection(client.agent.mesh_id, TIMEOUT)
        violation = await next_event_of(connection, ProtocolViolation)
        assert violation.description
        connection.session.request_agent_hash()
        await connection.flush()
        await client.serve_until(lambda: any(f.payload[:2] == b"\x00\x0c" for f in client.frames_received), TIMEOUT)
        assert (await next_event_of(connection, AgentHashReported)).agent_hash == client.agent.agent_hash

    run(with_bystander(identity, action))


def test_oversized_frame_closes_1009(identity):
    async def action(server: LabServer):
        client = await AgentClient.connect(HOST, server.port, new_agent(identity))
        await client.send_raw(client_frame(0x2, b"x" * 5000))
        close = await client.receive_close(TIMEOUT)
        assert close.close_code == 1009
        await wait_for_errors(server, 1)
        assert server.protocol_errors == 1
        await client.close()

    run(with_bystander(identity, action, max_message_size=4096))


def test_oversized_length_header_closes_1009(identity):
    async def action(server: LabServer):
        client = await AgentClient.connect(HOST, server.port, new_agent(identity))
        await client.send_raw(struct.pack(">BBQ", 0x82, 0xFF, 1 << 40) + b"mask")
        close = await client.receive_close(TIMEOUT)
        assert close.close_code == 1009
        await client.close()

    run(with_bystander(identity, action))


def test_frames_before_oversized_frame_handled(identity):
    async def action(server: LabServer):
        client = await AgentClient.connect(HOST, server.port, new_agent(identity))
        await client.send_raw(client_frame(0x9, b"first") + client_frame(0x2, b"x" * 5000))
        frame = await client.receive_frame(TIMEOUT)
        assert (frame.opcode, frame.payload) == (0xA, b"first")
        close = await client.receive_close(TIMEOUT)
        assert close.close_code == 1009
        await client.close()

    run(with_bystander(identity, action, max_message_size=4096))


def test_replies_sent_before_protocol_error_close(identity):
    async def action(server: LabServer):
        client = await AgentClient.connect(HOST, server.port, new_agent(identity))
        opening = b"".join(agent_frames(message) for message in client.agent.opening_messages())
        await client.send_raw(opening + client_frame(0x2, b"a", rsv=0x40))
        commands = []
        while True:
            frame = await client.receive_frame(TIMEOUT)
            if frame.opcode == 0x8:
                break
            commands.append(frame.payload[:2])
        assert frame.close_code == 1002
        # The server's AuthRequest (1) and AuthVerify (2) follow the agent's opening messages.
        assert commands[:2] == [b"\x00\x01", b"\x00\x02"]
        await client.close()

    run(with_bystander(identity, action))


def test_invalid_utf8_close_reason_closes_1007(identity):
    async def action(server: LabServer):
        client = await AgentClient.connect(HOST, server.port, new_agent(identity))
        await client.send_raw(client_frame(0x8, struct.pack(">H", 1000) + b"\xff\xfe"))
        close = await client.receive_close(TIMEOUT)
        assert close.close_code == 1007
        await client.close()

    run(with_bystander(identity, action))


@pytest.mark.parametrize(
    "frame",
    [
        client_frame(0x2, b"a", rsv=0x40),
        client_frame(0x3, b"a"),
        client_frame(0x0, b"a"),
        client_frame(0x8, b"\x03"),
        client_frame(0x8, struct.pack(">H", 1005)),
        client_frame(0x8, struct.pack(">H", 999)),
        client_frame(0x8, struct.pack(">H", 2000)),
    ],
    ids=["reserved-bit", "bad-opcode", "orphan-continuation", "close-1-byte", "close-1005", "close-999", "close-2000"],
)
def test_invalid_framing_closes_1002(identity, frame):
    async def action(server: LabServer):
        client = await AgentClient.connect(HOST, server.port, new_agent(identity))
        await client.send_raw(frame)
        close = await client.receive_close(TIMEOUT)
        assert close.close_code == 1002
        await wait_for_errors(server, 1)
        assert server.protocol_errors == 1
        await client.close()

    run(with_bystander(identity, action))


def test_disconnect_mid_handshake(identity):
    async def action(server: LabServer):
        client = await AgentClient.connect(HOST, server.port, new_agent(identity))
        await client.send_messages(client.agent.opening_messages())
        await client.receive_frame(TIMEOUT)  # the server's AuthRequest
        client.writer.transport.abort()

    server = None

    async def scenario():
        nonlocal server
        server = await with_bystander(identity, action)

    run(scenario())
    assert server.connection_count == 2
    assert server.protocol_errors == 0


def test_disconnect_mid_frame(identity):
    async def action(server: LabServer):
        client = await AgentClient.connect(HOST, server.port, new_agent(identity))
        await client.send_raw(client_frame(0x2, b"x" * 1000)[:500])
        client.writer.transport.abort()

    run(with_bystander(identity, action))


def test_close_frame_answered(identity):
    async def action(server: LabServer):
        client = await AgentClient.connect(HOST, server.port, new_agent(identity))
        await client.send_raw(client_frame(0x8, struct.pack(">H", 1000)))
        close = await client.receive_close(TIMEOUT)
        assert close.close_code == 1000
        await client.close()

    run(with_bystander(identity, action))


def test_ping_answered_with_pong(identity):
    async def action(server: LabServer):
        client = await AgentClient.connect(HOST, server.port, new_agent(identity))
        await client.send_raw(client_frame(0x9, b"are you there"))
        frame = await client.receive_frame(TIMEOUT)
        assert (frame.opcode, frame.payload) == (0xA, b"are you there")
        await client.close()

    run(with_bystander(identity, action))


# -- HTTP ----------------------------------------------------------------------------------------


def test_unknown_path_404(identity):
    async def action(server: LabServer):
        response, _ = await http_get(HOST, server.port, "/no/such/path")
        assert response.status_code == 404

    run(with_bystander(identity, action))


def test_agent_path_without_upgrade_404(identity):
    async def action(server: LabServer):
        response, _ = await http_get(HOST, server.port, "/agent.ashx")
        assert response.status_code == 404

    run(with_bystander(identity, action))


def test_download_served(identity):
    data = os.urandom(200_000)

    async def action(server: LabServer):
        server.downloads["token-1"] = Download(data)
        response, body = await http_get(HOST, server.port, "/update/token-1")
        assert response.status_code == 200
        assert dict(response.headers)[b"content-length"] == str(len(data)).encode()
        assert hashlib.sha384(body).digest() == hashlib.sha384(data).digest()
        assert server.downloads["token-1"].requests == 1

    run(with_bystander(identity, action))


def test_download_unknown_token_404(identity):
    async def action(server: LabServer):
        server.downloads["token-1"] = Download(b"data")
        response, _ = await http_get(HOST, server.port, "/update/token-2")
        assert response.status_code == 404

    run(with_bystander(identity, action))


def test_download_injected_status(identity):
    async def action(server: LabServer):
        server.downloads["broken"] = Download(b"data", status=503)
        response, _ = await http_get(HOST, server.port, "/update/broken")
        assert response.status_code == 503

    run(with_bystander(identity, action))


def test_invalid_http_request(identity):
    async def action(server: LabServer):
        reader, writer = await open_tls(HOST, server.port)
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), TIMEOUT)
        assert data == b""
        writer.close()

    run(with_bystander(identity, action))


def test_plain_tcp_client(identity):
    # A client that skips TLS must not disturb the listener.
    async def action(server: LabServer):
        reader, writer = await asyncio.open_connection(HOST, server.port)
        writer.write(b"GET / HTTP/1.1\r\n\r\n")
        await writer.drain()
        try:
            await asyncio.wait_for(reader.read(), TIMEOUT)
        except (ConnectionError, ssl.SSLError):
            pass
        writer.close()

    run(with_bystander(identity, action))


# -- binding -------------------------------------------------------------------------------------


def test_port_in_use(identity):
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.bind((HOST, 0))
    holder.listen(1)
    port = holder.getsockname()[1]

    async def scenario():
        with pytest.raises(ServerError, match=f"127.0.0.1:{port}"):
            await LabServer(identity, HOST, port).start()

    try:
        run(scenario())
    finally:
        holder.close()


def test_foreign_address_named_in_error(identity):
    # 192.0.2.1 (TEST-NET-1, RFC 5737) is on no interface here, so the bind fails locally and
    # no packet is sent.
    async def scenario():
        with pytest.raises(ServerError, match="192.0.2.1 is not an address of this machine"):
            await LabServer(identity, "192.0.2.1", 0).start()

    run(scenario())


@pytest.mark.parametrize("host", ["0.0.0.0", "::", ""])
def test_wildcard_bind_refused(identity, host):
    with pytest.raises(ServerError, match="refusing to bind"):
        LabServer(identity, host, 0)
