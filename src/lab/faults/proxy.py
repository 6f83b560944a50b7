"""A TCP proxy between the agent and the lab server that injects network faults.

The agent's .msh points at the proxy instead of the server. The proxy relays bytes in both
directions without looking into TLS, so it works with every provider. Its faults apply to the
first `ProxyFaults.connections` connections, and later ones pass untouched. An agent that
reconnects after a fault therefore gets a clean path, and the next cycle can succeed.

- `reset_after_bytes`: once that many bytes went from the server to the agent, both sides get a
  TCP reset.
- `stall_after_bytes` and `stall_seconds`: once that many bytes went from the server to the agent,
  nothing moves in either direction for that long.
- `latency_ms` and `bytes_per_second`: every chunk is delayed, and the server-to-agent direction is
  capped to that rate.
- `drop()`: resets every open connection at once; the scenario runner calls it at a named step
  of the cycle.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from lab.errors import LabError

if TYPE_CHECKING:
    from lab.server.server import LabServer

logger = logging.getLogger(__name__)

CHUNK_SIZE = 16384


@dataclasses.dataclass
class ProxyFaults:
    reset_after_bytes: int | None = None
    stall_after_bytes: int | None = None
    stall_seconds: float = 0.0
    latency_ms: float = 0.0
    bytes_per_second: float | None = None
    #: How many connections, counted from the first, get the reset or the stall.
    connections: int = 1


class ProxyError(LabError):
    """The proxy could not start."""


class _Link:
    """One agent connection and its upstream connection to the server."""

    def __init__(self, number: int, agent: asyncio.StreamWriter, server: asyncio.StreamWriter) -> None:
        self.number = number
        self.agent = agent
        self.server = server
        self.downstream_bytes = 0
        self.stalled = False
        self.reset = False

    def abort(self) -> None:
        """Close both sides with a TCP reset rather than an orderly shutdown."""
        for writer in (self.agent, self.server):
            if writer.transport.is_closing():
                continue
            raw = writer.get_extra_info("socket")
            if raw is not None:
                with contextlib.suppress(OSError):
                    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()


class FaultProxy:
    """Listens on `host` and relays each connection to `upstream_host:upstream_port`."""

    def __init__(
        self,
        host: str,
        upstream_host: str,
        upstream_port: int,
        faults: ProxyFaults | None = None,
        *,
        on_event: Callable[[str, str], None] | None = None,
    ) -> None:
        if host in ("0.0.0.0", "::", ""):
            raise ProxyError(f"refusing to bind the proxy to {host!r}: bind to loopback or the lab network's gateway")
        self.host = host
        self.port = 0
        self.upstream = (upstream_host, upstream_port)
        self.faults = faults or ProxyFaults()
        self.on_event = on_event
        self.connections = 0
        self._links: dict[int, _Link] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(self._accept, self.host, 0)
        except OSError as error:
            raise ProxyError(f"cannot listen on {self.host}: {error.strerror}") from error
        self.port = self._server.sockets[0].getsockname()[1]
        logger.info("fault proxy on %s:%d relays to %s:%d", self.host, self.port, *self.upstream)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self._links.values()):
            link.abort()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> FaultProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def clear(self) -> None:
        """Stop injecting faults into new connections."""
        self.faults = ProxyFaults()

    def drop(self, step: str) -> int:
        """Reset every open connection and return how many there were; `step` names the moment in the timeline."""
        links = list(self._links.values())
        for link in links:
            link.abort()
        self._record("proxy-drop", f"reset {len(links)} connection(s) {step}")
        return len(links)

    def _record(self, kind: str, detail: str) -> None:
        logger.info("%s: %s", kind, detail)
        if self.on_event is not None:
            self.on_event(kind, detail)

    async def _accept(self, agent_reader: asyncio.StreamReader, agent_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        number = self.connections
        faults = self.faults if number <= self.faults.connections else ProxyFaults(
            latency_ms=self.faults.latency_ms, bytes_per_second=self.faults.bytes_per_second
        )
        try:
            try:
                server_reader, server_writer = await asyncio.open_connection(*self.upstream)
            except OSError as error:
                self._record("proxy-error", f"connection {number}: cannot reach the server: {error.strerror}")
                agent_writer.transport.abort()
                return
            link = _Link(number, agent_writer, server_writer)
            self._links[number] = link
            try:
                async with asyncio.TaskGroup() as group:
                    group.create_task(self._pump(link, server_reader, agent_writer, faults, downstream=True))
                    group.create_task(self._pump(link, agent_reader, server_writer, faults, downstream=False))
            except* (ConnectionError, OSError):
                pass
            finally:
                self._links.pop(number, None)
                link.abort()
        except asyncio.CancelledError:
            pass
        finally:
            self._tasks.discard(task)

    async def _pump(
        self,
        link: _Link,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        faults: ProxyFaults,
        *,
        downstream: bool,
    ) -> None:
        """Copy one direction of `link`, applying `faults`; ends when either side closes.

        One task reads and stamps each chunk with the time it is due, another writes it then,
        so added latency delays the data without limiting the throughput.
        """
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
        latency = faults.latency_ms / 1000

        async def read() -> None:
            while True:
                data = await reader.read(CHUNK_SIZE)
                if not data:
                    await queue.put(None)
                    return
                if downstream:
                    filtered = await self._downstream_faults(link, data, faults)
                    if filtered is None:
                        raise ConnectionResetError("reset by fault")
                    data = filtered
                while link.stalled:
                    await asyncio.sleep(0.05)
                await queue.put((time.monotonic() + latency, data))

        async def write() -> None:
            while True:
                item = await queue.get()
                if item is None:
                    with contextlib.suppress(OSError):
                        writer.write_eof()
                    raise ConnectionResetError("peer closed")
                due, data = item
                if latency:
                    await asyncio.sleep(max(0.0, due - time.monotonic()))
                writer.write(data)
                await writer.drain()
                if downstream and faults.bytes_per_second:
                    await asyncio.sleep(len(data) / faults.bytes_per_second)

        async with asyncio.TaskGroup() as group:
            group.create_task(read())
            group.create_task(write())

    async def _downstream_faults(self, link: _Link, data: bytes, faults: ProxyFaults) -> bytes | None:
        """Apply the byte-count faults to server-to-agent `data`; return None to reset the link."""
        before = link.downstream_bytes
        link.downstream_bytes += len(data)
        if faults.reset_after_bytes is not None and link.downstream_bytes >= faults.reset_after_bytes:
            keep = max(0, faults.reset_after_bytes - before)
            if keep:
                link.agent.write(data[:keep])
                with contextlib.suppress(ConnectionError):
                    await link.agent.drain()
            self._record("proxy-reset", f"connection {link.number}: reset after {faults.reset_after_bytes} bytes to the agent")
            link.abort()
            return None
        if (
            faults.stall_after_bytes is not None
            and faults.stall_seconds > 0
            and before < faults.stall_after_bytes <= link.downstream_bytes
        ):
            self._record("proxy-stall", f"connection {link.number}: stalled for {faults.stall_seconds:g} s after {faults.stall_after_bytes} bytes")
            link.stalled = True
            await asyncio.sleep(faults.stall_seconds)
            link.stalled = False
            self._record("proxy-resume", f"connection {link.number}: relaying again")
        return data


@contextlib.asynccontextmanager
async def proxied(
    server: LabServer, faults: ProxyFaults | None, on_event: Callable[[str, str], None] | None = None
) -> AsyncIterator[FaultProxy | None]:
    """Put a fault proxy in front of `server` for the duration of the block, if `faults` is given.

    The proxy listens on the server's address, and the server's `agent_url` names the proxy, so
    every .msh written inside the block sends the agent through it. Recovery downloads still go
    to the server directly.
    """
    if faults is None:
        yield None
        return
    async with FaultProxy(server.host, server.host, server.port, faults, on_event=on_event) as proxy:
        server.advertised_port = proxy.port
        try:
            yield proxy
        finally:
            server.advertised_port = None
