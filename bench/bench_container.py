"""Compare the lab's update cycles in a debian12-systemd container with MeshAgent's test/update-test.js.

One run measures, on the same machine and image:

1. the lab: ``python -m lab run --provider docker --targets debian12-systemd --mode native,recovery``,
   read from the report.json it writes (``CycleResult.duration`` of each passed cycle);
2. the restart floor: the agent installed by the lab, killed with SIGKILL, restarted by systemd
   after the installer's ``RestartSec=3``, timed from the server seeing the disconnect to the
   agent's next authenticated connection;
3. update-test.js, run by the meshagent binary itself in a fresh container of the same image,
   where it installs the agent as a service pointed at 127.0.0.1 and pushes updates in a loop.
   A cycle lasts from one ``==> CycleCount:`` line of its output to the next, each line
   timestamped on arrival;
4. optionally, the wall time of ``make lab-linux`` with the images already built.

update-test.js is not part of this repository and is never downloaded here. Pass it with
``--update-test PATH`` or the UPDATELAB_UPDATE_TEST variable. Without it the script prints how
to get it and still measures the lab and the floor.

The containers that this script creates carry the lab's labels with run ids ``bench-<hex>-floor``
and ``bench-<hex>-ut``, so ``updatelab clean --run-id ID`` finds them. The ``updatelab run`` it
starts labels its own containers. All are removed on exit, Ctrl-C and SIGTERM included.

Run: python bench/bench_container.py --update-test PATH [--cycles 5] [--update-test-cycles 2] [--lab-linux]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_native import describe_host  # bench/ is on sys.path when this file runs as a script
from lab import agents
from lab.agentfile import load_agent_binary
from lab.certs import generate_identity
from lab.engine.docker_run import INSTALLED_BINARY, SERVICE_NAME, _deploy
from lab.engine.local_run import agent_msh
from lab.providers.docker import DockerProvider, DockerTarget
from lab.server.server import LabServer
from lab.services import manager_for_name

TARGET = "debian12-systemd"
REPOSITORY = Path(__file__).resolve().parent.parent
UPDATE_TEST_VARIABLE = "UPDATELAB_UPDATE_TEST"
UPDATE_TEST_HINT = (
    "update-test.js is test/update-test.js of https://github.com/Ylianst/MeshAgent (Apache-2.0). Get it with\n"
    "  curl -fLo update-test.js https://raw.githubusercontent.com/Ylianst/MeshAgent/master/test/update-test.js\n"
    f"and pass it with --update-test PATH or {UPDATE_TEST_VARIABLE}=PATH."
)

#: The matrix of `make lab-linux` should finish within this many seconds.
MATRIX_TARGET_SECONDS = 300.0
#: Targets of the comparison: the lab at least this many times faster than update-test.js, and at
#: most this many times slower than the restart floor.
SPEEDUP_TARGET = 10.0
FLOOR_RATIO_TARGET = 1.2

# update-test.js prints "==> CycleCount: <done> of <count>" each time the agent reports its hash,
# once after the first connection and once after every update.
CYCLE_LINE = re.compile(r"==> CycleCount: (\d+) of (\d+)")


# -- the lab --------------------------------------------------------------------------------------


@dataclasses.dataclass
class LabFigures:
    wall_seconds: float
    exit_status: int
    cycle_seconds: dict[str, list[float]]
    #: Seconds from "disconnected" to the next "connected" of each passed native cycle.
    restart_gap_seconds: list[float]
    #: Seconds from one native "cycle-start" to the next, which adds the checks and the evidence.
    native_spacing_seconds: list[float]
    failures: list[str]
    log_path: Path


def wait_child(process: subprocess.Popen, max_seconds: float) -> int:
    """Wait for `process` and return its exit status, interrupting it after `max_seconds` or on Ctrl-C.

    SIGINT makes `updatelab run` remove its containers and network before it exits.
    """
    try:
        return process.wait(timeout=max_seconds)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGINT)
        return process.wait(timeout=120)
    except KeyboardInterrupt:
        # Ctrl-C in a terminal reaches the child too, but SIGTERM reaches only this process.
        process.send_signal(signal.SIGINT)
        process.wait(timeout=120)
        raise


def measure_lab(cycles: int, report_dir: Path, max_seconds: float) -> LabFigures:
    """Run the lab on TARGET in both modes as a user would and read the durations from report.json."""
    command = [
        sys.executable, "-m", "lab", "run", "--provider", "docker", "--targets", TARGET,
        "--mode", "native,recovery", "--cycles", str(cycles), "--report-dir", str(report_dir),
    ]
    log_path = report_dir / "lab-run.log"
    report_dir.mkdir(parents=True, exist_ok=True)
    print(f"lab: {shlex.join(command)}", flush=True)
    started = time.monotonic()
    with log_path.open("w") as log:
        process = subprocess.Popen(command, cwd=REPOSITORY, stdout=log, stderr=subprocess.STDOUT)
        exit_status = wait_child(process, max_seconds)
    wall = time.monotonic() - started

    figures = LabFigures(wall, exit_status, {"native": [], "recovery": []}, [], [], [], log_path)
    try:
        report = json.loads((report_dir / "report.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        figures.failures.append(f"no readable report.json in {report_dir}: {error}; see {log_path}")
        return figures

    for cycle in report["cycles"]:
        if cycle["verdict"] != "passed":
            figures.failures.append(f"{cycle['target']} cycle {cycle['index']}: {cycle['reason']}")
            continue
        figures.cycle_seconds.setdefault(cycle["mode"], []).append(cycle["duration"])

    passed = {(cycle["target"], cycle["index"]) for cycle in report["cycles"] if cycle["verdict"] == "passed"}
    disconnected: dict[tuple[str, int], float] = {}
    previous_start: float | None = None
    for entry in report["timeline"]:
        key = (entry["target"], entry["cycle"])
        if not entry["target"].endswith("/native") or key not in passed:
            continue
        if entry["kind"] == "cycle-start":
            if previous_start is not None:
                figures.native_spacing_seconds.append(entry["time"] - previous_start)
            previous_start = entry["time"]
        if entry["kind"] == "disconnected":
            disconnected[key] = entry["time"]
        elif entry["kind"] == "connected" and key in disconnected:
            figures.restart_gap_seconds.append(entry["time"] - disconnected.pop(key))
    return figures


# -- the restart floor ----------------------------------------------------------------------------


async def measure_floor_async(provider: DockerProvider, samples: int) -> list[float]:
    """Kill the installed agent `samples` times and time each disconnect-to-reconnect."""
    binary = load_agent_binary(agents.require_package(agents.DEFAULT_VERSION).binary())
    gateway = await asyncio.to_thread(lambda: provider.server_address)
    identity = await asyncio.to_thread(generate_identity, [gateway])
    mesh_id = os.urandom(48)
    gaps: list[float] = []
    async with LabServer(identity, gateway, 0) as server:
        target = await asyncio.to_thread(provider.create, TARGET)
        manager = manager_for_name(target.service_manager, target)
        await asyncio.to_thread(_deploy, target, binary, agent_msh(server, mesh_id, SERVICE_NAME))
        connection = await server.next_connection(mesh_id, 60)
        for _ in range(samples):
            pids = await asyncio.to_thread(manager.agent_pids, SERVICE_NAME, INSTALLED_BINARY)
            if not pids:
                raise RuntimeError(f"no agent process of {INSTALLED_BINARY} is running in {target.container.name}")
            # SIGKILL is an unclean exit, so Restart=on-failure applies and systemd waits RestartSec.
            await asyncio.to_thread(target.run, ["kill", "-KILL", *map(str, pids)])
            if not await connection.wait_closed(30):
                raise RuntimeError("the server did not see the agent disconnect within 30 s of SIGKILL")
            closed_at = time.monotonic()
            connection = await server.next_connection(mesh_id, 60)
            gaps.append(time.monotonic() - closed_at)
    return gaps


def measure_floor(run_id: str, samples: int) -> list[float]:
    provider = DockerProvider(run_id)
    try:
        return asyncio.run(measure_floor_async(provider, samples))
    finally:
        provider.destroy_all()


# -- update-test.js -------------------------------------------------------------------------------


@dataclasses.dataclass
class UpdateTestFigures:
    #: (seconds since the command started, line) for every output line, split at \r and \n.
    lines: list[tuple[float, str]]
    exit_status: int | None
    timed_out: bool
    cycle_seconds: list[float]
    #: Seconds from "Performing Update" to "Agent Disconnected..." of each cycle.
    transfer_seconds: list[float]
    #: Seconds from "Agent Disconnected..." to the next CycleCount line.
    restart_gap_seconds: list[float]


def parse_update_test_output(lines: list[tuple[float, str]]) -> tuple[list[float], list[float], list[float]]:
    """Return cycle, transfer and restart-gap seconds from timestamped update-test.js output."""
    cycles: list[float] = []
    transfers: list[float] = []
    gaps: list[float] = []
    previous_cycle_line: float | None = None
    update_started: float | None = None
    disconnected: float | None = None
    for stamp, text in lines:
        if text.startswith("==> Performing Update"):
            update_started = stamp
        elif text.startswith("Agent Disconnected"):
            disconnected = stamp
            if update_started is not None:
                transfers.append(stamp - update_started)
                update_started = None
        elif CYCLE_LINE.search(text):
            if previous_cycle_line is not None:
                cycles.append(stamp - previous_cycle_line)
            if disconnected is not None:
                gaps.append(stamp - disconnected)
                disconnected = None
            previous_cycle_line = stamp
    return cycles, transfers, gaps


def stream_exec(target: DockerTarget, command: str, seconds: float, echo: bool) -> tuple[list[tuple[float, str]], int | None, bool]:
    """Run `command` in `target` on a terminal and timestamp each output line as it arrives.

    A terminal keeps the agent's console output unbuffered. Returns the lines, the exit status
    (None if the command still ran at the deadline) and whether the deadline passed. The command
    runs under coreutils `timeout`, so it ends inside the container as well.
    """
    wrapped = f"exec timeout -k 5 {int(seconds)} /bin/sh -c {shlex.quote(command)}"
    api = target.container.client.api
    exec_id = api.exec_create(target.container.id, ["/bin/sh", "-c", wrapped], stdout=True, stderr=True, tty=True)["Id"]
    raw = api.exec_start(exec_id, socket=True, tty=True)
    sock = getattr(raw, "_sock", raw)
    started = time.monotonic()
    deadline = started + seconds + 10
    lines: list[tuple[float, str]] = []
    pending = ""
    timed_out = False
    try:
        while True:
            if time.monotonic() > deadline:
                timed_out = True
                break
            sock.settimeout(0.5)
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, socket.timeout):
                if not api.exec_inspect(exec_id).get("Running"):
                    break
                continue
            if not chunk:
                break
            stamp = time.monotonic() - started
            pending += chunk.decode("utf-8", errors="replace")
            *complete, pending = re.split(r"[\r\n]", pending)
            for text in complete:
                text = text.strip()
                if not text:
                    continue
                # The transfers print the same percentage many times a second, so keep the first of each run.
                if lines and text == lines[-1][1]:
                    continue
                lines.append((stamp, text))
                if echo:
                    print(f"  {stamp:8.3f} {text[:140]}", flush=True)
    finally:
        raw.close()
    if pending.strip():
        lines.append((time.monotonic() - started, pending.strip()))
    state = api.exec_inspect(exec_id)
    exit_status = None if state.get("Running") else state.get("ExitCode")
    return lines, exit_status, timed_out or exit_status == 124


def measure_update_test(run_id: str, script: Path, cycles: int, max_seconds: float, recovery: bool, echo: bool) -> UpdateTestFigures:
    """Run update-test.js in a fresh TARGET container; it installs the agent and updates it `cycles` times."""
    package = agents.require_package(agents.DEFAULT_VERSION)
    binary = package.binary()
    provider = DockerProvider(run_id)
    try:
        target = provider.create(TARGET)
        target.put_file("/root/meshagent", binary.read_bytes(), mode=0o755)
        target.put_file("/root/update-test.js", script.read_bytes())
        options = f"--CycleCount={cycles} --MinimumDelay=0 --MaximumDelay=0"
        if recovery:
            target.put_file("/root/recoverycore.js", (binary.parent / "recoverycore.js").read_bytes())
            options += " --JS --RecoveryCore=/root"
        # The script listens on port 9250 and the .msh it writes points the agent at
        # wss://127.0.0.1:9250, so the agent's traffic stays on the container's loopback.
        lines, exit_status, timed_out = stream_exec(target, f"cd /root && ./meshagent update-test.js {options}", max_seconds, echo)
    finally:
        provider.destroy_all()
    cycle_seconds, transfer_seconds, gaps = parse_update_test_output(lines)
    return UpdateTestFigures(lines, exit_status, timed_out, cycle_seconds, transfer_seconds, gaps)


# -- make lab-linux -------------------------------------------------------------------------------


def measure_lab_linux(report_dir: Path, max_seconds: float) -> tuple[float, int, Path]:
    """Run `make lab-linux` into `report_dir`; return its wall time, exit status and log path."""
    log_path = report_dir / "make-lab-linux.log"
    report_dir.mkdir(parents=True, exist_ok=True)
    command = ["make", "-C", str(REPOSITORY), "lab-linux", f"REPORT_DIR={report_dir}", f"PYTHON={sys.executable}"]
    print(f"matrix: {shlex.join(command)}", flush=True)
    started = time.monotonic()
    with log_path.open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        exit_status = wait_child(process, max_seconds)
    return time.monotonic() - started, exit_status, log_path


# -- main -----------------------------------------------------------------------------------------


def print_ratio(name: str, value: float | None, target: str, met: bool | None) -> None:
    if value is None:
        print(f"{name:<48}{'-':>8}  ({target}; not measured)")
        return
    verdict = "met" if met else "NOT met"
    print(f"{name:<48}{value:>8.2f}  ({target}: {verdict})")


def raise_keyboard_interrupt(signal_number: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--update-test", type=Path, default=os.environ.get(UPDATE_TEST_VARIABLE) or None,
                        help=f"path of MeshAgent's test/update-test.js (default: ${UPDATE_TEST_VARIABLE})")
    parser.add_argument("--cycles", type=int, default=5, help="lab cycles per mode (default: 5, 1 to 20)")
    parser.add_argument("--update-test-cycles", type=int, default=2,
                        help="update-test.js cycles; each native one takes about 45 s (default: 2, 1 to 10)")
    parser.add_argument("--update-test-seconds", type=float, default=400,
                        help="stop update-test.js after this many seconds (default: 400)")
    parser.add_argument("--update-test-recovery", action="store_true", help="also run update-test.js with --JS (recovery core)")
    parser.add_argument("--floor-samples", type=int, default=5, help="SIGKILL restarts timed for the floor (default: 5, 1 to 20)")
    parser.add_argument("--lab-linux", action="store_true", help="also time `make lab-linux` (about 3 minutes with built images)")
    parser.add_argument("--keep-output", type=Path, help="write the reports and logs here and keep them (default: a temporary folder, kept only when something failed)")
    parser.add_argument("--quiet", action="store_true", help="do not echo update-test.js output")
    args = parser.parse_args()
    if not 1 <= args.cycles <= 20 or not 1 <= args.update_test_cycles <= 10 or not 1 <= args.floor_samples <= 20:
        parser.error("--cycles and --floor-samples must be 1 to 20, --update-test-cycles 1 to 10")
    if args.update_test is not None and not args.update_test.is_file():
        parser.error(f"update-test.js not found at {args.update_test}")

    signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
    binary = load_agent_binary(agents.require_package(agents.DEFAULT_VERSION).binary())
    run_id = "bench-" + secrets.token_hex(3)
    print(f"date: {time.strftime('%Y-%m-%d %H:%M %Z')}")
    print(f"host: {describe_host()}")
    print(f"agent: meshcentral {agents.DEFAULT_VERSION} {binary.path.name}, {binary.size} bytes, hash {binary.agent_hash.hex()[:12]}")
    print(f"target: {TARGET}; bench containers carry updatelab.run={run_id}-*", flush=True)

    output = args.keep_output or Path(tempfile.mkdtemp(prefix="updatelab-bench-"))
    try:
        status = run_bench(args, output, run_id)
    except KeyboardInterrupt:
        print("interrupted; the bench containers were removed")
        status = 130
    if status == 0 and args.keep_output is None:
        shutil.rmtree(output, ignore_errors=True)
    else:
        print(f"reports and logs: {output}")
    return status


def run_bench(args: argparse.Namespace, output: Path, run_id: str) -> int:
    failures: list[str] = []

    lab = measure_lab(args.cycles, output / "lab", max_seconds=60 + args.cycles * 120)
    failures += lab.failures
    if lab.exit_status != 0 and not lab.failures:
        failures.append(f"updatelab run exited with status {lab.exit_status}; see {lab.log_path}")

    print(f"floor: {args.floor_samples} SIGKILL restarts of the installed agent", flush=True)
    floor = measure_floor(f"{run_id}-floor", args.floor_samples)

    update_test: UpdateTestFigures | None = None
    update_test_recovery: UpdateTestFigures | None = None
    if args.update_test is None:
        print("update-test.js: not given, so it is not measured.")
        print(UPDATE_TEST_HINT)
    else:
        print(f"update-test.js: {args.update_test_cycles} native cycles in a fresh {TARGET} container", flush=True)
        update_test = measure_update_test(
            f"{run_id}-ut", args.update_test, args.update_test_cycles, args.update_test_seconds, False, not args.quiet
        )
        if args.update_test_recovery:
            print(f"update-test.js --JS: {args.update_test_cycles} recovery cycles in a fresh {TARGET} container", flush=True)
            update_test_recovery = measure_update_test(
                f"{run_id}-utjs", args.update_test, args.update_test_cycles, args.update_test_seconds, True, not args.quiet
            )

    matrix: tuple[float, int, Path] | None = None
    if args.lab_linux:
        matrix = measure_lab_linux(output / "lab-linux", max_seconds=1800)

    print()
    print(f"{'figure':<48}{'n':>4}{'median s':>10}{'min s':>8}{'max s':>8}")
    rows = [
        ("lab native s/cycle", lab.cycle_seconds.get("native", [])),
        ("lab recovery s/cycle", lab.cycle_seconds.get("recovery", [])),
        ("lab native cycle start to next cycle start", lab.native_spacing_seconds),
        ("lab native disconnect to reconnect", lab.restart_gap_seconds),
        ("floor: SIGKILL disconnect to reconnect", floor),
    ]
    for name, figures in (("update-test.js native", update_test), ("update-test.js --JS", update_test_recovery)):
        if figures is not None:
            rows += [
                (f"{name} s/cycle", figures.cycle_seconds),
                (f"{name} update to disconnect", figures.transfer_seconds),
                (f"{name} disconnect to reconnect", figures.restart_gap_seconds),
            ]
    for name, values in rows:
        if values:
            print(f"{name:<48}{len(values):>4}{statistics.median(values):>10.3f}{min(values):>8.3f}{max(values):>8.3f}")
        else:
            print(f"{name:<48}{0:>4}{'-':>10}")
    print(f"{'lab run wall time, both modes (s)':<48}{'':>4}{lab.wall_seconds:>10.1f}")
    if matrix is not None:
        print(f"{'make lab-linux wall time (s)':<48}{'':>4}{matrix[0]:>10.1f}  exit status {matrix[1]}, log {matrix[2]}")

    print()
    lab_native = lab.cycle_seconds.get("native", [])
    lab_median = statistics.median(lab_native) if lab_native else None
    speedup = None
    if update_test is not None and update_test.cycle_seconds and lab_median:
        speedup = statistics.median(update_test.cycle_seconds) / lab_median
    print_ratio("update-test.js native / lab native", speedup, f"target >= {SPEEDUP_TARGET:.0f}",
                speedup is not None and speedup >= SPEEDUP_TARGET)
    floor_ratio = lab_median / statistics.median(floor) if lab_median and floor else None
    print_ratio("lab native / restart floor", floor_ratio, f"target <= {FLOOR_RATIO_TARGET}",
                floor_ratio is not None and floor_ratio <= FLOOR_RATIO_TARGET)
    matrix_ratio = matrix[0] / MATRIX_TARGET_SECONDS if matrix else None
    print_ratio("make lab-linux wall time / 300 s", matrix_ratio, "target <= 1", matrix_ratio is not None and matrix_ratio <= 1)

    for name, figures in (("update-test.js", update_test), ("update-test.js --JS", update_test_recovery)):
        if figures is None:
            continue
        if figures.timed_out or not figures.cycle_seconds:
            state = "timed out" if figures.timed_out else f"exited with status {figures.exit_status}"
            failures.append(f"{name} {state} after {len(figures.cycle_seconds)} cycles")
            print(f"\n{name}: last output lines")
            for stamp, text in figures.lines[-15:]:
                print(f"  {stamp:8.3f} {text[:160]}")
    if matrix is not None and matrix[1] != 0:
        failures.append(f"make lab-linux exited with status {matrix[1]}; see {matrix[2]}")
    for failure in failures:
        print(f"failed: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
