"""Run fault scenarios against the real agent in containers and judge what it did.

Each scenario gets its own container, its own lab server on the run network's gateway and, for
network faults, its own proxy. The runner installs the `from` agent as a service, arms the fault
and runs the faulted cycles towards the `to` agent. It then observes where the agent ended up:
which binary it reports, whether the service runs, whether an .update file stayed behind. If the
scenario expects it, the fault is then undone and one clean cycle must succeed.

A watchdog bounds every scenario, so no scenario can hang the lab. When it fires, the runner
records how long the agent had been silent and what its process was doing (state, kernel wait
channel, the files in its folder). It then saves the evidence and removes the container.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from lab import agents, images
from lab.agentfile import AgentBinary, load_agent_binary
from lab.certs import ServerIdentity, generate_identity
from lab.display import Display, plain_printer
from lab.engine import docker_run
from lab.engine.cycles import AgentDriver, CycleFailure, CycleFaults, CycleOptions, Mode, Reason, Timeouts
from lab.engine.cycles import Outcome as CycleOutcome
from lab.engine.local_run import agent_msh
from lab.engine.report import FAILED, PASSED, CycleResult, Report, add_interruption_case, replace_file, write_report_on_interrupt
from lab.errors import LabError
from lab.protocol.commands import MAX_BLOCK_SIZE
from lab.protocol.session import NativeUpdate
from lab.faults.proxy import FaultProxy, ProxyFaults
from lab.faults.scenario import Outcome, Scenario, Step
from lab.providers.base import ExecResult
from lab.providers.docker import DockerProvider, DockerTarget
from lab.server.server import LabServer
from lab.services import ServiceManager, manager_for_name

logger = logging.getLogger(__name__)

SERVICE_NAME = docker_run.SERVICE_NAME
INSTALL_DIR = docker_run.INSTALL_DIR
INSTALLED_BINARY = docker_run.INSTALLED_BINARY
#: Parent of the install folder; faults that need a small or read-only filesystem mount a tmpfs here.
MESH_ROOT = str(Path(INSTALL_DIR).parent)
FILLER = f"{MESH_ROOT}/updatelab-filler"
APPEND_BYTE_TEXT = f"one byte appended to {INSTALLED_BINARY} while the service was stopped"

#: Shorter waits than a matrix run: a fault scenario should reach its verdict quickly.
SCENARIO_TIMEOUTS = Timeouts(
    connect=30, hash_reply=15, block_ack=20, restart=20, reconnect=45, rejection=5, core_load=20, download=100
)

#: An agent that sends nothing for this many seconds, while its process runs, counts as hung.
HANG_SILENCE = 30.0

#: Timeline entries that the lab writes itself; every other entry shows the agent doing something.
_LAB_EVENTS = {"cycle-start", "transfer-start", "agentupdate-sent", "download-requests", "verdict", "offline", "fault"}
#: Faults that take effect when the recovery core requests the download.
_DOWNLOAD_FAULTS = {"altered-download", "http-error", "slow-download"}
#: Faults built into the update itself.
_UPDATE_FAULTS = {"corrupt-block", "wrong-final-hash", "truncated-binary", "proxy-slow"}

_EVENT_STEPS = {
    "cycle-start": Step.BEFORE_CYCLE,
    "transfer-start": Step.TRANSFER_START,
    "transfer-done": Step.HASH_SENT,
    "agentupdate-sent": Step.AGENTUPDATE_SENT,
    "downloaded": Step.DOWNLOADED,
}


@dataclasses.dataclass
class ScenarioResult:
    """The expected outcomes, the observations and the verdict of one scenario."""

    name: str
    file: str
    description: str
    target: str
    mode: str
    from_version: str
    to_version: str
    fault: str
    expected: list[str]
    observed: dict[str, str] = dataclasses.field(default_factory=dict)
    missing: list[str] = dataclasses.field(default_factory=list)
    verdict: str = FAILED
    reason: str = ""
    known_failure: str | None = None
    #: What showed that the fault took effect, such as a proxy reset or a target command; None if it never did.
    fault_fired: str | None = None
    hung: dict[str, Any] | None = None
    duration: float = 0.0
    cycles: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    evidence: list[str] = dataclasses.field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.verdict == PASSED


class ScenarioError(LabError):
    """A scenario cannot run as written, for a reason found only at run time."""


def agent_binary(version: str, appended: int, architecture: str) -> AgentBinary:
    """Return the agent of meshcentral `version` for `architecture`, with `appended` zero bytes added."""
    binary = load_agent_binary(agents.require_package(version).binary(architecture))
    if appended:
        binary = dataclasses.replace(binary, data=binary.data + bytes(appended))
    return binary


def container_options(scenario: Scenario) -> tuple[dict[str, str], tuple[str, ...]]:
    """Return the extra tmpfs mounts and capabilities that the scenario's fault needs."""
    kind = scenario.fault.kind
    tmpfs: dict[str, str] = {}
    caps: list[str] = []
    if kind in ("disk-full", "immutable-binary"):
        # Docker mounts a tmpfs noexec by default, and the agent runs from here.
        tmpfs[MESH_ROOT] = "size=32m,exec,mode=755"
    if kind == "read-only-install-dir":
        caps.append("SYS_ADMIN")  # for the read-only bind mount made inside the container
    if kind == "immutable-binary":
        caps.append("LINUX_IMMUTABLE")
    if kind == "noexec-tmp":
        tmpfs["/tmp"] = "size=64m,noexec,nosuid,nodev,mode=1777"
    return tmpfs, tuple(caps)


