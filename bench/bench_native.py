"""Measure native update cycles of the real agent at MeshCentral's block size and at update-test.js's pacing.

Each configuration runs the same agent binary through the local provider (console mode on this
host, server on 127.0.0.1). The configurations alternate round by round (default, pacing,
compressed, default, pacing, ...), so drift on the machine affects them alike. For each one the
script prints the median seconds per cycle and the median transfer time, where the transfer
runs from the timeline's transfer-start entry to its transfer-done entry, and the throughput of
the update payload in MB/s (10^6 bytes per second).

Run: python bench/bench_native.py [--rounds 4] [--cycles 5]
The agents must be cached first: updatelab agents fetch
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import platform
import statistics
import sys
import time

from lab import agents
from lab.agentfile import AgentBinary, load_agent_binary
from lab.engine.cycles import CycleOptions
from lab.engine.local_run import run_local
from lab.engine.report import Report
from lab.protocol.commands import MAX_BLOCK_SIZE

#: MeshAgent's test/update-test.js sends a first block of 16 KiB, then blocks of 4 KiB. MeshCentral's
#: meshagent.js sends blocks of 65531 bytes (MAX_BLOCK_SIZE).
PACING_FIRST_BLOCK = 16384
PACING_BLOCK = 4096


@dataclasses.dataclass(frozen=True)
class Configuration:
    name: str
    block_size: int
    first_block_size: int | None
    compress: bool | None  # None compresses when the agent advertises capability 0x100


CONFIGURATIONS = (
    Configuration("default", MAX_BLOCK_SIZE, None, False),
    Configuration("pacing", PACING_BLOCK, PACING_FIRST_BLOCK, False),
    Configuration("compressed", MAX_BLOCK_SIZE, None, None),
)


@dataclasses.dataclass
class Samples:
    cycle_seconds: list[float] = dataclasses.field(default_factory=list)
    transfer_seconds: list[float] = dataclasses.field(default_factory=list)
    payload_bytes: list[int] = dataclasses.field(default_factory=list)
    failures: list[str] = dataclasses.field(default_factory=list)


def run_round(binary: AgentBinary, configuration: Configuration, cycles: int, samples: Samples) -> None:
    """Run `cycles` cycles of one configuration on a fresh agent and add their figures to `samples`."""
    options = CycleOptions(
        count=cycles,
        block_size=configuration.block_size,
        first_block_size=configuration.first_block_size,
        compress=configuration.compress,
    )
    report = asyncio.run(run_local([binary], options, Report()))

    for cycle in report.cycles:
        if not cycle.passed:
            samples.failures.append(f"cycle {cycle.index}: {cycle.reason}")
            continue
        samples.cycle_seconds.append(cycle.duration)

        timeline = [entry for entry in report.timeline if entry.cycle == cycle.index]
        start = next(entry for entry in timeline if entry.kind == "transfer-start")
        done = next(entry for entry in timeline if entry.kind == "transfer-done")
        samples.transfer_seconds.append(done.time - start.time)
        # The detail starts with the payload size: "<bytes> bytes in blocks of <size>".
        samples.payload_bytes.append(int(start.detail.split()[0]))


def describe_host() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def print_results(results: dict[str, Samples]) -> None:
    print(f"{'configuration':<14}{'cycles':>7}{'median s/cycle':>16}{'median transfer s':>19}{'payload MB':>12}{'MB/s':>8}")
    medians: dict[str, tuple[float, float]] = {}
    for configuration in CONFIGURATIONS:
        samples = results[configuration.name]
        if not samples.cycle_seconds:
            print(f"{configuration.name:<14}{0:>7}  no cycle passed")
            continue
        cycle_median = statistics.median(samples.cycle_seconds)
        transfer_median = statistics.median(samples.transfer_seconds)
        payload = statistics.median(samples.payload_bytes)
        # The timeline stamps are rounded to 1 ms, so a transfer can show as 0 s.
        throughput = f"{payload / transfer_median / 1e6:8.1f}" if transfer_median > 0 else f"{'-':>8}"
        medians[configuration.name] = (cycle_median, transfer_median)
        print(
            f"{configuration.name:<14}{len(samples.cycle_seconds):>7}{cycle_median:>16.3f}"
            f"{transfer_median:>19.3f}{payload / 1e6:>12.2f}{throughput}"
        )

    if "default" in medians and "pacing" in medians:
        (default_cycle, default_transfer), (pacing_cycle, pacing_transfer) = medians["default"], medians["pacing"]
        print(f"pacing/default cycle time:    {pacing_cycle / default_cycle:.2f}")
        if default_transfer > 0:
            print(f"pacing/default transfer time: {pacing_transfer / default_transfer:.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4, help="rounds; each runs every configuration once (default: 4, max 20)")
    parser.add_argument("--cycles", type=int, default=5, help="cycles per configuration and round (default: 5, max 20)")
    parser.add_argument("--version", default=agents.DEFAULT_VERSION, help="meshcentral package of the agent binary")
    parser.add_argument("--max-seconds", type=float, default=1200, help="start no new round after this many seconds (default: 1200)")
    args = parser.parse_args()
    if not 1 <= args.rounds <= 20 or not 1 <= args.cycles <= 20:
        parser.error("--rounds and --cycles must each be between 1 and 20")

    binary = load_agent_binary(agents.require_package(args.version).binary())
    print(f"host: {describe_host()}")
    print(f"agent: meshcentral {args.version} {binary.path.name}, {binary.size} bytes, hash {binary.agent_hash.hex()[:12]}")
    print(f"{args.rounds} rounds x {args.cycles} cycles per configuration, interleaved")

    results = {configuration.name: Samples() for configuration in CONFIGURATIONS}
    started = time.monotonic()
    for round_index in range(args.rounds):
        if time.monotonic() - started > args.max_seconds:
            print(f"stopped after {round_index} rounds: --max-seconds {args.max_seconds:.0f} reached")
            break
        for configuration in CONFIGURATIONS:
            run_round(binary, configuration, args.cycles, results[configuration.name])
        print(f"round {round_index + 1} done at {time.monotonic() - started:.0f} s", flush=True)

    print()
    print_results(results)
    failures = [f"{name} {failure}" for name, samples in results.items() for failure in samples.failures]
    for failure in failures:
        print(f"failed: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
