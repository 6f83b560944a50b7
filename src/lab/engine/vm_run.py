"""The VM matrix: one Vagrant VM per target and mode, the agent installed as a service.

For each target and mode the runner starts a VM from the target's box, connects over SSH,
opens a reverse port forward so that 127.0.0.1:<server port> inside the VM reaches the lab
server on the host's loopback, and installs the agent with its own installer. It then runs the
update cycles, checks every cycle inside the VM, saves the evidence and destroys the VM. The
server's agent and download URLs (``wss://127.0.0.1:<port>/…`` and ``https://127.0.0.1:<port>/…``)
are valid inside the VM unchanged, because the forward listens on the same port number there.

The run's state file is rewritten after every step. A later VM run, and ``updatelab clean``,
remove what a run whose process is gone left behind.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import re
import time
from pathlib import Path

from rich.console import Console

from lab import boxes
from lab.agentfile import AgentBinary
from lab.certs import generate_identity
from lab.display import Display, plain_printer
from lab.engine.cycles import CycleOptions, Mode
from lab.engine.docker_run import (
    SERVICE_NAME,
    ContainerProbe,
    MatrixEntry,
    RunState,
    _deploy,
    _process_alive,
    binaries_for,
    drive_cycles,
    finish_matrix,
    fresh_evidence_dir,
    parse_targets,
    record_lab_error,
    start_run,
    state_root,
)
from lab.engine.expectations import Expectations
from lab.engine.local_run import agent_msh
from lab.engine.report import Report, write_report_on_interrupt
from lab.errors import ConfigError, LabError
from lab.faults.proxy import proxied
from lab.providers import accel, libvirt_util
from lab.providers import vagrant as vagrant_provider
from lab.providers.vagrant import VagrantProvider, VagrantTarget
from lab.server.server import LabServer
from lab.services import manager_for_name

logger = logging.getLogger(__name__)

#: Guests that `_deploy` can install to, with the installer options and paths of Linux.
#: NOTE: FreeBSD is assumed to take the same ones; no FreeBSD box has run here yet.
DEPLOYABLE_GUESTS = ("linux", "freebsd")

_RUN_ID = re.compile(r"^updatelab-(\d{8}-\d{6}-[0-9a-f]{6})")
_PROBE = re.compile(rf"^{re.escape(accel.PROBE_PREFIX)}(\d+)-")


def work_root(run_id: str) -> Path:
    """Return the folder that contains the working folders of a run's VMs."""
    return state_root() / f"{run_id}.vagrant"


def leftover_run_ids() -> set[str]:
    """Return the run ids that have a VM work root or a libvirt object named after them."""
    run_ids = set()
    folder = state_root()
    if folder.is_dir():
        run_ids.update(path.name.removesuffix(".vagrant") for path in folder.glob("*.vagrant") if path.is_dir())
    names = libvirt_util.domains_with_prefix("updatelab-") + libvirt_util.networks_with_prefix("updatelab-")
    names += [volume for _, volume in libvirt_util.volumes_with_prefix("updatelab-")]
    for name in names:
        match = _RUN_ID.match(name)
        if match:
            run_ids.add(match.group(1))
    return run_ids


