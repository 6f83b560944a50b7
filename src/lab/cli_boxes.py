"""The ``updatelab boxes`` command and the VM part of ``updatelab clean``."""

from __future__ import annotations

import argparse
import shutil

from rich.console import Console
from rich.table import Table

from lab import boxes
from lab.errors import ConfigError, PrerequisiteError


def command_boxes(args: argparse.Namespace, console: Console) -> int:
    if args.boxes_command == "list":
        table = Table(title="updatelab boxes")
        for column in ("target", "box", "service manager", "status"):
            table.add_column(column)
        for status in boxes.list_boxes():
            definition = boxes.load_definition(status.target)
            text = "[green]present[/green]" if status.present else status.problem
            table.add_row(status.target, status.box, definition.service_manager, text)
        console.print(table)
        return 0
    if args.boxes_command == "rm":
        for name in args.targets:
            removed = boxes.remove(name)
            console.print(f"{name}: removed {', '.join(removed) if removed else 'nothing'}")
        return 0

    names = args.targets or [name for name in boxes.known_targets() if boxes.load_definition(name).source == "build"]
    for name in names:
        definition = boxes.load_definition(name)
        if definition.source != "build":
            raise ConfigError(f"{name} is not built here; add its box with `{definition.add}`")
    for name in names:
        with console.status(f"{name}: checking the box …") as status:
            def progress(event, status=status) -> None:
                status.update(f"{event.target}: {event.step}: {event.message[:100]}")

            result = boxes.build(name, progress=progress, rebuild=args.rebuild)
        state = "cached" if result.cached else f"built in {result.seconds:.0f} s"
        console.print(f"{name}: box {result.box} ({state}, key {result.key})")
    return 0


def clean_vms(run_id: str | None, console: Console) -> None:
    """Remove the VMs, volumes, networks and working folders of VM runs, when libvirt is installed."""
    if shutil.which("virsh") is None:
        return
    from lab.engine.vm_run import clean_vm_runs, work_root
    from lab.engine.docker_run import state_root
    from lab.providers import libvirt_util

    # Without a reachable libvirtd nothing can be listed, which matters only for runs that used a
    # VM. Their work root is kept until libvirtd is back, so that a later clean still finds them.
    if run_id is not None:
        vm_run_recorded = work_root(run_id).is_dir()
    else:
        runs_folder = state_root()
        vm_run_recorded = runs_folder.is_dir() and any(path.is_dir() for path in runs_folder.glob("*.vagrant"))
    try:
        libvirt_util.virsh("uri")
    except PrerequisiteError as error:
        if vm_run_recorded:
            raise
        console.print(f"VM objects were not checked, because no VM run is recorded here and {error}", markup=False, highlight=False)
        return
    removed = clean_vm_runs(run_id, only_crashed=False)
    console.print(f"removed {len(removed)} VM objects" + (": " + ", ".join(removed) if removed else ""))
