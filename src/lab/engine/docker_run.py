"""The Linux matrix: one container per target and mode, the agent installed as a service.

For each target and mode the runner creates a container on the run's internal network, copies
the agent and its .msh in, and installs it with the agent's own installer (``-fullinstall``).
It then runs the update cycles from the server on the network's gateway, checks every cycle
inside the container, saves the evidence, and removes the container. The run's state file is
rewritten after every step, and a later run removes what a crashed run left behind.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import re
import secrets
import shlex
import shutil
import signal
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from rich.console import Console
from rich.markup import escape

from lab import agents, images
from lab.agentfile import AgentBinary, agent_hash, format_msh, load_agent_binary, require_linux_machine
from lab.certs import generate_identity
from lab.display import Display, plain_printer, summary_table
from lab.engine.cycles import AgentDriver, CycleOptions, Mode, Outcome
from lab.engine.expectations import Expectations, judge_matrix
from lab.engine.local_run import agent_msh
from lab.engine.report import FAILED, CycleResult, Report, prepare_report_dir, write_report_on_interrupt
from lab.errors import ConfigError, LabError
from lab.faults.proxy import proxied
from lab.providers import docker as docker_provider
from lab.providers.docker import DockerProvider, DockerTarget
from lab.server.server import LabServer
from lab.services import ServiceManager, manager_for_name

logger = logging.getLogger(__name__)

SERVICE_NAME = "labagent"
INSTALL_DIR = f"/usr/local/mesh_services/{SERVICE_NAME}"
INSTALLED_BINARY = f"{INSTALL_DIR}/meshagent"
STAGING_BINARY = "/root/meshagent"
#: Run ids look like 20261204-205856-3f768e; the state files of older versions may differ, but never in this alphabet.
RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
T = TypeVar("T")
#: Seconds the installed agent has to show up as a process before the lab reports it missing.
AGENT_START_SECONDS = 10.0
NO_AGENT_RUNNING = "no agent running"


def state_root() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "updatelab" / "runs"


class RunState:
    """The state file of one run, rewritten after every step so a later run can clean up."""

    def __init__(self, run_id: str) -> None:
        self.path = state_root() / f"{run_id}.json"
        self.data: dict[str, Any] = {"run_id": run_id, "pid": os.getpid(), "status": "started", "steps": []}
        self.save()

    def step(self, target: str, step: str) -> None:
        self.data["steps"].append({"time": round(time.time(), 3), "target": target, "step": step})
        self.save()

    def finish(self, status: str) -> None:
        self.data["status"] = status
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps(self.data, indent=1))
        temporary.replace(self.path)


def recover_crashed_runs() -> list[str]:
    """Remove the containers and networks of runs whose process is gone, and list what was removed."""
    removed: list[str] = []
    folder = state_root()
    if not folder.is_dir():
        return removed
    for path in folder.glob("*.json"):
        try:
            state = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
            logger.warning("skipping the unreadable state file %s: %s", path, error)
            continue
        run_id = state.get("run_id") if isinstance(state, dict) else None
        if not isinstance(run_id, str) or not RUN_ID_PATTERN.fullmatch(run_id):
            # Cleaning with no valid run id would select every run's containers.
            logger.warning("skipping the state file %s: it names no valid run id", path)
            continue
        if state.get("status") == "cleaned" or _process_alive(state.get("pid")):
            continue
        removed += docker_provider.clean(run_id)
        state["status"] = "cleaned"
        path.write_text(json.dumps(state, indent=1))
    return removed


def mark_cleaned(run_id: str) -> None:
    """Set the state file of `run_id` to cleaned, if it exists."""
    path = state_root() / f"{run_id}.json"
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return
    state["status"] = "cleaned"
    path.write_text(json.dumps(state, indent=1))


def run_cleaning_up(coroutine: Coroutine[Any, Any, T], run_id: str) -> T:
    """Run `coroutine` with asyncio.run; after Ctrl-C or SIGTERM, remove the run's containers and networks.

    The coroutine's own teardown runs first. A second Ctrl-C can cut it short, so the removal is
    repeated here, one object after another, with SIGINT ignored until it is done.
    """
    try:
        return asyncio.run(coroutine)
    except KeyboardInterrupt:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            docker_provider.clean(run_id)
            mark_cleaned(run_id)
        finally:
            signal.signal(signal.SIGINT, previous)
        raise


def start_run(report_dir: Path | None, console: Console) -> tuple[str, Path]:
    """Choose a new run id and its report folder (`report_dir` or one under the state folder), check it, and print both."""
    run_id = time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)
    run_dir = report_dir or (state_root() / run_id)
    prepare_report_dir(run_dir)
    console.print(f"run {run_id}: report and evidence go to {escape(str(run_dir))}; after a crash, `updatelab clean --run-id {run_id}`")
    return run_id, run_dir


def fresh_evidence_dir(path: Path) -> Path:
    """Remove what an earlier run in the same report folder left in `path`, and return `path`.

    A report folder such as runs/lab-linux is reused by every run. Without this, files of an
    earlier run of the same target would lie beside the new ones as if they were current.
    """
    if path.is_dir():
        shutil.rmtree(path)
    return path


def _process_alive(pid: Any) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ContainerProbe:
    """The in-target checks of one container: service state, agent PID, installed binary."""

    def __init__(self, target: DockerTarget, manager: ServiceManager, mode: Mode, evidence_dir: Path) -> None:
        self.target = target
        self.manager = manager
        self.mode = mode
        self.evidence_dir = evidence_dir

    def snapshot(self) -> dict[str, Any]:
        return {"agent_pids": self.manager.agent_pids(SERVICE_NAME, INSTALLED_BINARY)}

    def verify(self, before: dict[str, Any], expected_hash: bytes, outcome: Outcome) -> dict[str, dict[str, Any]]:
        checks: dict[str, dict[str, Any]] = {}
        status = self.manager.status(SERVICE_NAME)
        checks["service-running"] = {"ok": status.running, "detail": f"{self.manager.name}: {status.state}"}

        pids = self.manager.agent_pids(SERVICE_NAME, INSTALLED_BINARY)
        old = before.get("agent_pids", [])
        if outcome is Outcome.UPDATED and self.mode is Mode.NATIVE:
            # A native update ends the agent process and the service manager starts a new one.
            checks["pid-changed"] = {"ok": bool(pids) and set(pids).isdisjoint(old), "detail": f"before {old}, after {pids}"}
        else:
            # The recovery core re-executes the agent in place (execv), and a rejected update
            # leaves the process alone, so the PID stays the same.
            checks["pid-kept"] = {"ok": bool(pids) and pids == old, "detail": f"before {old}, after {pids}"}

        try:
            installed = agent_hash(self.target.get_file(INSTALLED_BINARY))
            checks["installed-hash"] = {
                "ok": installed == expected_hash,
                "detail": f"{INSTALLED_BINARY} hashes to {installed.hex()[:12]}, expected {expected_hash.hex()[:12]}",
            }
        except FileNotFoundError:
            checks["installed-hash"] = {"ok": False, "detail": f"{INSTALLED_BINARY} is missing"}

        leftover = self.target.file_exists(INSTALLED_BINARY + ".update")
        if self.mode is Mode.NATIVE:
            checks["no-update-file"] = {"ok": not leftover, "detail": f"{INSTALLED_BINARY}.update {'exists' if leftover else 'is gone'}"}
        return checks

    def collect_evidence(self, cycle: int) -> list[str]:
        self.evidence_dir.mkdir(parents=True, exist_ok=True)
        saved = []
        for path in (f"{INSTALLED_BINARY}.log", f"{INSTALL_DIR}/meshagent.msh", *self.manager.service_files(SERVICE_NAME)):
            try:
                data = self.target.get_file(path)
            except FileNotFoundError:
                continue
            destination = self.evidence_dir / path.strip("/").replace("/", "_")
            destination.write_bytes(data)
            saved.append(str(destination))
        log_path = self.evidence_dir / "service-manager.log"
        try:
            log_path.write_text(self.manager.logs(SERVICE_NAME))
            saved.append(str(log_path))
        except LabError as error:
            log_path.write_text(f"could not read the service manager's log: {error}\n")
        return saved


@dataclasses.dataclass
class MatrixEntry:
    target: str
    mode: Mode


def binaries_for(agent: str, args: argparse.Namespace, explicit: list[AgentBinary]) -> list[AgentBinary]:
    """Return the binaries for a target: the given ones, or the package's `agent` file (its OS and CPU build)."""
    if args.binary:
        return explicit
    binaries = [load_agent_binary(agents.require_package(args.agent_version).binary(agent))]
    if args.alt_binary:
        binaries.append(explicit[1])
    return binaries


