"""Update cycles: drive one agent through native or recovery-core updates and judge each one.

A cycle starts on an authenticated connection whose agent hash is known. The driver sends the
update, follows the agent through the restart, waits for it to reconnect, and compares the hash
it reports with the hash of the binary it was sent. Each way a cycle can fail has its own
reason, named after the step that failed (see `Reason`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import random
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from lab.agentfile import AgentBinary
from lab.engine.report import FAILED, PASSED, CycleResult, Report
from lab.protocol.commands import MAX_BLOCK_SIZE, Capability
from lab.protocol.events import (
    AgentHashReported,
    Event,
    AgentNotice,
    BlockAcknowledged,
    ConsoleMessage,
    CoreHashReported,
    ConnectionClosed,
    CoreInfoReported,
    ProtocolViolation,
    UpdateDownloaded,
    UpdateHashSent,
)
from lab.protocol.session import NativeUpdate
from lab.server.server import AgentConnection, Download, LabServer

logger = logging.getLogger(__name__)


class Mode(enum.StrEnum):
    NATIVE = "native"
    RECOVERY = "recovery"


class Fault(enum.StrEnum):
    """Server-side faults that a run can inject into every cycle."""

    WRONG_FINAL_HASH = "wrong-final-hash"


class Reason(enum.StrEnum):
    NO_CONNECTION = "no connection: the agent did not connect"
    NO_HASH = "no hash: the agent did not answer the agent hash request"
    STALLED = "transfer stalled: no block acknowledgement"
    WRITE_ERROR = "the agent reported a write error"
    HASH_REJECTED = "the agent rejected the update hash and kept its old binary"
    NO_RESTART = "no restart: the agent neither restarted nor kept its old binary"
    NO_RECONNECT = "no reconnect: the agent did not reconnect after the update"
    WRONG_HASH = "wrong hash: the agent reports a different binary than the one it was sent"
    CORE_NOT_LOADED = "the recovery core was not loaded"
    DOWNLOAD_FAILED = "the recovery core did not download and verify the update"
    TARGET_CHECK = "a check inside the target failed"
    DISCONNECTED = "disconnected: the connection closed in the middle of the cycle"


class Outcome(enum.StrEnum):
    """Expected end state of a cycle."""

    UPDATED = "updated"
    REJECTED = "rejected"  # the agent keeps its old binary, e.g. after a wrong final hash
    CONSOLE_REFUSAL = "console-refusal"  # the recovery core refuses to restart a console agent


@dataclasses.dataclass
class Timeouts:
    """Seconds to wait at each step before the cycle fails."""

    connect: float = 60.0
    hash_reply: float = 30.0
    block_ack: float = 30.0
    restart: float = 30.0
    reconnect: float = 90.0
    rejection: float = 5.0
    core_load: float = 30.0
    download: float = 180.0


@dataclasses.dataclass
class CycleFaults:
    """Server-side faults injected into one cycle; fault scenarios set these."""

    #: Index of the native update block whose bytes are inverted on the way out.
    corrupt_block: int | None = None
    #: Send only this share (0..1) of the binary, with the full binary's hash.
    truncate: float | None = None
    wrong_final_hash: bool = False
    #: HTTP status that the recovery download responds with instead of the binary.
    download_status: int | None = None
    download_bytes_per_second: float | None = None
    #: Invert one byte in the middle of the download body; the hash stays the original's.
    download_altered: bool = False
    #: Serve the recovery download from this server instead of the control channel's.
    download_server: LabServer | None = None
    #: Runs when every native block is acknowledged, before the final hash is sent.
    before_final_hash: Callable[[], None] | None = None
    #: Runs before the last chunk of the recovery download is sent.
    before_download_end: Callable[[], None] | None = None


@dataclasses.dataclass
class CycleOptions:
    mode: Mode = Mode.NATIVE
    count: int = 1
    min_delay_ms: int = 0
    max_delay_ms: int = 0
    block_size: int = MAX_BLOCK_SIZE
    first_block_size: int | None = None
    #: None compresses when the agent advertises the compression capability.
    compress: bool | None = False
    fault: Fault | None = None
    faults: CycleFaults | None = None
    #: Overrides the outcome that `expected_outcome` derives from the mode and the fault.
    outcome: Outcome | None = None
    recovery_core: bytes | None = None
    #: Outcome of a recovery cycle when the agent is not a service (the local provider).
    recovery_outcome: Outcome = Outcome.UPDATED
    timeouts: Timeouts = dataclasses.field(default_factory=Timeouts)

    def expected_outcome(self) -> Outcome:
        if self.outcome is not None:
            return self.outcome
        if self.fault is Fault.WRONG_FINAL_HASH:
            return Outcome.REJECTED
        if self.mode is Mode.RECOVERY:
            return self.recovery_outcome
        return Outcome.UPDATED


class TargetProbe(Protocol):
    """Checks made inside the target around each cycle (service state, PID, files)."""

    def snapshot(self) -> dict[str, Any]:
        """Record the state before a cycle, such as the agent's PID."""

    def verify(self, before: dict[str, Any], expected_hash: bytes, outcome: Outcome) -> dict[str, dict[str, Any]]:
        """Return named checks, each a dict with a boolean ``ok`` and a ``detail`` text."""

    def collect_evidence(self, cycle: int) -> list[str]:
        """Save logs and files for the cycle and return their paths."""


