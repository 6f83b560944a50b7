"""Command-line interface: ``updatelab agents|run|reproduce|serve|doctor|boxes|images|clean``.

Options of MeshAgent's test/update-test.js map as follows: CycleCount is --cycles,
MinimumDelay and MaximumDelay are --min-delay and --max-delay, AltBinary is --alt-binary,
JS and RecoveryCore are --mode recovery with --recoverycore, and NoInstall is ``updatelab serve``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import math
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lab import agents
from lab.agentfile import AgentBinary, load_agent_binary
from lab.display import Display, plain_printer, summary_table
from lab.engine.cycles import CycleOptions, Fault, Mode, Timeouts
from lab.engine.report import Report, prepare_report_dir, write_report_on_interrupt
from lab.errors import ConfigError, LabError
from lab.faults.proxy import ProxyFaults
from lab.protocol.commands import MAX_BLOCK_SIZE, MIN_BLOCK_SIZE

# Wide enough for the summary table when the output goes to a file or a CI log.
# Output to a file or pipe keeps each line whole, so that it can be searched with grep.
console = Console(width=None if sys.stdout.isatty() else 160, soft_wrap=not sys.stdout.isatty())


def _integer_in_range(what: str, low: int, high: int | None, unit: str = "") -> Callable[[str], int]:
    """Return an argparse type that accepts whole numbers from `low` to `high` (None: no limit)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {what} {text!r}: expected a whole number") from None
        if value < low or (high is not None and value > high):
            limit = f"{low} to {high}" if high is not None else f"{low} or more"
            raise argparse.ArgumentTypeError(f"{what} {value} is out of range: use {limit}{unit}")
        return value

    return parse