def _deploy(target: DockerTarget, binary: AgentBinary, msh: dict[str, str]) -> str:
    """Copy the agent in, install it as a service with its own installer, and return the installer output."""
    target.put_file(STAGING_BINARY, binary.data, mode=0o755)
    target.put_file(STAGING_BINARY + ".msh", format_msh(msh))
    command = f"cd /root && {shlex.quote(STAGING_BINARY)} -fullinstall --copy-msh=1 --meshServiceName={SERVICE_NAME} --logUpdate=1"
    result = target.run(command, timeout=120, check=False)
    return result.output


async def drive_cycles(server: LabServer, mesh_id: bytes, label: str, binaries: list[AgentBinary], options: CycleOptions,
                       report: Report, probe: ContainerProbe, display: Display) -> bool:
    """Run the update cycles of one deployed target and return True when one of them failed.

    The first cycle gets the target's evidence when no verdict collected it.
    """
    driver = AgentDriver(
        server=server, mesh_id=mesh_id, target=label, binaries=binaries, options=options, report=report,
        probe=probe, on_progress=display.transfer, on_event=display.event,
    )
    results = await driver.run()
    if results and not results[0].evidence:
        results[0].evidence = await asyncio.to_thread(probe.collect_evidence, 0)
    return any(not result.passed for result in results)