class ScenarioRun:
    """One scenario from container start to teardown."""

    def __init__(
        self,
        scenario: Scenario,
        *,
        provider: DockerProvider,
        gateway: str,
        identity: ServerIdentity,
        other_identity: Callable[[], ServerIdentity],
        report: Report,
        display: Display,
        run_dir: Path,
        state: docker_run.RunState,
        keep: bool,
    ) -> None:
        self.scenario = scenario
        self.provider = provider
        self.gateway = gateway
        self.identity = identity
        self.other_identity = other_identity
        self.report = report
        self.display = display
        self.evidence_dir = docker_run.fresh_evidence_dir(run_dir / scenario.name)
        self.state = state
        self.keep = keep
        self.label = scenario.name
        self.result = ScenarioResult(
            name=scenario.name,
            file=str(scenario.path),
            description=scenario.description,
            target=scenario.target,
            mode=scenario.mode,
            from_version=str(scenario.from_version),
            to_version=str(scenario.to_version),
            fault=scenario.fault.describe(),
            expected=[str(outcome) for outcome in scenario.outcomes],
            known_failure=scenario.known_failure.evidence if scenario.known_failure else None,
        )
        self.target: DockerTarget | None = None
        self.manager: ServiceManager | None = None
        self.server: LabServer | None = None
        self.proxy: FaultProxy | None = None
        self.download_relay: FaultProxy | None = None
        self.driver: AgentDriver | None = None
        self._armed = False
        self._triggered = False
        self._last_agent_activity = time.monotonic()
        self._last_step = "starting"
        self._background: set[asyncio.Task[None]] = set()

    # -- timeline ------------------------------------------------------------------------------

    def record(self, kind: str, detail: str = "", cycle: int | None = None) -> None:
        self.report.add_event(self.label, cycle, kind, detail)
        self.display.event(self.label, cycle, kind, detail)

    def _on_event(self, target: str, cycle: int | None, kind: str, detail: str) -> None:
        self.display.event(target, cycle, kind, detail)
        if kind not in _LAB_EVENTS:
            self._last_agent_activity = time.monotonic()
            self._last_step = f"{kind}: {detail}"[:160]
        if kind == "download-requests" and detail != "0" and self.scenario.fault.kind in _DOWNLOAD_FAULTS:
            self._fault_took_effect(f"the download was requested {detail} time(s)")
        if kind in ("transfer-start", "agentupdate-sent") and self.scenario.fault.kind in _UPDATE_FAULTS:
            self._fault_took_effect(f"{self.scenario.fault.kind} applied to the update")
        step = _EVENT_STEPS.get(kind)
        if step is not None:
            self._trigger(step)

    def _fault_took_effect(self, detail: str, *, armed_only: bool = True) -> None:
        if (self._armed or not armed_only) and self.result.fault_fired is None:
            self.result.fault_fired = detail

    def _proxy_event(self, kind: str, detail: str) -> None:
        self.record("fault", f"{kind}: {detail}")
        if kind in ("proxy-reset", "proxy-stall", "proxy-drop"):
            # A byte-count fault may hit the first connection, before any cycle is armed.
            self._fault_took_effect(f"{kind}: {detail}", armed_only=False)

    def _on_progress(self, target: str, done: int, total: int) -> None:
        self.display.transfer(target, done, total)
        self._last_agent_activity = time.monotonic()
        self._last_step = f"transfer: {done} of {total} bytes"
        if total and 2 * done >= total:
            self._trigger(Step.TRANSFER_HALF if self.scenario.mode == "native" else Step.DOWNLOAD_HALF)

    def _trigger(self, step: Step) -> None:
        if not self._armed or self._triggered:
            return
        fault = self.scenario.fault
        if fault.kind == "kill-agent" and fault.step is Step.HASH_SENT and step is Step.TRANSFER_DONE:
            # The agent swaps within milliseconds of the final hash, faster than a command
            # started from the host. A watcher started in the target before the hash goes out
            # kills the agent the moment the rename removed the .update file.
            self._triggered = True
            self._kill_after_swap()
        elif step is fault.step:
            self._triggered = True
            self.inject(step)

    def _kill_after_swap(self) -> None:
        assert self.target is not None and self.manager is not None
        pids = " ".join(map(str, self.manager.agent_pids(SERVICE_NAME, INSTALLED_BINARY)))
        watcher = (
            f"end=$(( $(date +%s) + 20 )); while [ -e {INSTALLED_BINARY}.update ] && [ $(date +%s) -lt $end ]; do :; done; "
            f"kill -9 {pids}; echo killed {pids} > /root/updatelab-kill.log"
        )
        self.target.run(f"nohup sh -c {shlex.quote(watcher)} >/dev/null 2>&1 &", timeout=30, check=False)
        self.record("fault", f"watcher started: SIGKILL to agent process {pids} once {INSTALLED_BINARY}.update is renamed")

    # -- the fault -----------------------------------------------------------------------------

    def inject(self, step: Step | None) -> None:
        """Apply a proxy, server or target fault at `step`; blocks the loop briefly on purpose.

        Holding the event loop while a target command runs keeps the server from sending more
        data, so the fault lands at the step it names.
        """
        fault = self.scenario.fault
        where = f" at {step}" if step else ""
        target = self.target
        assert target is not None and self.manager is not None
        match fault.kind:
            case "proxy-drop":
                assert self.proxy is not None
                if self.proxy.drop(where.strip()) == 0:
                    self.record("fault", f"proxy-drop{where}: no connection was open")
                return
            case "server-restart":
                assert self.server is not None
                seconds = fault.parameters.get("seconds", 2.0)
                task = asyncio.get_running_loop().create_task(self.server.restart(seconds))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
                self.record("fault", f"server restart{where}, listening again after {seconds:g} s")
                self._fault_took_effect(f"server restart{where}")
                return
            case "disk-full":
                free = fault.parameters.get("free_kb", 0)
                command = (
                    f"avail=$(df -k --output=avail {MESH_ROOT} | tail -n 1); "
                    f"fallocate -l $(( (avail - {free}) * 1024 )) {FILLER} && df -k {MESH_ROOT} | tail -n 1"
                )
                text = f"filled {MESH_ROOT}, {free} KiB left"
            case "read-only-install-dir":
                # A fresh bind mount has no open files, so it can turn read-only at once. Remounting
                # the filesystem itself fails while the agent has files open for writing.
                command = f"mount --bind {INSTALL_DIR} {INSTALL_DIR} && mount -o remount,bind,ro {INSTALL_DIR}"
                text = f"{INSTALL_DIR} made read-only with a bind mount"
            case "immutable-binary":
                command = f"chattr +i {INSTALLED_BINARY}"
                text = f"{INSTALLED_BINARY} made immutable"
            case "kill-agent":
                pids = self.manager.agent_pids(SERVICE_NAME, INSTALLED_BINARY)
                command = f"kill -9 {' '.join(map(str, pids))}" if pids else "true"
                text = f"SIGKILL sent to agent process {', '.join(map(str, pids)) or '(none found)'}"
            case "mask-service":
                command = f"systemctl mask --runtime {SERVICE_NAME}"
                text = f"unit {SERVICE_NAME} masked"
            case "remove-init-script":
                command = f"mv /etc/init.d/{SERVICE_NAME} /root/{SERVICE_NAME}.init"
                text = f"/etc/init.d/{SERVICE_NAME} removed"
            case "append-byte":
                self._record_target_fault(APPEND_BYTE_TEXT + where, self._append_byte())
                return
            case _:
                return
        self._record_target_fault(text + where, target.run(command, timeout=60, check=False))

    def _append_byte(self) -> ExecResult:
        """Stop the service, append one zero byte to the installed binary, and start the service again."""
        assert self.target is not None and self.manager is not None
        self.manager.stop(SERVICE_NAME)
        try:
            return self.target.run(f"printf '\\000' >> {INSTALLED_BINARY}", timeout=60, check=False)
        finally:
            self.manager.start(SERVICE_NAME)

    def _record_target_fault(self, text: str, result: ExecResult) -> None:
        detail = text + ("" if result.ok else f" (failed: {result.output.strip()[-200:]})")
        self.record("fault", detail)
        if result.ok:
            self.result.fault_fired = self.result.fault_fired or detail

    def undo(self) -> None:
        """Take a target fault back so a clean cycle can run."""
        target, manager = self.target, self.manager
        assert target is not None and manager is not None
        commands = {
            "disk-full": f"rm -f {FILLER}",
            "read-only-install-dir": f"umount {INSTALL_DIR}",
            "immutable-binary": f"chattr -i {INSTALLED_BINARY}",
            "mask-service": f"systemctl unmask --runtime {SERVICE_NAME}",
            "remove-init-script": f"mv /root/{SERVICE_NAME}.init /etc/init.d/{SERVICE_NAME}",
        }
        command = commands.get(self.scenario.fault.kind)
        if command is not None:
            result = target.run(command, timeout=60, check=False)
            self.record("fault-undone", command + ("" if result.ok else f" (failed: {result.output.strip()[-200:]})"))
        if self.proxy is not None:
            self.proxy.clear()

    # -- the run -------------------------------------------------------------------------------

    async def run(self) -> ScenarioResult:
        started = time.monotonic()
        scenario = self.scenario
        failed = True
        try:
            async with contextlib.AsyncExitStack() as stack:
                self.server = await stack.enter_async_context(LabServer(self.identity, self.gateway, 0))
                agent_url = self.server.agent_url
                if scenario.fault.side == "proxy":
                    self.proxy = await stack.enter_async_context(
                        FaultProxy(self.gateway, self.gateway, self.server.port, _proxy_faults(scenario), on_event=self._proxy_event)
                    )
                    agent_url = f"wss://{self.gateway}:{self.proxy.port}{self.server.agent_path}"
                download_server = None
                if scenario.fault.kind == "other-certificate":
                    identity = await asyncio.to_thread(self.other_identity)
                    download_server = await stack.enter_async_context(LabServer(identity, self.gateway, 0))
                    # The core rejects the certificate during the TLS handshake, before any HTTP
                    # request, so a plain relay in front of that server counts the connections.
                    self.download_relay = await stack.enter_async_context(
                        FaultProxy(self.gateway, self.gateway, download_server.port)
                    )
                    download_server.advertised_download_port = self.download_relay.port
                try:
                    await self._watched(agent_url, download_server)
                finally:
                    await self._collect_evidence()
            failed = not self.result.passed
        except LabError as error:
            self.result.verdict, self.result.reason = FAILED, f"lab error: {error}"
            self.record("lab-error", str(error))
        finally:
            for task in list(self._background):
                task.cancel()
            if self.target is not None:
                if failed and self.keep:
                    self.record("teardown", f"kept for inspection: docker exec -it {self.target.container.name} bash")
                else:
                    await asyncio.to_thread(self.provider.destroy, self.target)
                    self.state.step(self.label, "destroyed")
                    self.record("teardown", "container removed")
            self.result.duration = round(time.monotonic() - started, 3)
        return self.result

    async def _watched(self, agent_url: str, download_server: LabServer | None) -> None:
        scenario = self.scenario
        watchdog = asyncio.timeout(scenario.watchdog)
        try:
            async with watchdog:
                await self._body(agent_url, download_server)
        except TimeoutError:
            if not watchdog.expired():
                raise
            await self._report_hang()
        self._judge()

    async def _body(self, agent_url: str, download_server: LabServer | None) -> None:
        scenario = self.scenario
        recipe = images.load_recipe(scenario.target)
        old = agent_binary(scenario.from_version.version, scenario.from_version.appended, recipe.agent)
        new = agent_binary(scenario.to_version.version, scenario.to_version.appended, recipe.agent)
        tmpfs, caps = container_options(scenario)

        self.record("provision", f"starting a {recipe.service_manager} container for {scenario.fault.describe()}")
        self.target = await asyncio.to_thread(
            self.provider.create, scenario.target, instance=scenario.name, tmpfs=tmpfs, cap_add=caps
        )
        self.state.step(self.label, "created")
        self.manager = manager_for_name(recipe.service_manager, self.target)
        mesh_id = os.urandom(48)
        assert self.server is not None
        msh = agent_msh(self.server, mesh_id, SERVICE_NAME)
        msh["MeshServer"] = agent_url
        output = await asyncio.to_thread(docker_run._deploy, self.target, old, msh)
        self.evidence_dir.mkdir(parents=True, exist_ok=True)
        (self.evidence_dir / "install.log").write_text(output)
        self.state.step(self.label, "deployed")
        self.record("deploy", f"meshcentral {scenario.from_version} agent installed, connecting through {agent_url}")
        if scenario.fault.step is Step.DEPLOYED:
            # Only append-byte runs at this step. Its service stop can last systemd's whole stop
            # timeout (90 s by default), so a worker thread runs it and the event loop goes on.
            self._armed = True
            self._triggered = True
            result = await asyncio.to_thread(self._append_byte)
            self._record_target_fault(f"{APPEND_BYTE_TEXT} at {Step.DEPLOYED}", result)
        elif scenario.fault.kind == "noexec-tmp":
            options = self.target.run("findmnt -no OPTIONS /tmp", check=False).output
            if "noexec" in options.split(","):
                self.result.fault_fired = f"/tmp is mounted {options.strip()}"
            self.record("fault", f"/tmp mount options: {options.strip()}")
        if scenario.fault.kind == "corrupt-block":
            # Count the blocks of the smaller, zipped update, which the agent gets when it can unzip.
            payload = NativeUpdate.for_binary(new.data, new.agent_hash, compress=scenario.compress).payload
            blocks = -(-len(payload) // MAX_BLOCK_SIZE)
            block = scenario.fault.parameters.get("block", 1)
            if block >= blocks:
                raise ScenarioError(f"block {block} is beyond the last block of the update ({blocks - 1})")

        core = agents.require_package(agents.DEFAULT_VERSION).recovery_core.read_bytes()
        faults = _cycle_faults(scenario, download_server)
        faults.before_final_hash = lambda: self._trigger(Step.TRANSFER_DONE)
        faults.before_download_end = lambda: self._trigger(Step.DOWNLOAD_DONE)
        expected = CycleOutcome.REJECTED if Outcome.KEEPS_OLD_BINARY in scenario.outcomes else CycleOutcome.UPDATED
        options = CycleOptions(
            mode=Mode(scenario.mode), count=scenario.cycles, faults=faults, outcome=expected,
            compress=None if scenario.compress else False, recovery_core=core, timeouts=SCENARIO_TIMEOUTS,
        )
        self.driver = AgentDriver(
            server=self.server, mesh_id=mesh_id, target=self.label, binaries=[old, new], options=options,
            report=self.report, on_progress=self._on_progress, on_event=self._on_event,
        )
        try:
            installed = await self.driver.connect()
        except CycleFailure as failure:
            # Not an outcome of the fault: nothing was injected into a cycle yet.
            self.result.reason = f"the agent never connected after the install ({failure}); see install.log"
            return
        self._last_agent_activity = time.monotonic()

        self._armed = True
        for index in range(scenario.cycles):
            self._triggered = scenario.fault.step is Step.DEPLOYED
            # Each cycle updates to the binary the agent does not run, so an update always shows.
            binary = old if self.driver.reported_hash == new.agent_hash else new
            installed = self.driver.reported_hash or installed
            result = await self.driver.run_cycle(index, binary=binary)
            self.result.cycles.append(_cycle_summary(result))
        if self.download_relay is not None and self.download_relay.connections:
            self._fault_took_effect(
                f"the agent connected {self.download_relay.connections} time(s) to the server with the other certificate"
            )
        if scenario.fault.kind == "kill-agent" and scenario.fault.step is Step.HASH_SENT:
            killed = self.target.run("cat /root/updatelab-kill.log", check=False)
            if killed.ok:
                self.result.fault_fired = f"watcher: {killed.output.strip()}"
                self.record("fault", self.result.fault_fired)
        self._armed = False

        # After a cycle that already waited for a reconnect in vain, a short look is enough.
        waited = bool(self.result.cycles) and self.result.cycles[-1]["reason"].startswith(
            (str(Reason.NO_RECONNECT), str(Reason.NO_CONNECTION))
        )
        current = await self.driver.current_hash(5.0 if waited else scenario.settle)
        self._observe_hash(current, binary, installed)
        await asyncio.to_thread(self._observe_target)

        if Outcome.NEXT_CYCLE_SUCCEEDS in scenario.outcomes:
            await self._clean_cycle(current, old, new)

    async def _clean_cycle(self, current: bytes | None, old: AgentBinary, new: AgentBinary) -> None:
        assert self.driver is not None and self.manager is not None
        await asyncio.to_thread(self.undo)
        if current is None:
            self.record("recover", f"starting the {SERVICE_NAME} service again for the clean cycle")
            await asyncio.to_thread(self.manager.restart, SERVICE_NAME)
            current = await self.driver.current_hash(self.scenario.settle)
            if current is None:
                self.result.reason = "the agent did not come back for the clean cycle"
                return
        binary = old if current == new.agent_hash else new
        self.driver.options = dataclasses.replace(self.driver.options, faults=None, outcome=CycleOutcome.UPDATED, count=1)
        probe = docker_run.ContainerProbe(self.target, self.manager, Mode(self.scenario.mode), self.evidence_dir)  # type: ignore[arg-type]
        self.driver.probe = probe
        result = await self.driver.run_cycle(self.scenario.cycles, binary=binary)
        self.driver.probe = None
        self.result.cycles.append(_cycle_summary(result, clean=True))
        if result.passed:
            self.result.observed[Outcome.NEXT_CYCLE_SUCCEEDS] = f"clean cycle to {binary.agent_hash.hex()[:12]} passed in {result.duration:.1f} s"

    def _observe_hash(self, current: bytes | None, sent: AgentBinary, installed: bytes) -> None:
        """Compare the hash the agent reports with the binary the last faulted cycle sent and the one it replaced."""
        observed = self.result.observed
        if current is None:
            observed[Outcome.OFFLINE] = f"no answer within {self.scenario.settle:g} s after the faulted cycle"
        elif current == sent.agent_hash:
            observed[Outcome.UPDATED] = f"reports the new hash {current.hex()[:12]}"
        elif current == installed:
            observed[Outcome.KEEPS_OLD_BINARY] = f"reconnected with its old hash {current.hex()[:12]}"
        else:
            self.record("observed", f"the agent reports {current.hex()[:12]}, neither the old nor the new binary")
        events = [entry for entry in self.report.timeline if entry.target == self.label]
        for entry in events:
            if entry.kind == "notice" and "write error" in entry.detail.lower():
                observed[Outcome.WRITE_ERROR] = entry.detail
                break

    def _observe_target(self) -> None:
        assert self.target is not None and self.manager is not None
        observed = self.result.observed
        status = self.manager.status(SERVICE_NAME)
        if status.running:
            observed[Outcome.SERVICE_RUNNING] = f"{self.manager.name}: {status.state}"
        else:
            self.record("observed", f"service not running: {self.manager.name} reports {status.state}")
        leftover = self.target.file_exists(INSTALLED_BINARY + ".update")
        if not leftover:
            observed[Outcome.NO_UPDATE_FILE] = f"{INSTALLED_BINARY}.update is absent"
        else:
            self.record("observed", f"{INSTALLED_BINARY}.update was left behind")

    async def _report_hang(self) -> None:
        """Record what the agent was doing when the watchdog fired, and whether that is a hang.

        It counts as a hang only when an agent process is alive and the agent has sent nothing
        for at least HANG_SILENCE seconds. Otherwise the watchdog was merely too short for the
        scenario, and the scenario fails with that reason.
        """
        silent = time.monotonic() - self._last_agent_activity
        processes = ""
        if self.target is not None:
            command = (
                "for p in $(pgrep -f " + shlex.quote(INSTALLED_BINARY) + "); do "
                "echo \"pid $p state $(awk '{print $3}' /proc/$p/stat) wchan $(cat /proc/$p/wchan) "
                "threads $(ls /proc/$p/task | wc -l)\"; done; "
                f"ls -la {INSTALL_DIR}; df -k {MESH_ROOT} | tail -n 1"
            )
            try:
                processes = (await asyncio.to_thread(self.target.run, command, timeout=30, check=False)).output.strip()
            except LabError as error:
                processes = f"could not inspect the target: {error}"
        self.result.hung = {
            "watchdog_seconds": self.scenario.watchdog,
            "agent_silent_seconds": round(silent, 1),
            "last_step": self._last_step,
            "processes": processes,
        }
        alive = processes.startswith("pid ")
        text = (
            f"watchdog fired after {self.scenario.watchdog:g} s; the agent had been silent for {silent:.0f} s "
            f"since {self._last_step!r}; {processes.splitlines()[0] if alive else 'no agent process found'}"
        )
        self.record("watchdog", text)
        if alive and silent >= HANG_SILENCE:
            self.result.observed[Outcome.HANGS] = text
        else:
            cause = "no agent process runs" if not alive else f"the agent was silent for only {silent:.0f} s"
            self.result.reason = f"the watchdog fired after {self.scenario.watchdog:g} s, but {cause}, so it is no hang"

    def _judge(self) -> None:
        result = self.result
        result.missing = [outcome for outcome in result.expected if outcome not in result.observed]
        if result.missing:
            result.verdict = FAILED
            if not result.reason:
                result.reason = "not observed: " + ", ".join(result.missing)
        else:
            result.verdict = PASSED
        if self.scenario.fault.kind != "none" and result.fault_fired is None:
            result.verdict = FAILED
            result.reason = f"the fault {result.fault} never took effect" + (f"; {result.reason}" if result.reason else "")
        verdict = result.verdict + (f": {result.reason}" if result.reason else "")
        self.record("verdict", verdict)

    async def _collect_evidence(self) -> None:
        directory = self.evidence_dir
        directory.mkdir(parents=True, exist_ok=True)
        saved: list[str] = []
        if self.target is not None and self.manager is not None:
            probe = docker_run.ContainerProbe(self.target, self.manager, Mode(self.scenario.mode), directory)
            try:
                saved += await asyncio.to_thread(probe.collect_evidence, 0)
                listing = await asyncio.to_thread(
                    self.target.run,
                    f"ps -eo pid,stat,etime,args; ls -la {INSTALL_DIR}; df -k {MESH_ROOT}; mount | grep -E 'mesh|/tmp' || true",
                    timeout=30,
                    check=False,
                )
                (directory / "target-state.txt").write_text(listing.output)
                saved.append(str(directory / "target-state.txt"))
            except (LabError, OSError) as error:
                logger.warning("%s: evidence incomplete: %s", self.label, error)
        install_log = directory / "install.log"
        if install_log.exists():
            saved.append(str(install_log))
        timeline = [dataclasses.asdict(entry) for entry in self.report.timeline if entry.target == self.label]
        (directory / "timeline.json").write_text(json.dumps(timeline, indent=1) + "\n")
        saved.append(str(directory / "timeline.json"))
        self.result.evidence = sorted(set(saved))


def _proxy_faults(scenario: Scenario) -> ProxyFaults:
    parameters = scenario.fault.parameters
    match scenario.fault.kind:
        case "proxy-reset":
            return ProxyFaults(reset_after_bytes=parameters["bytes"])
        case "proxy-stall":
            return ProxyFaults(stall_after_bytes=parameters["bytes"], stall_seconds=parameters["seconds"])
        case "proxy-slow":
            return ProxyFaults(latency_ms=parameters.get("latency_ms", 0.0), bytes_per_second=parameters.get("bytes_per_second"))
    return ProxyFaults()


def _cycle_faults(scenario: Scenario, download_server: LabServer | None) -> CycleFaults:
    parameters = scenario.fault.parameters
    match scenario.fault.kind:
        case "corrupt-block":
            return CycleFaults(corrupt_block=parameters.get("block", 1))
        case "wrong-final-hash":
            return CycleFaults(wrong_final_hash=True)
        case "truncated-binary":
            return CycleFaults(truncate=parameters.get("share", 0.5))
        case "other-certificate":
            return CycleFaults(download_server=download_server)
        case "altered-download":
            return CycleFaults(download_altered=True)
        case "http-error":
            return CycleFaults(download_status=parameters["status"])
        case "slow-download":
            return CycleFaults(download_bytes_per_second=parameters["bytes_per_second"])
    return CycleFaults()


def _cycle_summary(result: CycleResult, *, clean: bool = False) -> dict[str, Any]:
    return {
        "index": result.index,
        "kind": "clean" if clean else "faulted",
        "verdict": result.verdict,
        "reason": result.reason,
        "expected_hash": result.expected_hash,
        "reported_hash": result.reported_hash,
        "duration": result.duration,
        "checks": result.checks,
    }


# -- the catalogue ---------------------------------------------------------------------------


async def _run_all(scenarios: list[Scenario], report: Report, display: Display, run_dir: Path, run_id: str,
                   parallel: int, keep: bool, results: list[ScenarioResult]) -> list[ScenarioResult]:
    """Run `scenarios`, appending each result to `results` as it finishes, and return them in order."""
    provider = DockerProvider(run_id)
    provider.preflight()
    state = docker_run.RunState(run_id)
    try:
        gateway = await asyncio.to_thread(lambda: provider.server_address)
        state.step("network", f"created {provider.network_name}, gateway {gateway}")
        identity = await asyncio.to_thread(generate_identity, [gateway])
        others: list[ServerIdentity] = []

        def other_identity() -> ServerIdentity:
            if not others:
                others.append(generate_identity([gateway]))
            return others[0]

        limit = asyncio.Semaphore(max(1, parallel))

        async def bounded(scenario: Scenario) -> None:
            async with limit:
                run = ScenarioRun(
                    scenario, provider=provider, gateway=gateway, identity=identity, other_identity=other_identity,
                    report=report, display=display, run_dir=run_dir, state=state, keep=keep,
                )
                results.append(await run.run())

        async with asyncio.TaskGroup() as group:
            for scenario in scenarios:
                group.create_task(bounded(scenario))
    finally:
        if not keep:
            await asyncio.to_thread(provider.destroy_all)
            state.finish("cleaned")
        else:
            state.finish("kept")
    return _in_catalogue_order(results, scenarios)


def _in_catalogue_order(results: list[ScenarioResult], scenarios: list[Scenario]) -> list[ScenarioResult]:
    order = {scenario.name: index for index, scenario in enumerate(scenarios)}
    return sorted(results, key=lambda result: order[result.name])


def reproduce(scenarios: list[Scenario], *, report_dir: Path | None, parallel: int, keep: bool, console: Console) -> int:
    """Run `scenarios`, print and write the report, and return the exit status (0 when all passed)."""
    for scenario in scenarios:
        reason = images.unbuildable_reason(scenario.target)
        if reason:
            raise LabError(f"scenario {scenario.name}: target {scenario.target} cannot run here: {reason}")
    versions = {str(v.version) for scenario in scenarios for v in (scenario.from_version, scenario.to_version)}
    for version in sorted(versions | {agents.DEFAULT_VERSION}):
        agents.require_package(version)

    removed = docker_run.recover_crashed_runs()
    if removed:
        console.print(f"removed what an interrupted run left behind: {', '.join(removed)}")
    run_id, run_dir = docker_run.start_run(report_dir, console)
    report = Report(settings={"run_id": run_id, "command": "reproduce", "scenarios": [str(s.path) for s in scenarios]})
    with Display(console) as display:
        for scenario in scenarios:
            clean = Outcome.NEXT_CYCLE_SUCCEEDS in scenario.outcomes
            display.plan(scenario.name, scenario.mode, scenario.cycles + int(clean))
        finished: list[ScenarioResult] = []
        with write_report_on_interrupt(
            report,
            lambda: write_report(report, _in_catalogue_order(finished, scenarios), run_dir),
            plain_printer(console),
            unit="scenarios",
        ):
            for target in sorted({scenario.target for scenario in scenarios}):
                with console.status(f"checking image {target} …") as status:
                    images.build(target, progress=lambda event, status=status: status.update(f"{event.target}: {event.step}: {event.message[:80]}"))
            results = docker_run.run_cleaning_up(
                _run_all(scenarios, report, display, run_dir, run_id, parallel, keep, finished), run_id
            )

    console.print(scenario_table(results))
    run_dir.mkdir(parents=True, exist_ok=True)
    for path in write_report(report, results, run_dir):
        console.print(f"wrote {escape(str(path))}")
    return 0 if results and all(result.passed for result in results) else 1


def scenario_table(results: list[ScenarioResult]):
    from rich.table import Table

    table = Table(title="updatelab fault scenarios")
    for column in ("scenario", "fault", "expected", "observed", "seconds", "verdict"):
        table.add_column(column)
    for result in results:
        verdict = "[green]passed[/green]" if result.passed else f"[red]failed[/red]: {result.reason[:80]}"
        if result.passed and result.known_failure:
            verdict += " (known failure)"
        table.add_row(
            result.name, result.fault, ", ".join(result.expected), ", ".join(result.observed), f"{result.duration:.1f}", verdict
        )
    return table


def write_report(report: Report, results: list[ScenarioResult], directory: Path) -> list[Path]:
    """Write report.json (scenarios, cycles and timeline) and junit.xml with one case per scenario."""
    import xml.etree.ElementTree as ElementTree

    directory.mkdir(parents=True, exist_ok=True)
    data = report.to_dict()
    data["scenarios"] = [dataclasses.asdict(result) for result in results]
    data["summary"] = {
        "scenarios": len(results),
        "passed": sum(result.passed for result in results),
        "failed": sum(not result.passed for result in results),
        "known_failures": sum(bool(result.known_failure) for result in results),
    }
    json_path = directory / "report.json"
    replace_file(json_path, (json.dumps(data, indent=2) + "\n").encode())

    root = ElementTree.Element("testsuites", name="updatelab")
    suite = ElementTree.SubElement(
        root, "testsuite", name="fault scenarios", tests=str(len(results)),
        failures=str(sum(not result.passed for result in results)),
        time=f"{sum(result.duration for result in results):.3f}",
    )
    for result in results:
        case = ElementTree.SubElement(suite, "testcase", classname=result.target, name=result.name, time=f"{result.duration:.3f}")
        if not result.passed:
            failure = ElementTree.SubElement(case, "failure", message=result.reason)
            failure.text = json.dumps(dataclasses.asdict(result), indent=2)
    add_interruption_case(root, report, len(results), "scenarios")
    junit_path = directory / "junit.xml"
    replace_file(junit_path, ElementTree.tostring(root, encoding="utf-8", xml_declaration=True))
    return [json_path, junit_path]