class CycleFailure(Exception):
    """Ends a cycle early with a failure reason; caught by the driver."""

    def __init__(self, reason: Reason, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else str(reason))


class AgentDriver:
    """Runs the update cycles of one agent that connects to `server` with `mesh_id`."""

    def __init__(
        self,
        *,
        server: LabServer,
        mesh_id: bytes,
        target: str,
        binaries: list[AgentBinary],
        options: CycleOptions,
        report: Report,
        probe: TargetProbe | None = None,
        on_progress: Callable[[str, int, int], None] | None = None,
        on_event: Callable[[str, int | None, str, str], None] | None = None,
    ) -> None:
        if not binaries:
            raise ValueError("at least one binary is required")
        self.server = server
        self.mesh_id = mesh_id
        self.target = target
        self.binaries = binaries
        self.options = options
        self.report = report
        self.probe = probe
        self.on_progress = on_progress
        self.on_event = on_event
        self._connection: AgentConnection | None = None
        self._reported_hash: bytes | None = None
        #: The hash the agent reported after the current cycle's update, None until it does.
        self._cycle_hash: bytes | None = None
        self._cycle: int | None = None

    @property
    def reported_hash(self) -> bytes | None:
        """The agent hash from the agent's latest reply, or None before the first one."""
        return self._reported_hash

    # -- helpers -------------------------------------------------------------------------------

    def _record(self, kind: str, detail: str = "") -> None:
        self.report.add_event(self.target, self._cycle, kind, detail)
        logger.info("%s cycle %s: %s %s", self.target, self._cycle, kind, detail)
        if self.on_event is not None:
            self.on_event(self.target, self._cycle, kind, detail)

    def binary_for_cycle(self, index: int) -> AgentBinary:
        """Return the binary that cycle `index` installs: the next one after the installed one."""
        return self.binaries[(index + 1) % len(self.binaries)]

    async def _events(
        self, connection: AgentConnection, seconds: float, on_timeout: CycleFailure, *, idle: bool = False
    ) -> AsyncIterator[Event]:
        """Yield the connection's events, relaying console output and protocol errors to the timeline.

        Raises `on_timeout` once `seconds` have passed before the caller stops iterating. With
        `idle`, the limit applies to each gap between two events instead of the whole wait.
        """
        deadline = time.monotonic() + seconds
        while True:
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0:
                    raise TimeoutError
                timed = await connection.next_event(remaining)
            except TimeoutError:
                raise on_timeout from None
            if idle:
                deadline = time.monotonic() + seconds

            match timed.event:
                case ConsoleMessage(text=text):
                    self._record("console", text)
                case AgentNotice(text=text):
                    self._record("notice", text)
                case ProtocolViolation(description=description):
                    self._record("protocol-error", description)
                case CoreInfoReported(value=value):
                    self._record("core-info", value)
                case ConnectionClosed(reason=reason):
                    raise CycleFailure(Reason.DISCONNECTED, reason)
            yield timed.event

    async def _wait_connection(self, timeout: float) -> AgentConnection:
        deadline = time.monotonic() + timeout
        connection = await self.server.next_connection(self.mesh_id, timeout)
        # Skip connections that closed while they waited in the queue, such as the one an agent
        # had open before its service was restarted.
        while connection.closed.is_set():
            connection = await self.server.next_connection(self.mesh_id, max(0.0, deadline - time.monotonic()))
        return self._take_connection(connection)

    def _take_connection(self, connection: AgentConnection) -> AgentConnection:
        info = connection.session.info
        assert info is not None
        self._record(
            "connected",
            f"connection {connection.id} from {connection.peer}, platform type {info.platform_type}, "
            f"capabilities 0x{int(info.capabilities):x}, host {info.hostname}",
        )
        if connection.unmasked_frames:
            self._record("websocket", "the agent sends unmasked frames")
        self._connection = connection
        return connection

    async def _request_hash(self, connection: AgentConnection, seconds: float | None = None) -> bytes:
        # NOTE: agent hash replies carry no request id, so the first reply after the request
        # is taken for the reply to it. An agent that wakes up after several requests without
        # a reply sends one reply to each, and a late one can pass for a later request's reply.
        connection.session.request_agent_hash()
        await connection.flush()
        seconds = seconds if seconds is not None else self.options.timeouts.hash_reply
        async for event in self._events(connection, seconds, CycleFailure(Reason.NO_HASH, f"after {seconds:.0f} s")):
            if isinstance(event, AgentHashReported):
                self._record("agent-hash", event.agent_hash.hex())
                return event.agent_hash
        raise AssertionError("_events ends only by raising")

    # -- the run -------------------------------------------------------------------------------

    async def connect(self) -> bytes:
        """Wait for the agent's first connection and return the agent hash it reports.

        Raises CycleFailure with `Reason.NO_CONNECTION` or `Reason.NO_HASH`.
        """
        seconds = self.options.timeouts.connect
        try:
            connection = await self._wait_connection(seconds)
        except TimeoutError:
            raise CycleFailure(Reason.NO_CONNECTION, f"within {seconds:.0f} s") from None
        self._reported_hash = await self._request_hash(connection)
        return self._reported_hash

    async def current_hash(self, timeout: float) -> bytes | None:
        """Return the hash the agent reports now, or None if it stays offline for `timeout` seconds.

        Uses the open connection if the agent still has one, otherwise waits for it to reconnect.
        """
        self._cycle = None
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            connection = self._connection
            newer = self.server.pending_connection(self.mesh_id)
            if newer is not None and not newer.closed.is_set():
                connection = self._take_connection(newer)
            elif connection is None or connection.closed.is_set():
                try:
                    connection = await self._wait_connection(remaining)
                except TimeoutError:
                    break
            # An open connection may belong to an agent that is busy, for example sleeping in
            # its write path, so keep asking on it until the time is up.
            try:
                self._reported_hash = await self._request_hash(connection, min(remaining, self.options.timeouts.hash_reply))
                return self._reported_hash
            except CycleFailure:
                continue
        self._record("offline", f"no answer from the agent within {timeout:.0f} s")
        return None

    async def run(self) -> list[CycleResult]:
        """Run every cycle and return the results; a failed cycle ends the run."""
        results: list[CycleResult] = []
        started = time.monotonic()
        try:
            await self.connect()
        except (TimeoutError, CycleFailure) as error:
            reason = error.reason if isinstance(error, CycleFailure) else Reason.NO_CONNECTION
            result = self._result(0, self.binary_for_cycle(0), started, None, FAILED, str(reason))
            self.report.cycles.append(result)
            self._record("verdict", f"failed: {reason}")
            return [result]

        for index in range(self.options.count):
            result = await self.run_cycle(index)
            results.append(result)
            self.report.cycles.append(result)
            if not result.passed:
                break
        self._cycle = None
        return results

    def _result(
        self, index: int, binary: AgentBinary, started: float, reported: bytes | None, verdict: str, reason: str = ""
    ) -> CycleResult:
        return CycleResult(
            target=self.target,
            index=index,
            mode=str(self.options.mode),
            expected_hash=binary.agent_hash.hex(),
            reported_hash=reported.hex() if reported else None,
            duration=round(time.monotonic() - started, 3),
            verdict=verdict,
            reason=reason,
            expected_outcome=str(self.options.expected_outcome()),
        )

    async def run_cycle(self, index: int, binary: AgentBinary | None = None) -> CycleResult:
        """Run cycle `index`, updating to `binary` or else to `binary_for_cycle(index)`."""
        self._cycle = index
        binary = binary or self.binary_for_cycle(index)
        outcome = self.options.expected_outcome()
        started = time.monotonic()
        before = await asyncio.to_thread(self.probe.snapshot) if self.probe else {}
        old_hash = self._reported_hash
        self._cycle_hash = None
        self._record("cycle-start", f"{self.options.mode} update to {binary.path.name} ({binary.agent_hash.hex()[:12]}), expecting {outcome}")

        try:
            if self.options.mode is Mode.NATIVE:
                reported = await self._native_cycle(binary, outcome)
            else:
                reported = await self._recovery_cycle(binary, outcome)
        except CycleFailure as failure:
            # A hash reported before the update would look like this cycle's result, so only a later one is shown.
            result = self._result(index, binary, started, self._cycle_hash, FAILED, str(failure))
            self._record("verdict", f"failed: {failure}")
            await self._add_evidence(result)
            return result

        result = self._result(index, binary, started, reported, PASSED)
        if outcome is Outcome.REJECTED and reported != old_hash:
            result.verdict, result.reason = FAILED, "the agent did not keep its old binary"
        if self.probe is not None:
            expected = binary.agent_hash if outcome is Outcome.UPDATED else (old_hash or b"")
            checks = await asyncio.to_thread(self.probe.verify, before, expected, outcome)
            result.checks = checks
            failed = [name for name, check in checks.items() if not check.get("ok")]
            if failed and result.passed:
                details = "; ".join(f"{name}: {checks[name].get('detail', '')}" for name in failed)
                result.verdict, result.reason = FAILED, f"{Reason.TARGET_CHECK}: {details}"
        self._record("verdict", result.verdict + (f": {result.reason}" if result.reason else ""))
        await self._add_evidence(result)
        return result

    async def _add_evidence(self, result: CycleResult) -> None:
        # Evidence files are the target's current logs and files, so each collection replaces
        # the one before: collect after a failure, which ends the run, and after the last cycle.
        if result.passed and result.index < self.options.count - 1:
            return
        if self.probe is not None:
            try:
                result.evidence = await asyncio.to_thread(self.probe.collect_evidence, result.index)
            except Exception as error:  # evidence is best effort, and the verdict is kept
                logger.warning("%s: collecting evidence of cycle %d failed: %s", self.target, result.index, error)

    async def _delay(self) -> None:
        low, high = self.options.min_delay_ms, self.options.max_delay_ms
        if high > 0:
            await asyncio.sleep(random.uniform(low, high) / 1000)

    # -- native --------------------------------------------------------------------------------

    async def _native_cycle(self, binary: AgentBinary, outcome: Outcome) -> bytes:
        connection = self._connection
        assert connection is not None and connection.session.info is not None
        await self._delay()

        compress = self.options.compress
        if compress is None:
            compress = bool(connection.session.info.capabilities & Capability.COMPRESSION)
        faults = self.options.faults or CycleFaults()
        data = binary.data
        if faults.truncate is not None:
            data = data[: int(len(data) * faults.truncate)]
        update = NativeUpdate.for_binary(
            data,
            binary.agent_hash,
            block_size=self.options.block_size,
            first_block_size=self.options.first_block_size,
            compress=compress,
        )
        if faults.truncate is not None and compress:
            # The zip of a shortened binary has its own hash; keep the full binary's instead.
            update.final_hash = NativeUpdate.for_binary(binary.data, binary.agent_hash, compress=True).final_hash
        if self.options.fault is Fault.WRONG_FINAL_HASH or faults.wrong_final_hash:
            update.final_hash = bytes(reversed(update.final_hash))
        if faults.corrupt_block is not None:
            update.block_filter = _corrupting_filter(faults.corrupt_block)
        update.before_final_hash = faults.before_final_hash
        connection.session.start_native_update(update)
        await connection.flush()
        started = connection.session.transfer_started_event()
        self._record(
            "transfer-start",
            f"{started.total_bytes} bytes in blocks of {started.block_size}" + (", zip-compressed" if compress else ""),
        )
        transfer_started = time.monotonic()

        seconds = self.options.timeouts.block_ack
        stalled = CycleFailure(Reason.STALLED, f"none for {seconds:.0f} s")
        async for event in self._events(connection, seconds, stalled, idle=True):
            match event:
                case BlockAcknowledged(acknowledged_bytes=done, total_bytes=total):
                    if self.on_progress is not None:
                        self.on_progress(self.target, done, total)
                case UpdateHashSent():
                    seconds = time.monotonic() - transfer_started
                    self._record("transfer-done", f"{len(update.payload)} bytes in {seconds:.3f} s, final hash sent")
                    break
                case AgentNotice(text=text) if "Write Error" in text or "FAILED" in text:
                    raise CycleFailure(Reason.WRITE_ERROR, text)

        return await self._follow_restart(connection, binary, outcome)

    async def _follow_restart(self, connection: AgentConnection, binary: AgentBinary, outcome: Outcome) -> bytes:
        """Wait for the agent to restart and reconnect; return the hash it then reports."""
        timeouts = self.options.timeouts
        closed = await connection.wait_closed(timeouts.rejection if outcome is Outcome.REJECTED else timeouts.restart)
        if not closed:
            # An agent that rejects the hash stays connected and sends nothing, so request its agent hash.
            current = await self._request_hash(connection)
            self._reported_hash = self._cycle_hash = current
            if outcome is Outcome.REJECTED:
                self._record("rejected", "the agent stayed connected and kept its old binary")
                return current
            if current != binary.agent_hash:
                raise CycleFailure(Reason.HASH_REJECTED, f"it still reports {current.hex()[:12]}")
            raise CycleFailure(Reason.NO_RESTART, "it reports the new hash without restarting")

        self._record("disconnected", connection.close_reason)
        try:
            new_connection = await self._wait_connection(timeouts.reconnect)
        except TimeoutError:
            raise CycleFailure(Reason.NO_RECONNECT, f"within {timeouts.reconnect:.0f} s") from None
        reported = await self._request_hash(new_connection)
        self._reported_hash = self._cycle_hash = reported
        expected = binary.agent_hash if outcome is Outcome.UPDATED else None
        if expected is not None and reported != expected:
            raise CycleFailure(Reason.WRONG_HASH, f"expected {expected.hex()[:12]}, reported {reported.hex()[:12]}")
        return reported

    # -- recovery core -------------------------------------------------------------------------

    async def _load_recovery_core(self, connection: AgentConnection) -> None:
        script = self.options.recovery_core
        if script is None:
            raise CycleFailure(Reason.CORE_NOT_LOADED, "no recovery core script was given")
        core_hash = connection.session.push_core(script)
        await connection.flush()
        seconds = self.options.timeouts.core_load
        not_loaded = CycleFailure(Reason.CORE_NOT_LOADED, f"no core hash within {seconds:.0f} s")
        async for event in self._events(connection, seconds, not_loaded):
            if isinstance(event, CoreHashReported):
                if event.core_hash == core_hash:
                    self._record("core-loaded", core_hash.hex()[:12])
                    break
                raise CycleFailure(Reason.CORE_NOT_LOADED, "the agent reports another core hash or none")
        connection.session.send_core_ok()
        await connection.flush()

    async def _recovery_cycle(self, binary: AgentBinary, outcome: Outcome) -> bytes:
        connection = self._connection
        assert connection is not None
        await self._load_recovery_core(connection)
        await self._delay()

        token = secrets.token_hex(8)
        target = self.target

        def progress(done: int, total: int) -> None:
            if self.on_progress is not None:
                self.on_progress(target, done, total)

        faults = self.options.faults or CycleFaults()
        data = binary.data
        if faults.truncate is not None:
            data = data[: int(len(data) * faults.truncate)]
        if faults.download_altered:
            middle = len(data) // 2
            data = data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]
        download = Download(
            data,
            status=faults.download_status or 200,
            bytes_per_second=faults.download_bytes_per_second,
            on_progress=progress,
            before_last_chunk=faults.before_download_end,
        )
        server = faults.download_server or self.server
        server.downloads[token] = download
        url = server.download_url(token)
        file_hash = binary.file_hash
        if self.options.fault is Fault.WRONG_FINAL_HASH or faults.wrong_final_hash:
            file_hash = bytes(reversed(file_hash))
        connection.session.send_json(
            {
                "action": "agentupdate",
                "url": url,
                "hash": file_hash.hex(),
                "servertlshash": self.server.identity.tls_hash.hex(),
                "sessionid": "updatelab",
            }
        )
        await connection.flush()
        self._record("agentupdate-sent", url)

        try:
            refused = await self._wait_downloaded(connection, outcome)
        finally:
            server.downloads.pop(token, None)
            self._record("download-requests", str(download.requests))

        if refused:
            # The recovery core checks that it runs as a service before it downloads anything.
            self._reported_hash = self._cycle_hash = await self._request_hash(connection)
            return self._reported_hash
        if download.requests == 0:
            raise CycleFailure(Reason.DOWNLOAD_FAILED, "the agent reported a verified download that it never requested")
        return await self._follow_restart(connection, binary, outcome)

    async def _wait_downloaded(self, connection: AgentConnection, outcome: Outcome) -> bool:
        """Wait for agentupdatedownloaded; return True if the core refused as a console agent."""
        seconds = self.options.timeouts.download
        not_downloaded = CycleFailure(Reason.DOWNLOAD_FAILED, f"no agentupdatedownloaded within {seconds:.0f} s")
        async for event in self._events(connection, seconds, not_downloaded):
            if isinstance(event, UpdateDownloaded):
                self._record("downloaded", "the recovery core verified the download")
                if outcome is Outcome.CONSOLE_REFUSAL:
                    raise CycleFailure(Reason.NO_RESTART, "the core downloaded the update although the agent is not a service")
                return False
            if isinstance(event, ConsoleMessage) and "not an instance of" in event.text:
                if outcome is Outcome.CONSOLE_REFUSAL:
                    self._record("refused", "the recovery core does not update an agent that is not a service")
                    return True
                raise CycleFailure(Reason.DOWNLOAD_FAILED, event.text)
            if isinstance(event, ConsoleMessage) and any(phrase in event.text.lower() for phrase in _FINAL_DOWNLOAD_FAILURES):
                raise CycleFailure(Reason.DOWNLOAD_FAILED, event.text)
        raise AssertionError("_events ends only by raising")


#: Console messages after which the recovery core stops trying (1.1.55 recoverycore.js).
_FINAL_DOWNLOAD_FAILURES = ("giving up", "certificate does not match", "problem trying to download")


def _corrupting_filter(index: int) -> Callable[[int, bytes], bytes]:
    """Return a block filter that inverts the first byte of block `index`."""

    def corrupt(block_index: int, data: bytes) -> bytes:
        if block_index != index or not data:
            return data
        return bytes([data[0] ^ 0xFF]) + data[1:]

    return corrupt