def record_lab_error(report: Report, display: Display, label: str, mode: Mode, error: LabError) -> None:
    """Record a failure of the lab itself (not of the agent) as the failed cycle 0 of `label`."""
    report.cycles.append(CycleResult(label, 0, str(mode), "", None, 0.0, FAILED, f"lab error: {error}"))
    report.add_event(label, None, "lab-error", str(error))
    display.event(label, None, "verdict", f"failed: {error}")


async def _run_entry(
    entry: MatrixEntry,
    provider: DockerProvider,
    server: LabServer,
    args: argparse.Namespace,
    options_by_mode: dict[Mode, CycleOptions],
    explicit: list[AgentBinary],
    report: Report,
    state: RunState,
    display: Display,
    run_dir: Path,
) -> None:
    label = f"{entry.target}/{entry.mode}"
    recipe = images.load_recipe(entry.target)
    binaries = binaries_for(recipe.agent, args, explicit)
    options = _container_options(options_by_mode[entry.mode])
    mesh_id = os.urandom(48)
    evidence_dir = fresh_evidence_dir(run_dir / entry.target / str(entry.mode))
    target: DockerTarget | None = None
    failed = False
    try:
        display.event(label, None, "provision", f"starting a {recipe.service_manager} container")
        target = await asyncio.to_thread(provider.create, entry.target)
        state.step(label, "created")
        manager = manager_for_name(recipe.service_manager, target)
        output = await asyncio.to_thread(_deploy, target, binaries[0], agent_msh(server, mesh_id, SERVICE_NAME))
        evidence_dir.mkdir(parents=True, exist_ok=True)
        (evidence_dir / "install.log").write_text(output)
        state.step(label, "deployed")
        status = await asyncio.to_thread(manager.status, SERVICE_NAME)
        display.event(label, None, "deploy", f"{binaries[0].path.name} installed; {manager.name} reports {status.state}")
        report.targets[label] = {"provider": "docker", "container": target.container.name, "service_manager": manager.name, "service_state": status.state}
        pids = await _wait_for_agent_process(manager)
        if not pids:
            # Report it now instead of waiting for a connection that cannot come.
            status = await asyncio.to_thread(manager.status, SERVICE_NAME)
            reason = (
                f"{NO_AGENT_RUNNING}: the installer finished, but no {INSTALLED_BINARY} process runs "
                f"after {AGENT_START_SECONDS:.0f} s ({manager.name} reports {status.state}; see install.log)"
            )
            probe = ContainerProbe(target, manager, entry.mode, evidence_dir)
            evidence = await asyncio.to_thread(probe.collect_evidence, 0)
            report.cycles.append(
                CycleResult(label, 0, str(entry.mode), binaries[0].agent_hash.hex(), None, 0.0, FAILED, reason,
                            evidence=evidence + [str(evidence_dir / "install.log")])
            )
            report.add_event(label, 0, "verdict", f"failed: {reason}")
            display.event(label, 0, "verdict", f"failed: {reason}")
            failed = True
            return

        probe = ContainerProbe(target, manager, entry.mode, evidence_dir)
        failed = await drive_cycles(server, mesh_id, label, binaries, options, report, probe, display)
        state.step(label, "cycles finished")
    except LabError as error:
        failed = True
        record_lab_error(report, display, label, entry.mode, error)
    finally:
        if target is not None:
            if failed and args.keep:
                display.event(label, None, "teardown", f"kept for inspection: docker exec -it {target.container.name} bash")
            else:
                await asyncio.to_thread(provider.destroy, target)
                state.step(label, "destroyed")
                display.event(label, None, "teardown", "container removed")


