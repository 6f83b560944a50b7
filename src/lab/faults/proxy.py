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
import contextlib
import dataclasses
import logging
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable

from lab.errors import LabError
from lab.server.server import LabServer, listens_everywhere

logger = logging.getLogger(__name__)

CHUNK_SIZE = 16384
#: Markers queued in the byte stream where a fault happens.
_RESET = "reset"
_STALL = "stall"


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
        if listens_everywhere(host):
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
            ended_cleanly = False
            try:
                async with asyncio.TaskGroup() as group:
                    group.create_task(self._pump(link, server_reader, agent_writer, faults, downstream=True))
                    group.create_task(self._pump(link, agent_reader, server_writer, faults, downstream=False))
                ended_cleanly = True
            except* (ConnectionError, OSError):
                pass
            finally:
                self._links.pop(number, None)
                if ended_cleanly:
                    # Both sides sent their end of file, so close without a reset.
                    agent_writer.close()
                    server_writer.close()
                else:
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
        """Copy one direction of `link`, applying `faults`, until its sender closes it.

        One task reads and stamps each chunk with the time it is due, another writes it then,
        so added latency delays the data without limiting the throughput. The reset and the
        stall travel through the same queue as markers, so they happen exactly after the byte
        they name, and the bytes before them are delivered first. When the sender closes its
        side, the receiver gets an end of file and the other direction carries on.
        """
        queue: asyncio.Queue[tuple[float, bytes | str] | None] = asyncio.Queue()
        latency = faults.latency_ms / 1000

        async def read() -> None:
            while True:
                data = await reader.read(CHUNK_SIZE)
                if not data:
                    await queue.put(None)
                    return
                while link.stalled and not downstream:
                    await asyncio.sleep(0.05)
                due = time.monotonic() + latency
                for item in self._split_at_faults(link, data, faults) if downstream else [data]:
                    await queue.put((due, item))
                    if item == _RESET:
                        return

        async def write() -> None:
            while True:
                entry = await queue.get()
                if entry is None:
                    with contextlib.suppress(OSError):
                        writer.write_eof()
                    return
                due, item = entry
                if latency:
                    await asyncio.sleep(max(0.0, due - time.monotonic()))
                if item == _RESET:
                    self._record("proxy-reset", f"connection {link.number}: reset after {faults.reset_after_bytes} bytes to the agent")
                    link.abort()
                    raise ConnectionResetError("reset by fault")
                if item == _STALL:
                    await self._stall(link, faults)
                    continue
                assert isinstance(item, bytes)
                writer.write(item)
                await writer.drain()
                if downstream and faults.bytes_per_second:
                    await asyncio.sleep(len(item) / faults.bytes_per_second)

        async with asyncio.TaskGroup() as group:
            group.create_task(read())
            group.create_task(write())

    def _split_at_faults(self, link: _Link, data: bytes, faults: ProxyFaults) -> list[bytes | str]:
        """Return server-to-agent `data` as chunks, with a reset or stall marker after the byte it names."""
        before = link.downstream_bytes
        link.downstream_bytes += len(data)
        after = link.downstream_bytes
        if faults.reset_after_bytes is not None and after >= faults.reset_after_bytes:
            keep = max(0, faults.reset_after_bytes - before)
            return [data[:keep], _RESET] if keep else [_RESET]
        threshold = faults.stall_after_bytes
        if threshold is not None and faults.stall_seconds > 0 and before < threshold <= after:
            cut = threshold - before
            return [chunk for chunk in (data[:cut], _STALL, data[cut:]) if chunk]
        return [data]

    async def _stall(self, link: _Link, faults: ProxyFaults) -> None:
        self._record(
            "proxy-stall",
            f"connection {link.number}: stalled for {faults.stall_seconds:g} s after {faults.stall_after_bytes} bytes",
        )
        link.stalled = True
        try:
            await asyncio.sleep(faults.stall_seconds)
        finally:
            link.stalled = False
        self._record("proxy-resume", f"connection {link.number}: relaying again")

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