def _seconds(text: str) -> float:
    """Parse a positive, finite number of seconds for argparse."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of seconds {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text} seconds is out of range: use a number above 0")
    return value


_block_size = _integer_in_range("block size", MIN_BLOCK_SIZE, MAX_BLOCK_SIZE, " bytes")
_port = _integer_in_range("port", 0, 65535)
_non_negative = _integer_in_range("number", 0, None)
_positive = _integer_in_range("number", 1, None)


def _add_cycle_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("update cycles")
    group.add_argument("--mode", default="native", help="native, recovery, or both comma-separated (default: native)")
    group.add_argument("--cycles", type=_non_negative, default=3, help="update cycles per target and mode, at least 1 for run (default: 3; serve accepts 0)")
    group.add_argument("--min-delay", type=_non_negative, default=0, help="minimum random delay before each update, in ms")
    group.add_argument("--max-delay", type=_non_negative, default=0, help="maximum random delay before each update, in ms")
    group.add_argument("--binary", help="agent binary to install first (default: meshagent_x86-64 of --agent-version)")
    group.add_argument("--alt-binary", help="second binary: cycles alternate between --binary and this one")
    group.add_argument("--agent-version", default=agents.DEFAULT_VERSION, help="meshcentral package version of the default binary")
    group.add_argument("--block-size", type=_block_size, default=MAX_BLOCK_SIZE, help=f"update block size in bytes, {MIN_BLOCK_SIZE}..{MAX_BLOCK_SIZE} (default: {MAX_BLOCK_SIZE})")
    group.add_argument("--first-block-size", type=_block_size, help="size of the first block only (update-test.js uses 16384)")
    group.add_argument("--compress", choices=("auto", "on", "off"), default="auto", help="zip the native update when the agent advertises capability 0x100 (default: auto)")
    group.add_argument("--recoverycore", help="recovery core script (default: recoverycore.js of the fetched package)")
    group.add_argument("--fault", choices=[fault.value for fault in Fault], help="inject a server-side fault into every cycle")
    group.add_argument("--reconnect-timeout", type=_seconds, default=45.0, help="seconds to wait for the agent to reconnect (default: 45)")
    group.add_argument("--stall-timeout", type=_seconds, default=30.0, help="seconds to wait for a block acknowledgement (default: 30)")
    group.add_argument("--report-dir", type=Path, help="write report.json, junit.xml and evidence here (default: none for local runs, $XDG_STATE_HOME/updatelab/runs/RUN_ID for container and VM runs)")
    network = parser.add_argument_group("network faults (the agent connects through a fault proxy)")
    network.add_argument("--net-reset-after", type=_positive, metavar="BYTES", help="reset the connection once this many bytes went to the agent")
    network.add_argument("--net-stall-after", type=_positive, metavar="BYTES", help="stall the connection once this many bytes went to the agent")
    network.add_argument("--net-stall-seconds", type=_seconds, default=10.0, metavar="S", help="length of the stall in seconds (default: 10)")
    network.add_argument("--net-latency", type=_non_negative, default=0, metavar="MS", help="latency added to every chunk, in ms")
    network.add_argument("--net-rate", type=_positive, metavar="BYTES_PER_S", help="cap the rate towards the agent, in bytes per second")
    network.add_argument("--net-faulty-connections", type=_positive, default=1, metavar="N", help="connections that get the reset or the stall, from the first (default: 1)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="updatelab",
        description="A test lab for MeshAgent self-updates: a simulated MeshCentral server drives the real agent "
        "through native and recovery-core update cycles and judges every cycle.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv for wire-level debug)")
    commands = parser.add_subparsers(dest="command", required=True)

    agents_parser = commands.add_parser("agents", help="fetch and list the real MeshAgent binaries")
    agents_commands = agents_parser.add_subparsers(dest="agents_command", required=True)
    fetch = agents_commands.add_parser("fetch", help="download the meshcentral npm package and cache its agents")
    fetch.add_argument("--version", default=agents.DEFAULT_VERSION, help=f"package version (default: {agents.DEFAULT_VERSION})")
    listing = agents_commands.add_parser("list", help="list the cached agents of a version")
    listing.add_argument("--version", default=agents.DEFAULT_VERSION)

    run = commands.add_parser("run", help="provision targets, run update cycles, judge and report them")
    run.add_argument("--provider", choices=("local", "docker", "vagrant"), default="local", help="where the agent runs (default: local)")
    run.add_argument("--targets", help="comma-separated targets: images/ names for docker (default: debian12-systemd), boxes/ names for vagrant (default: debian12-vm)")
    run.add_argument("--boot-timeout", type=_integer_in_range("boot timeout", 5, None, " s"), default=600, help="seconds `vagrant up` may take until the VM accepts SSH (vagrant provider, default: 600)")
    run.add_argument("--port", type=_port, default=0, help="server port (default: a free port)")
    run.add_argument("--keep", action="store_true", help="keep failed targets for inspection")
    run.add_argument("--parallel", type=_integer_in_range("parallel targets", 1, 16), default=2, help="targets run at once (docker provider, default: 2)")
    run.add_argument("--expectations", type=Path, help="expectations file for the docker matrix")
    _add_cycle_options(run)

    reproduce = commands.add_parser("reproduce", help="run fault scenarios against the real agent in containers and judge them")
    reproduce.add_argument("scenarios", nargs="+", type=Path, help="scenario files (TOML), or folders of them")
    reproduce.add_argument("--report-dir", type=Path, help="write report.json, junit.xml and evidence here (default: $XDG_STATE_HOME/updatelab/runs/RUN_ID)")
    reproduce.add_argument("--parallel", type=_integer_in_range("parallel scenarios", 1, 8), default=2, help="scenarios run at once (default: 2)")
    reproduce.add_argument("--quick", action="store_true", help="skip the scenarios marked slow")
    reproduce.add_argument("--keep", action="store_true", help="keep the containers of failed scenarios for inspection")

    serve = commands.add_parser("serve", help="run only the server for an agent started by hand, and print its .msh")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind: loopback or a lab network gateway")
    serve.add_argument("--port", type=_port, default=0, help="server port (default: a free port)")
    _add_cycle_options(serve)

    commands.add_parser("doctor", help="check every prerequisite and say how to fix what is missing")

    boxes_parser = commands.add_parser("boxes", help="build, list or remove the Vagrant boxes of VM targets")
    boxes_commands = boxes_parser.add_subparsers(dest="boxes_command", required=True)
    box_build = boxes_commands.add_parser("build", help="build a box here from debootstrap and add it to Vagrant (cached)")
    box_build.add_argument("targets", nargs="*", help="VM targets to build (default: every target built here)")
    box_build.add_argument("--rebuild", action="store_true", help="rebuild even when the box is up to date")
    boxes_commands.add_parser("list", help="list VM targets and whether their boxes are present")
    box_remove = boxes_commands.add_parser("rm", help="remove boxes from Vagrant and their uploaded images from libvirt")
    box_remove.add_argument("targets", nargs="+")

    images = commands.add_parser("images", help="build, list or remove target images")
    images_commands = images.add_subparsers(dest="images_command", required=True)
    build = images_commands.add_parser("build", help="build target images (cached)")
    build.add_argument("targets", nargs="*", help="targets to build (default: every offline target)")
    build.add_argument("--rebuild", action="store_true", help="rebuild even when the recipe is unchanged")
    images_commands.add_parser("list", help="list targets and their images")
    remove = images_commands.add_parser("rm", help="remove target images")
    remove.add_argument("targets", nargs="+")

    clean = commands.add_parser(
        "clean",
        help="remove the containers, networks and VMs of one run (--run-id), or of every run on this machine",
        description="Without --run-id, every labelled object on this machine is removed, including other users' running labs.",
    )
    clean.add_argument("--run-id", help="only this run (printed when the run starts)")
    return parser


# -- agents -------------------------------------------------------------------------------------


def _print_package(package: agents.AgentPackage) -> None:
    table = Table(title=f"meshcentral {package.version} agents in {package.path}")
    for column in ("file", "arch id", "size", "agent hash"):
        table.add_column(column)
    for entry in package.entries():
        table.add_row(entry.name, str(entry.architecture_id or "-"), f"{entry.size:,}", entry.agent_hash[:24] + "…")
    console.print(table)


def command_agents(args: argparse.Namespace) -> int:
    if args.agents_command == "fetch":
        with console.status(f"npm pack meshcentral@{args.version} …"):
            package = agents.fetch_package(args.version)
    else:
        package = agents.require_package(args.version)
    _print_package(package)
    return 0


# -- run and serve ------------------------------------------------------------------------------


def _parse_modes(text: str) -> list[Mode]:
    modes = []
    for name in text.split(","):
        try:
            modes.append(Mode(name.strip()))
        except ValueError:
            raise ConfigError(f"invalid --mode {name!r}: use native, recovery or native,recovery") from None
    return modes


def load_binaries(args: argparse.Namespace) -> list[AgentBinary]:
    if args.binary:
        first = load_agent_binary(args.binary, option="--binary")
    else:
        package = agents.require_package(args.agent_version)
        first = load_agent_binary(package.binary("meshagent_x86-64"), option="--binary")
    binaries = [first]
    if args.alt_binary:
        binaries.append(load_agent_binary(args.alt_binary, option="--alt-binary"))
    return binaries


def load_recovery_core(args: argparse.Namespace) -> bytes:
    if args.recoverycore:
        path = Path(args.recoverycore)
        if not path.is_file():
            raise ConfigError(f"--recoverycore {path}: file not found")
        return path.read_bytes()
    return agents.require_package(args.agent_version).recovery_core.read_bytes()


def cycle_options(args: argparse.Namespace, mode: Mode) -> CycleOptions:
    if args.min_delay > args.max_delay and args.max_delay:
        raise ConfigError(f"--min-delay {args.min_delay} is larger than --max-delay {args.max_delay}")
    compress = {"auto": None, "on": True, "off": False}[args.compress]
    return CycleOptions(
        mode=mode,
        count=args.cycles,
        min_delay_ms=args.min_delay,
        max_delay_ms=max(args.max_delay, args.min_delay),
        block_size=args.block_size,
        first_block_size=args.first_block_size,
        compress=compress,
        fault=Fault(args.fault) if args.fault else None,
        recovery_core=load_recovery_core(args) if mode is Mode.RECOVERY else None,
        timeouts=Timeouts(reconnect=args.reconnect_timeout, block_ack=args.stall_timeout),
    )


def network_faults(args: argparse.Namespace) -> ProxyFaults | None:
    """Return the proxy faults that the --net-* options ask for, or None when there are none."""
    if not (args.net_reset_after or args.net_stall_after or args.net_latency or args.net_rate):
        return None
    if args.net_stall_seconds <= 0:
        raise ConfigError(f"--net-stall-seconds {args.net_stall_seconds:g} must be more than 0")
    return ProxyFaults(
        reset_after_bytes=args.net_reset_after,
        stall_after_bytes=args.net_stall_after,
        stall_seconds=args.net_stall_seconds if args.net_stall_after else 0.0,
        latency_ms=args.net_latency,
        bytes_per_second=args.net_rate,
        connections=args.net_faulty_connections,
    )


def _finish(report: Report, report_dir: Path | None) -> int:
    console.print(summary_table(report))
    if report_dir is not None:
        for path in report.write(report_dir):
            console.print(f"wrote {escape(str(path))}")
    failed = report.failed_cycles
    if not report.cycles:
        console.print("[red]no cycle ran[/red]")
        return 1
    return 1 if failed else 0


def command_run(args: argparse.Namespace) -> int:
    if args.cycles < 1:
        raise ConfigError(f"--cycles {args.cycles}: a run needs at least 1 cycle")
    if args.targets is not None and args.provider == "local":
        raise ConfigError(
            f"--targets {args.targets} needs --provider docker or --provider vagrant; the local provider runs the agent on this host"
        )
    modes = _parse_modes(args.mode)
    binaries = load_binaries(args)
    report = Report(settings={"provider": args.provider, "modes": [str(m) for m in modes], "cycles": args.cycles,
                              "block_size": args.block_size, "binaries": [str(b.path) for b in binaries]})
    options_by_mode = {mode: cycle_options(args, mode) for mode in modes}
    # The runners read the proxy faults from here, so they need not parse the --net-* options.
    args.network = network_faults(args)
    if args.network is not None:
        report.settings["network_faults"] = dataclasses.asdict(args.network)
    if args.targets is None:
        args.targets = "debian12-vm" if args.provider == "vagrant" else "debian12-systemd"
    if args.provider == "vagrant":
        from lab.engine.vm_run import run_vm_matrix

        return run_vm_matrix(args, options_by_mode, binaries, report, console)
    if args.provider == "docker":
        from lab.engine.docker_run import run_docker_matrix

        return run_docker_matrix(args, options_by_mode, binaries, report, console)

    from lab.agentfile import host_machine, require_linux_machine
    from lab.engine.local_run import run_local

    for binary in binaries:
        require_linux_machine(binary, host_machine(), "this host")
    report_dir = args.report_dir
    if report_dir is not None:
        prepare_report_dir(report_dir)
    with Display(console) as display, write_report_on_interrupt(
        report, lambda: report.write(report_dir) if report_dir is not None else [], plain_printer(console)
    ):
        for options in options_by_mode.values():
            display.plan("local", str(options.mode), options.count)
            asyncio.run(run_local(binaries, options, report, port=args.port, keep=args.keep,
                                  report_dir=report_dir, display=display, network=args.network))
    return _finish(report, args.report_dir)


def command_serve(args: argparse.Namespace) -> int:
    from lab.engine.serve import serve

    modes = _parse_modes(args.mode)
    binaries = load_binaries(args)
    report = Report(settings={"provider": "serve"})
    report_dir = args.report_dir
    if report_dir is not None:
        prepare_report_dir(report_dir)
    with Display(console) as display, write_report_on_interrupt(
        report, lambda: report.write(report_dir) if report_dir is not None else [], plain_printer(console)
    ):
        asyncio.run(serve(args.host, args.port, binaries, cycle_options(args, modes[0]), report, display, console))
    return _finish(report, args.report_dir)


# -- doctor, images, clean ----------------------------------------------------------------------


def command_doctor(args: argparse.Namespace) -> int:
    from lab.doctor import run_checks

    table = Table(title="updatelab doctor")
    for column in ("check", "status", "detail / fix"):
        table.add_column(column)
    failures = 0
    for check in run_checks():
        failures += not check.ok and check.required
        if check.ok:
            status = "[green]ok[/green]"
        elif check.required:
            status = "[red]missing[/red]"
        else:
            status = "[yellow]optional[/yellow]"
        table.add_row(check.name, status, check.detail)
    console.print(table)
    return 1 if failures else 0


def command_images(args: argparse.Namespace) -> int:
    from lab import images

    if args.images_command == "list":
        table = Table(title="updatelab images")
        for column in ("target", "kind", "image", "status"):
            table.add_column(column)
        present = {info.target: info for info in images.list_images()}
        for name in images.known_targets():
            recipe = images.load_recipe(name)
            info = present.get(name)
            status = "built" if info else (images.unbuildable_reason(name) or "not built")
            table.add_row(name, recipe.kind, recipe.tag, status)
        console.print(table)
        return 0
    if args.images_command == "rm":
        known = images.known_targets()
        unknown = [name for name in args.targets if name not in known]
        if unknown:
            raise ConfigError(f"unknown target {', '.join(unknown)}; known targets: {', '.join(known)}")
        for name in args.targets:
            removed = images.remove(name)
            console.print(f"{name}: removed {', '.join(removed)}" if removed else f"{name}: no image to remove")
        return 0
    with console.status("checking images …") as status:
        def progress(event: images.BuildProgress) -> None:
            status.update(f"{event.target}: {event.step}: {event.message[:100]}")

        results = images.build_targets(args.targets or None, progress=progress, rebuild=args.rebuild)
    for result in results:
        if isinstance(result, images.SkippedBuild):
            console.print(f"[yellow]{result.target}: skipped, {result.reason}[/yellow]")
        else:
            state = "cached" if result.cached else f"built in {result.seconds:.0f} s"
            console.print(f"{result.target}: {result.tag} ({state})")
    return 0


def command_reproduce(args: argparse.Namespace) -> int:
    from lab.faults import runner, scenario

    scenarios = scenario.load_many(args.scenarios)
    if args.quick:
        skipped = [item.name for item in scenarios if item.slow]
        scenarios = [item for item in scenarios if not item.slow]
        if skipped:
            console.print(f"--quick: skipping the slow scenarios {', '.join(skipped)}")
        if not scenarios:
            raise ConfigError("--quick left no scenario to run; drop --quick to run the slow ones")
    return runner.reproduce(scenarios, report_dir=args.report_dir, parallel=args.parallel, keep=args.keep, console=console)


def command_boxes(args: argparse.Namespace) -> int:
    from lab.cli_boxes import command_boxes as run_boxes_command

    return run_boxes_command(args, console)


def command_clean(args: argparse.Namespace) -> int:
    from lab.engine.docker_run import RUN_ID_PATTERN
    from lab.providers import docker as docker_provider

    if args.run_id is not None and not RUN_ID_PATTERN.fullmatch(args.run_id):
        raise ConfigError(f"--run-id {args.run_id!r} is not a run id; run ids look like 20261204-205856-3f768e")

    from lab.cli_boxes import clean_vms

    # Both parts run even when one of them fails, so that a stopped libvirtd does not keep
    # containers, nor a stopped dockerd VMs. The errors are printed in order, the last one by main.
    failures: list[LabError] = []
    try:
        removed = docker_provider.clean(args.run_id)
        console.print(f"removed {len(removed)} labelled containers and networks" + (": " + ", ".join(removed) if removed else ""))
    except LabError as error:
        failures.append(error)
    try:
        clean_vms(args.run_id, console)
    except LabError as error:
        failures.append(error)
    for error in failures[:-1]:
        console.print(f"[red]error:[/red] {escape(str(error))}", highlight=False)
    if failures:
        raise failures[-1]
    if args.run_id:
        from lab.engine.docker_run import mark_cleaned

        mark_cleaned(args.run_id)
    return 0


COMMANDS = {
    "agents": command_agents,
    "run": command_run,
    "boxes": command_boxes,
    "reproduce": command_reproduce,
    "serve": command_serve,
    "doctor": command_doctor,
    "images": command_images,
    "clean": command_clean,
}


_terminated = False


def _interrupt_on_sigterm(signum: int, frame: object) -> None:
    """Turn SIGTERM into SIGINT, so the run tears down exactly as it does after Ctrl-C."""
    global _terminated
    _terminated = True
    os.kill(os.getpid(), signal.SIGINT)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    previous = signal.signal(signal.SIGTERM, _interrupt_on_sigterm)
    try:
        return COMMANDS[args.command](args)
    except LabError as error:
        # Messages quote TOML tables such as [fault], which rich would take for markup.
        console.print(f"[red]error:[/red] {escape(str(error))}", highlight=False)
        return 2
    except KeyboardInterrupt:
        # The teardown is done; further Ctrl-C presses must not cut the exit short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if _terminated:
            console.print("[yellow]terminated; targets and temporary files were removed[/yellow]")
            return 128 + signal.SIGTERM
        console.print("[yellow]interrupted; targets and temporary files were removed[/yellow]")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