async def _wait_for_agent_process(manager: ServiceManager) -> list[int]:
    """Return the agent's PIDs once one runs, or an empty list after AGENT_START_SECONDS."""
    deadline = time.monotonic() + AGENT_START_SECONDS
    while True:
        pids = await asyncio.to_thread(manager.agent_pids, SERVICE_NAME, INSTALLED_BINARY)
        if pids or time.monotonic() > deadline:
            return pids
        await asyncio.sleep(0.5)


def _container_options(options: CycleOptions) -> CycleOptions:
    """Return a copy of `options` for one container, with a shorter wait for the first connection."""
    # A running service starts the agent within a few seconds. Waiting longer only delays the
    # verdict on targets where the installer left no agent running.
    timeouts = dataclasses.replace(options.timeouts, connect=min(options.timeouts.connect, 30.0))
    return dataclasses.replace(options, timeouts=timeouts)


async def _run_matrix(entries: list[MatrixEntry], args: argparse.Namespace, options_by_mode: dict[Mode, CycleOptions],
                      explicit: list[AgentBinary], report: Report, display: Display, run_dir: Path, run_id: str) -> None:
    provider = DockerProvider(run_id)
    provider.preflight()
    state = RunState(run_id)
    try:
        gateway = await asyncio.to_thread(lambda: provider.server_address)
        state.step("network", f"created {provider.network_name}, gateway {gateway}")
        identity = await asyncio.to_thread(generate_identity, [gateway])
        async with LabServer(identity, gateway, args.port) as server, proxied(
            server, getattr(args, "network", None), lambda kind, detail: report.add_event("proxy", None, "fault", f"{kind}: {detail}")
        ):
            report.settings["server"] = server.agent_url
            limit = asyncio.Semaphore(max(1, args.parallel))

            # The modes of one target run one after another, each in a fresh container that
            # reuses the target's container name. Different targets run in parallel.
            by_target: dict[str, list[MatrixEntry]] = {}
            for entry in entries:
                by_target.setdefault(entry.target, []).append(entry)

            async def bounded(target_entries: list[MatrixEntry]) -> None:
                async with limit:
                    for entry in target_entries:
                        await _run_entry(
                            entry, provider, server, args, options_by_mode, explicit, report, state, display, run_dir
                        )

            async with asyncio.TaskGroup() as group:
                for target_entries in by_target.values():
                    group.create_task(bounded(target_entries))
            report.protocol_errors += server.protocol_errors
    finally:
        await asyncio.to_thread(provider.destroy_all)
        state.finish("cleaned")


