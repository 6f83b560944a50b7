"""The fault proxy on loopback, between a test client and a local source server."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from lab.faults.proxy import FaultProxy, ProxyError, ProxyFaults

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB


def in_loop(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test in a fresh event loop, bounded to 60 seconds."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(asyncio.wait_for(test(*args, **kwargs), 60))

    return run


class Source:
    """A loopback server that sends PAYLOAD to every client and echoes what it receives."""

    def __init__(self) -> None:
        self.port = 0
        self.server: asyncio.Server | None = None
        self.received = bytearray()

    async def __aenter__(self) -> Source:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(PAYLOAD)
            await writer.drain()
            while data := await reader.read(65536):
                self.received += data
            writer.close()
        except ConnectionError:
            pass


async def read_all(port: int, timeout: float = 20) -> tuple[bytes, BaseException | None]:
    """Read from the proxy until it closes; return the bytes and the error that ended it, if any."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    received = bytearray()
    error: BaseException | None = None
    try:
        async with asyncio.timeout(timeout):
            while len(received) < len(PAYLOAD):
                data = await reader.read(65536)
                if not data:
                    break
                received += data
    except ConnectionError as caught:
        error = caught
    finally:
        writer.close()
    return bytes(received), error


@in_loop
async def test_relays_both_directions_unchanged():
    async with Source() as source, FaultProxy("127.0.0.1", "127.0.0.1", source.port) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"hello from the agent side")
        await writer.drain()
        received = await reader.readexactly(len(PAYLOAD))
        assert received == PAYLOAD
        for _ in range(100):
            if source.received:
                break
            await asyncio.sleep(0.02)
        assert bytes(source.received) == b"hello from the agent side"
        writer.close()


@in_loop
async def test_reset_after_bytes_hits_only_the_first_connection():
    events: list[tuple[str, str]] = []
    faults = ProxyFaults(reset_after_bytes=100_000)
    async with Source() as source, FaultProxy("127.0.0.1", "127.0.0.1", source.port, faults, on_event=lambda *e: events.append(e)) as proxy:
        first, error = await read_all(proxy.port)
        assert len(first) <= 100_000
        assert first == PAYLOAD[: len(first)]
        assert isinstance(error, ConnectionResetError) or len(first) < len(PAYLOAD)
        second, error = await read_all(proxy.port)
        assert second == PAYLOAD
        assert error is None
    assert [kind for kind, _ in events] == ["proxy-reset"]
    assert "after 100000 bytes" in events[0][1]


@in_loop
async def test_stall_pauses_the_stream_then_resumes():
    faults = ProxyFaults(stall_after_bytes=200_000, stall_seconds=1.0)
    events: list[tuple[str, str]] = []
    async with Source() as source, FaultProxy("127.0.0.1", "127.0.0.1", source.port, faults, on_event=lambda *e: events.append(e)) as proxy:
        started = time.monotonic()
        received, error = await read_all(proxy.port)
        elapsed = time.monotonic() - started
    assert received == PAYLOAD
    assert error is None
    assert elapsed >= 1.0
    assert [kind for kind, _ in events] == ["proxy-stall", "proxy-resume"]


@in_loop
async def test_latency_and_rate_cap_slow_the_stream():
    faults = ProxyFaults(latency_ms=300, bytes_per_second=2_000_000)
    async with Source() as source, FaultProxy("127.0.0.1", "127.0.0.1", source.port, faults) as proxy:
        started = time.monotonic()
        received, error = await read_all(proxy.port)
        elapsed = time.monotonic() - started
    assert received == PAYLOAD
    assert error is None
    # 1 MiB at 2 MB/s takes at least half a second, plus the latency of the first chunk.
    assert elapsed >= 0.3 + len(PAYLOAD) / 2_000_000 * 0.9


@in_loop
async def test_drop_resets_open_connections():
    faults = ProxyFaults(stall_after_bytes=1, stall_seconds=5.0)
    events: list[tuple[str, str]] = []
    async with Source() as source, FaultProxy("127.0.0.1", "127.0.0.1", source.port, faults, on_event=lambda *e: events.append(e)) as proxy:
        reading = asyncio.create_task(read_all(proxy.port))
        for _ in range(100):
            if any(kind == "proxy-stall" for kind, _ in events):
                break
            await asyncio.sleep(0.02)
        assert proxy.drop("at a test step") == 1
        received, _ = await reading
    assert len(received) < len(PAYLOAD)
    assert ("proxy-drop", "reset 1 connection(s) at a test step") in events


@in_loop
async def test_clear_stops_faults_for_new_connections():
    async with Source() as source, FaultProxy("127.0.0.1", "127.0.0.1", source.port, ProxyFaults(reset_after_bytes=10)) as proxy:
        proxy.clear()
        received, error = await read_all(proxy.port)
    assert received == PAYLOAD
    assert error is None


@in_loop
async def test_unreachable_upstream_is_reported():
    events: list[tuple[str, str]] = []
    # Port 9 on loopback: nothing listens there in the test environment, so the connect is refused.
    async with FaultProxy("127.0.0.1", "127.0.0.1", 9, on_event=lambda *e: events.append(e)) as proxy:
        received, _ = await read_all(proxy.port, timeout=5)
    assert received == b""
    assert events
    assert events[0][0] == "proxy-error"
    assert "cannot reach the server" in events[0][1]


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "::0", "0", "", " "])
def test_refuses_every_address(host):
    with pytest.raises(ProxyError, match="refusing to bind"):
        FaultProxy(host, "127.0.0.1", 1)


@in_loop
async def test_close_leaves_no_listener():
    async with Source() as source:
        proxy = FaultProxy("127.0.0.1", "127.0.0.1", source.port)
        await proxy.start()
        port = proxy.port
        await proxy.close()
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)


@in_loop
async def test_reset_delivers_exactly_the_first_bytes_in_order():
    async with Source() as source, FaultProxy("127.0.0.1", "127.0.0.1", source.port, ProxyFaults(reset_after_bytes=50_000)) as proxy:
        received, _ = await read_all(proxy.port)
    assert received == PAYLOAD[:50_000]


@in_loop
async def test_stall_starts_at_the_named_byte():
    faults = ProxyFaults(stall_after_bytes=50_000, stall_seconds=1.5)
    async with Source() as source, FaultProxy("127.0.0.1", "127.0.0.1", source.port, faults) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        first = await asyncio.wait_for(reader.readexactly(50_000), 5)
        assert first == PAYLOAD[:50_000]
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.readexactly(1), 0.5)
        rest = await asyncio.wait_for(reader.readexactly(len(PAYLOAD) - 50_000), 10)
        assert rest == PAYLOAD[50_000:]
        writer.close()


@in_loop
async def test_half_close_is_forwarded():
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Read until the client's end of file, then send back what arrived.
        data = await reader.read()
        writer.write(b"got " + data)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with FaultProxy("127.0.0.1", "127.0.0.1", port) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"request")
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 5) == b"got request"
        writer.close()
    server.close()
    await server.wait_closed()