def _run_alive(run_id: str) -> bool:
    try:
        state = json.loads((state_root() / f"{run_id}.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return _process_alive(state.get("pid"))


def clean_vm_runs(run_id: str | None = None, *, only_crashed: bool = True) -> list[str]:
    """Remove the VMs, volumes, networks and working folders of VM runs; list what was removed.

    With `run_id`, only that run. Otherwise every run found by `leftover_run_ids`, skipping
    runs whose process is still alive when `only_crashed` is true. Acceleration-probe domains
    whose lab process is gone are removed too.
    """
    removed: list[str] = []
    run_ids = [run_id] if run_id else sorted(leftover_run_ids())
    for candidate in run_ids:
        if run_id is None and only_crashed and _run_alive(candidate):
            continue
        removed += vagrant_provider.clean(candidate, work_root(candidate))
        state_path = state_root() / f"{candidate}.json"
        if state_path.is_file():
            try:
                state = json.loads(state_path.read_text())
                state["vm_status"] = "cleaned"
                state_path.write_text(json.dumps(state, indent=1))
            except (OSError, json.JSONDecodeError) as error:
                logger.warning("cannot mark %s as cleaned: %s", state_path, error)
    if run_id is None:
        for domain in libvirt_util.domains_with_prefix(accel.PROBE_PREFIX):
            match = _PROBE.match(domain)
            if match and only_crashed and _process_alive(int(match.group(1))):
                continue
            libvirt_util.remove_domain(domain)
            removed.append(f"domain {domain}")
    return removed


def _vm_options(options: CycleOptions) -> CycleOptions:
    """Return `options` with longer waits, because an agent under TCG emulation starts and restarts slower."""
    timeouts = dataclasses.replace(
        options.timeouts,
        connect=max(options.timeouts.connect, 90.0),
        reconnect=max(options.timeouts.reconnect, 90.0),
        restart=max(options.timeouts.restart, 60.0),
    )
    return dataclasses.replace(options, timeouts=timeouts)


async def _run_entry(
    entry: MatrixEntry,
    provider: VagrantProvider,
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
    definition = boxes.load_definition(entry.target)
    binaries = binaries_for(definition.agent, args, explicit)
    options = _vm_options(options_by_mode[entry.mode])
    mesh_id = os.urandom(48)
    evidence_dir = fresh_evidence_dir(run_dir / entry.target / str(entry.mode))
    target: VagrantTarget | None = None
    failed = False
    started = time.monotonic()
    try:
        display.event(label, None, "provision", f"vagrant up {definition.box} ({provider.domain_type})")
        target = await asyncio.to_thread(provider.create, entry.target, str(entry.mode))
        boot_seconds = time.monotonic() - started
        state.step(label, "created")
        await asyncio.to_thread(target.forward_remote_port, server.port, server.host, server.port)
        if server.advertised_port:
            # The agent connects through the fault proxy; downloads still go to the server's port.
            port = server.advertised_port
            await asyncio.to_thread(target.forward_remote_port, port, server.host, port)
        state.step(label, f"forwarded 127.0.0.1:{server.port} in the VM to {server.host}:{server.port}")
        manager = manager_for_name(definition.service_manager, target)
        output = await asyncio.to_thread(_deploy, target, binaries[0], agent_msh(server, mesh_id, SERVICE_NAME))
        evidence_dir.mkdir(parents=True, exist_ok=True)
        (evidence_dir / "install.log").write_text(output)
        state.step(label, "deployed")
        status = await asyncio.to_thread(manager.status, SERVICE_NAME)
        display.event(label, None, "deploy", f"{binaries[0].path.name} installed; {manager.name} reports {status.state}")
        report.targets[label] = {
            "provider": "vagrant", "box": definition.box, "machine": target.machine, "domain_type": provider.domain_type,
            "service_manager": manager.name, "service_state": status.state, "boot_seconds": round(boot_seconds, 1),
        }

        # ContainerProbe only uses the Target interface, so it checks a VM the same way.
        probe = ContainerProbe(target, manager, entry.mode, evidence_dir)
        failed = await drive_cycles(server, mesh_id, label, binaries, options, report, probe, display)
        state.step(label, "cycles finished")
    except LabError as error:
        failed = True
        record_lab_error(report, display, label, entry.mode, error)
    finally:
        _save_console(provider.work_root / vagrant_provider.machine_name(entry.target, str(entry.mode)), evidence_dir)
        if target is not None and failed and args.keep:
            provider.kept.add(target.machine)
            display.event(
                label, None, "teardown",
                f"kept for inspection until the next VM run: cd {target.workdir} && vagrant ssh {target.machine}",
            )
        else:
            await asyncio.to_thread(_destroy_quietly, provider, target, entry, label)
            state.step(label, "destroyed")
            display.event(label, None, "teardown", "VM destroyed")


def _save_console(workdir: Path, evidence_dir: Path) -> None:
    """Copy the VM's serial console and Vagrant output logs into the evidence folder."""
    evidence_dir.mkdir(parents=True, exist_ok=True)
    for name in ("console.log", "vagrant.log"):
        source = workdir / name
        if source.is_file():
            (evidence_dir / name).write_bytes(source.read_bytes())


def _destroy_quietly(provider: VagrantProvider, target: VagrantTarget | None, entry: MatrixEntry, label: str) -> None:
    """Destroy the entry's VM; a VM that never came up is removed through its working folder."""
    if target is not None:
        provider.destroy(target)
        return
    machine = vagrant_provider.machine_name(entry.target, str(entry.mode))
    vagrant_provider.destroy_machine(provider.work_root / machine)
    libvirt_util.remove_objects(vagrant_provider.domain_prefix(provider.run_id) + machine)
    logger.info("%s: removed the VM that did not come up", label)


async def _run_matrix(entries: list[MatrixEntry], args: argparse.Namespace, options_by_mode: dict[Mode, CycleOptions],
                      explicit: list[AgentBinary], report: Report, display: Display, run_dir: Path,
                      provider: VagrantProvider, state: RunState) -> None:
    try:
        identity = await asyncio.to_thread(generate_identity, ["127.0.0.1"])
        async with LabServer(identity, "127.0.0.1", args.port) as server, proxied(
            server, getattr(args, "network", None), lambda kind, detail: report.add_event("proxy", None, "fault", f"{kind}: {detail}")
        ):
            report.settings["server"] = server.agent_url
            # NOTE: VMs run one at a time. Two emulated (TCG) guests on a 2-core host slow each
            # other down enough to trip the cycle timeouts; --parallel applies to containers only.
            for entry in entries:
                await _run_entry(entry, provider, server, args, options_by_mode, explicit, report, state, display, run_dir)
            report.protocol_errors += server.protocol_errors
    finally:
        await asyncio.to_thread(provider.destroy_all)
        state.finish("cleaned")


def run_vm_matrix(
    args: argparse.Namespace,
    options_by_mode: dict[Mode, CycleOptions],
    binaries: list[AgentBinary],
    report: Report,
    console: Console,
) -> int:
    """Run every VM target in every mode and return the exit status of ``updatelab run``."""
    known = boxes.known_targets()
    names = parse_targets(args.targets, known, "VM target")
    definitions = [boxes.load_definition(name) for name in names]
    for definition in definitions:
        if definition.guest not in DEPLOYABLE_GUESTS:
            # TODO: deploy through the agent's macOS and Windows installers (paths and shells differ).
            raise ConfigError(
                f"{definition.name}: deploying the agent to a {definition.guest} guest is not implemented yet; "
                f"VM targets that run now: {', '.join(d for d in known if boxes.load_definition(d).guest in DEPLOYABLE_GUESTS)}"
            )
    expectations = Expectations.load(args.expectations) if args.expectations else None

    vagrant_provider.check_tools()
    removed = clean_vm_runs()
    if removed:
        console.print(f"removed what an interrupted VM run left behind: {', '.join(removed)}")

    run_id, run_dir = start_run(args.report_dir, console)
    report.settings["run_id"] = run_id
    state = RunState(run_id)
    state.data["provider"] = "vagrant"
    state.data["work_root"] = str(work_root(run_id))
    state.save()
    provider = VagrantProvider(
        run_id, work_root(run_id), boot_timeout=args.boot_timeout,
        on_step=lambda machine, step: state.step(machine, step),
    )
    entries = [MatrixEntry(name, mode) for name in names for mode in options_by_mode]
    with write_report_on_interrupt(report, lambda: report.write(run_dir), plain_printer(console)):
        try:
            with console.status("checking Vagrant, vagrant-libvirt, libvirtd, the boxes and KVM/TCG …"):
                provider.preflight(names)
        except LabError:
            state.finish("cleaned")
            raise
        console.print(f"VMs use libvirt domain type {provider.domain_type}: {provider.accel_reason}")
        report.settings["domain_type"] = provider.domain_type
        report.settings["acceleration"] = provider.accel_reason

        with Display(console) as display:
            for entry in entries:
                display.plan(f"{entry.target}/{entry.mode}", str(entry.mode), args.cycles)
            asyncio.run(_run_matrix(entries, args, options_by_mode, binaries, report, display, run_dir, provider, state))

    return finish_matrix(report, run_dir, expectations, [f"{e.target}/{e.mode}" for e in entries], console)