def run_docker_matrix(
    args: argparse.Namespace,
    options_by_mode: dict[Mode, CycleOptions],
    binaries: list[AgentBinary],
    report: Report,
    console: Console,
) -> int:
    """Run every target in every mode and return the exit status of ``updatelab run``."""
    names = parse_targets(args.targets, images.known_targets(), "target")
    expectations = Expectations.load(args.expectations) if args.expectations else None

    buildable = []
    for name in names:
        reason = images.unbuildable_reason(name)
        if reason:
            console.print(f"[yellow]{name}: skipped, {reason}[/yellow]")
            report.targets[name] = {"skipped": reason}
        else:
            buildable.append(name)

    removed = recover_crashed_runs()
    if removed:
        console.print(f"removed what an interrupted run left behind: {', '.join(removed)}")

    if not buildable:
        raise ConfigError("no target left to run: every target given was skipped (see above)")
    # Without --binary, each target gets its own build from the package, and only --alt-binary
    # is the user's. A build for another CPU would fail at the installer with "Exec format error".
    user_binaries = binaries if args.binary else binaries[1:]
    for name in buildable:
        machine = images.load_recipe(name).agent.removeprefix("meshagent_")
        for binary in user_binaries:
            require_linux_machine(binary, machine, f"target {name}")
    run_id, run_dir = start_run(args.report_dir, console)
    report.settings["run_id"] = run_id
    entries = [MatrixEntry(name, mode) for name in buildable for mode in options_by_mode]
    with Display(console) as display:
        for entry in entries:
            display.plan(f"{entry.target}/{entry.mode}", str(entry.mode), args.cycles)
        with write_report_on_interrupt(report, lambda: report.write(run_dir), plain_printer(console)):
            for name in buildable:
                with console.status(f"checking image {name} …") as status:
                    images.build(name, progress=lambda event, status=status: status.update(f"{event.target}: {event.step}: {event.message[:80]}"))
            run_cleaning_up(_run_matrix(entries, args, options_by_mode, binaries, report, display, run_dir, run_id), run_id)

    return finish_matrix(report, run_dir, expectations, [f"{e.target}/{e.mode}" for e in entries], console)


def parse_targets(text: str, known: list[str], kind: str) -> list[str]:
    """Split the comma-separated --targets `text`; raise ConfigError for a name not in `known`, or for none."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ConfigError(f"unknown {kind} {', '.join(unknown)}; known {kind}s: {', '.join(known)}")
    if not names:
        raise ConfigError(f"--targets {text!r} names no {kind}; known {kind}s: {', '.join(known)}")
    return names


def finish_matrix(report: Report, run_dir: Path, expectations: Expectations | None, labels: list[str], console: Console) -> int:
    """Print the summary, write the report, judge it against `expectations` and return the exit status.

    Without expectations, the status is 1 when any cycle failed or none ran. With them, it is 0
    exactly when every target and mode in `labels` matched its expectation.
    """
    console.print(summary_table(report))
    run_dir.mkdir(parents=True, exist_ok=True)
    for path in report.write(run_dir):
        console.print(f"wrote {escape(str(path))}")
    if expectations is None:
        return 1 if report.failed_cycles or not report.cycles else 0
    verdict = judge_matrix(report, expectations, labels)
    (run_dir / "expectations.json").write_text(json.dumps(verdict, indent=2))
    for line in verdict["lines"]:
        console.print(line)
    return 0 if verdict["ok"] else 1
