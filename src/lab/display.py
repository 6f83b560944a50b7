"""Terminal output of a run: a live panel with one row per target in a terminal, lines elsewhere.

In a terminal, `Display` shows a panel that rich redraws in place. Each row is one target (for
the Docker matrix, one ``target/mode`` label) with its mode, cycle, current step, transfer
progress, last verdict and elapsed time. Verdicts, errors and teardown still print as lines
above the panel, so they stay in the scrollback. When the console is not a terminal (a CI log),
every event that matters prints as one line, as before, and transfers print nothing.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from lab.engine.report import Report, short_hash

# Event kinds shown as lines when the console is not a terminal; the rest stays in the report's timeline.
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
    "fault",
    "fault-undone",
    "watchdog",
    "observed",
    "lab-error",
}

# Event kinds that also print as lines above the live panel.
_LINES_ABOVE_PANEL = {"verdict", "protocol-error", "refused", "rejected", "teardown", "fault", "watchdog", "lab-error"}

# The step a row shows after each event kind; kinds not listed leave the step unchanged.
_STEPS = {
    "provision": "starting the target",
    "deploy": "agent installed",
    "connected": "connected",
    "agent-hash": "agent hash reported",
    "cycle-start": "starting the update",
    "transfer-start": "sending the update",
    "transfer-done": "waiting for the restart",
    "disconnected": "restarting",
    "core-loaded": "recovery core loaded",
    "agentupdate-sent": "agent downloading the update",
    "downloaded": "download verified",
    "refused": "update refused (console agent)",
    "rejected": "update rejected, old binary kept",
    "protocol-error": "protocol error",
    "offline": "agent offline",
    "fault": "fault injected",
    "watchdog": "watchdog fired",
    "teardown": "torn down",
}

_MODES = ("native", "recovery")
_BAR_WIDTH = 16
_VERDICT_WIDTH = 60


@dataclasses.dataclass
class TargetRow:
    """The state of one row of the live panel."""

    target: str
    mode: str = ""
    #: Planned cycle count; None until a caller announces it with `Display.plan`.
    cycles: int | None = None
    #: Index of the current or last cycle (0-based, as in the report), None before the first one.
    cycle: int | None = None
    step: str = "waiting"
    transfer_done: int = 0
    transfer_total: int = 0
    verdict: str = ""
    passed: bool | None = None
    #: `Display.clock` readings at the row's first event and at its teardown.
    started: float | None = None
    finished: float | None = None


class Display:
    """The progress display of a run, written to `console`.

    `event` and `transfer` receive the driver's callbacks. Use the display as a context manager,
    which starts and stops the live panel. The panel is used when `live` is true, or by default
    when the console is a terminal.
    """

    def __init__(
        self,
        console: Console | None = None,
        *,
        live: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.console = console or Console()
        self.live = self.console.is_terminal if live is None else live
        self.clock = clock
        self.rows: dict[str, TargetRow] = {}
        self._live: Live | None = None
        if self.live:
            self._live = Live(
                get_renderable=self.render, console=self.console, refresh_per_second=4, transient=False
            )

    def __enter__(self) -> Display:
        if self._live is not None:
            self._live.start(refresh=True)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._live is not None:
            self._live.stop()

    # -- callbacks ------------------------------------------------------------------------------

    def plan(self, target: str, mode: str = "", cycles: int | None = None) -> None:
        """Announce a row before its first event, so the panel shows every planned target and its cycle count."""
        row = self._row(target)
        if mode:
            row.mode = mode
        if cycles is not None:
            row.cycles = cycles
        self._refresh()

    def event(self, target: str, cycle: int | None, kind: str, detail: str) -> None:
        """Record one timeline event of `target` and print it as a line where it matters."""
        if self.live:
            self._update_row(target, cycle, kind, detail)
            if kind in _LINES_ABOVE_PANEL:
                self._print_line(target, cycle, kind, detail)
            self._refresh()
        elif kind in _SHOWN:
            self._print_line(target, cycle, kind, detail)

    def transfer(self, target: str, done: int, total: int) -> None:
        """Record the bytes of the current update that the agent has acknowledged or downloaded."""
        if not self.live:
            return
        row = self._row(target)
        row.transfer_done, row.transfer_total = done, total
        # No immediate refresh: blocks arrive hundreds of times a second, and the panel redraws 4 times a second anyway.

    # -- rendering ------------------------------------------------------------------------------

    def render(self) -> RenderableType:
        """Build the panel: one table row per target, in the order the targets appeared."""
        table = Table(title="updatelab run", title_justify="left", expand=False)
        for column in ("target", "mode", "cycle", "step", "transfer", "last verdict", "elapsed"):
            table.add_column(column, no_wrap=column != "last verdict")
        now = self.clock()
        # The live panel renders from its refresh thread, so iterate over a copy.
        for row in list(self.rows.values()):
            table.add_row(
                row.target,
                row.mode,
                _cycle_text(row),
                row.step,
                _transfer_cell(row),
                _verdict_text(row),
                _elapsed_text(row, now),
            )
        return Group(table)

    def _row(self, target: str) -> TargetRow:
        row = self.rows.get(target)
        if row is None:
            row = self.rows[target] = TargetRow(target, mode=_mode_of_label(target))
        return row

    def _update_row(self, target: str, cycle: int | None, kind: str, detail: str) -> None:
        row = self._row(target)
        if row.started is None:
            row.started = self.clock()
        if cycle is not None:
            row.cycle = cycle
        if kind == "cycle-start":
            # The detail starts with the mode: "native update to ...".
            mode = detail.split(" ", 1)[0]
            if mode in _MODES:
                row.mode = mode
            row.transfer_done = row.transfer_total = 0
        if kind == "provision":
            row.finished = None
        if kind == "verdict":
            row.verdict = detail
            row.passed = detail.startswith("passed")
            row.step = "passed" if row.passed else "failed"
        elif kind in _STEPS:
            row.step = _STEPS[kind]
        if kind == "teardown":
            row.finished = self.clock()

    def _print_line(self, target: str, cycle: int | None, kind: str, detail: str) -> None:
        text = Text()
        text.append(target, style="bold")
        if cycle is not None:
            text.append(f" #{cycle}")
        text.append(f" {kind}: {detail}")
        if kind == "verdict":
            text.stylize("green" if detail.startswith("passed") else "red")
        elif kind == "protocol-error":
            text.stylize("yellow")
        self.console.print(text, highlight=False)

    def _refresh(self) -> None:
        if self._live is not None and self._live.is_started:
            self._live.refresh()


def _mode_of_label(target: str) -> str:
    """Return the mode in a Docker matrix label such as ``debian12-systemd/native``, or ''."""
    _, _, mode = target.rpartition("/")
    return mode if mode in _MODES else ""


def _cycle_text(row: TargetRow) -> str:
    if row.cycle is None:
        return f"-/{row.cycles}" if row.cycles is not None else "-"
    # A cycle's index counts from 0; the panel counts from 1, like the planned count.
    return f"{row.cycle + 1}/{row.cycles}" if row.cycles is not None else str(row.cycle + 1)


def _elapsed_text(row: TargetRow, now: float) -> str:
    if row.started is None:
        return ""
    end = row.finished if row.finished is not None else now
    return f"{end - row.started:.0f} s"


def _transfer_cell(row: TargetRow) -> RenderableType:
    if row.transfer_total <= 0:
        return Text("")
    percent = 100 * row.transfer_done / row.transfer_total
    cell = Table.grid(padding=(0, 1))
    cell.add_row(
        ProgressBar(total=row.transfer_total, completed=row.transfer_done, width=_BAR_WIDTH),
        Text(f"{row.transfer_done / 1e6:.2f}/{row.transfer_total / 1e6:.2f} MB {percent:3.0f}%"),
    )
    return cell


def _verdict_text(row: TargetRow) -> Text:
    if not row.verdict:
        return Text("")
    verdict = row.verdict if len(row.verdict) <= _VERDICT_WIDTH else row.verdict[: _VERDICT_WIDTH - 1] + "…"
    return Text(verdict, style="green" if row.passed else "red")


def summary_table(report: Report) -> Table:
    table = Table(title="updatelab summary")
    for column in ("target", "cycle", "mode", "expected", "reported", "seconds", "verdict"):
        table.add_column(column)
    # Sorted by target: parallel targets finish their cycles in no particular order.
    for cycle in sorted(report.cycles, key=lambda cycle: cycle.target):
        reason = cycle.reason if len(cycle.reason) <= 90 else cycle.reason[:89] + "…"
        verdict = "[green]passed[/green]" if cycle.passed else f"[red]failed[/red]: {escape(reason)}"
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


def plain_printer(console: Console) -> Callable[[str], None]:
    """Return a function that prints text to `console` as it is, without rich markup or highlighting.

    Paths and error messages may contain brackets, which rich would otherwise read as markup.
    """

    def print_plain(text: str) -> None:
        console.print(text, markup=False, highlight=False)

    return print_plain
