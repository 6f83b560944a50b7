"""Terminal output: one line per event that matters, a progress bar per transfer, a summary."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TaskID, TextColumn, TransferSpeedColumn
from rich.table import Table

from lab.engine.report import Report, short_hash

# Event kinds shown as lines; the rest stays in the report's timeline.
_SHOWN = {
    "connected",
    "cycle-start",
    "transfer-done",
    "disconnected",
    "core-loaded",
    "downloaded",
    "refused",
    "rejected",
    "verdict",
    "notice",
    "protocol-error",
    "console",
    "websocket",
    "provision",
    "deploy",
    "teardown",
}


class Display:
    """Renders run progress with rich; quiet when stdout is not a terminal except for lines."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console()
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            console=self.console,
            transient=True,
            disable=not sys.stdout.isatty(),
        )
        self._tasks: dict[str, TaskID] = {}

    def __enter__(self) -> Display:
        self.progress.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.progress.stop()

    def event(self, target: str, cycle: int | None, kind: str, detail: str) -> None:
        if kind not in _SHOWN:
            return
        if kind in ("transfer-done", "downloaded", "verdict") and target in self._tasks:
            self.progress.remove_task(self._tasks.pop(target))
        prefix = f"[bold]{target}[/bold]" + (f" #{cycle}" if cycle is not None else "")
        style = {"verdict": "green" if detail.startswith("passed") else "red", "protocol-error": "yellow"}.get(kind, "")
        text = f"{prefix} {kind}: {detail}"
        self.progress.console.print(f"[{style}]{text}[/{style}]" if style else text, highlight=False, markup=True)

    def transfer(self, target: str, done: int, total: int) -> None:
        task = self._tasks.get(target)
        if task is None:
            task = self._tasks[target] = self.progress.add_task(f"{target} transfer", total=total)
        self.progress.update(task, completed=done, total=total)


def summary_table(report: Report) -> Table:
    table = Table(title="updatelab summary")
    for column in ("target", "cycle", "mode", "expected", "reported", "seconds", "verdict"):
        table.add_column(column)
    for cycle in report.cycles:
        reason = cycle.reason if len(cycle.reason) <= 90 else cycle.reason[:89] + "…"
        verdict = "[green]passed[/green]" if cycle.passed else f"[red]failed[/red]: {reason}"
        table.add_row(
            cycle.target,
            str(cycle.index),
            f"{cycle.mode} ({cycle.expected_outcome})",
            short_hash(cycle.expected_hash),
            short_hash(cycle.reported_hash),
            f"{cycle.duration:.2f}",
            verdict,
        )
    return table
