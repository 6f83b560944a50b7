"""Tests of the run display: the live panel in a terminal and the line output elsewhere."""

from __future__ import annotations

import io

from rich.console import Console

from lab.display import Display


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def terminal_console() -> Console:
    return Console(file=io.StringIO(), force_terminal=True, width=200, record=True, color_system=None)


def plain_console() -> Console:
    return Console(file=io.StringIO(), force_terminal=False, width=200, record=True)


def rendered_panel(display: Display) -> str:
    console = Console(file=io.StringIO(), width=200, record=True)
    console.print(display.render())
    return console.export_text()


def panel_line(text: str, target: str) -> str:
    lines = [line for line in text.splitlines() if f" {target} " in line]
    assert len(lines) == 1, f"expected one row for {target} in:\n{text}"
    return lines[0]


def panel_cells(text: str, target: str) -> dict[str, str]:
    """Return the cells of `target`'s row by column name."""
    cells = [cell.strip() for cell in panel_line(text, target).strip()[1:-1].split("│")]
    columns = ("target", "mode", "cycle", "step", "transfer", "last verdict", "elapsed")
    assert len(cells) == len(columns), cells
    return dict(zip(columns, cells))


def test_display_live_by_terminal():
    assert Display(terminal_console()).live
    assert not Display(plain_console()).live


def test_panel_planned_rows_before_events():
    display = Display(terminal_console(), clock=FakeClock())
    display.plan("debian12-systemd/native", "native", 3)
    display.plan("debian12-systemd/recovery", "recovery", 3)

    text = rendered_panel(display)
    native = panel_cells(text, "debian12-systemd/native")
    recovery = panel_cells(text, "debian12-systemd/recovery")
    assert native["mode"] == "native"
    assert native["cycle"] == "-/3"
    assert native["step"] == "waiting"
    assert native["elapsed"] == "", "a row that has not started shows no elapsed time"
    assert recovery["mode"] == "recovery"
    assert recovery["cycle"] == "-/3"


def test_panel_follows_a_native_cycle():
    clock = FakeClock()
    display = Display(terminal_console(), clock=clock)
    target = "debian12-systemd/native"
    display.plan(target, "native", 3)
    display.event(target, None, "provision", "starting a systemd container")
    display.event(target, None, "connected", "connection 1")
    display.event(target, 0, "cycle-start", "native update to meshagent_x86-64 (434bf98c5d4f), expecting updated")
    display.event(target, 0, "transfer-start", "3749328 bytes in blocks of 65531")
    display.transfer(target, 1_000_000, 4_000_000)
    clock.now += 12

    cells = panel_cells(rendered_panel(display), target)
    assert cells["cycle"] == "1/3"
    assert cells["step"] == "sending the update"
    assert cells["transfer"].endswith("1.00/4.00 MB  25%")
    assert cells["elapsed"] == "12 s"

    display.event(target, 0, "transfer-done", "3749328 bytes in 0.1 s, final hash sent")
    display.event(target, 0, "disconnected", "connection lost")
    assert "restarting" in panel_line(rendered_panel(display), target)

    display.event(target, 0, "verdict", "passed")
    display.event(target, 1, "cycle-start", "native update to meshagent_x86-64 (434bf98c5d4f), expecting updated")
    cells = panel_cells(rendered_panel(display), target)
    assert cells["cycle"] == "2/3"
    assert cells["step"] == "starting the update"
    assert cells["last verdict"] == "passed"
    assert cells["transfer"] == "", "a new cycle clears the previous transfer"


def test_panel_shows_failed_verdict():
    display = Display(terminal_console(), clock=FakeClock())
    target = "debian12-sysvinit/native"
    display.event(target, 2, "verdict", "failed: no reconnect: the agent did not reconnect after the update")

    cells = panel_cells(rendered_panel(display), target)
    assert cells["cycle"] == "3"
    assert cells["step"] == "failed"
    assert cells["last verdict"].startswith("failed: no reconnect")


def test_panel_shortens_long_verdicts():
    display = Display(terminal_console(), clock=FakeClock())
    display.event("t/native", 0, "verdict", "failed: " + "x" * 200)

    verdict = panel_cells(rendered_panel(display), "t/native")["last verdict"]
    assert verdict.endswith("…")
    assert len(verdict) == 60


def test_panel_mode_from_cycle_start():
    display = Display(terminal_console(), clock=FakeClock())
    display.event("local", 0, "cycle-start", "recovery update to meshagent_x86-64 (434bf98c5d4f), expecting console-refusal")

    cells = panel_cells(rendered_panel(display), "local")
    assert cells["mode"] == "recovery"
    assert cells["cycle"] == "1"


def test_panel_elapsed_stops_at_teardown():
    clock = FakeClock()
    display = Display(terminal_console(), clock=clock)
    display.event("t/native", None, "provision", "starting")
    clock.now += 5
    display.event("t/native", None, "teardown", "container removed")
    clock.now += 60

    cells = panel_cells(rendered_panel(display), "t/native")
    assert cells["elapsed"] == "5 s"
    assert cells["step"] == "torn down"


def test_live_prints_important_lines_only():
    console = terminal_console()
    with Display(console, clock=FakeClock()) as display:
        display.event("t/native", None, "connected", "connection 7 from 10.0.0.2")
        display.event("t/native", 0, "verdict", "passed")
        display.event("t/native", 0, "protocol-error", "unmasked frame")
        display.event("t/native", None, "teardown", "container removed")

    # The recorded text has no cursor movements, so lines printed above the panel follow its last border.
    text = console.export_text()
    assert "t/native #0 verdict: passed\n" in text
    assert "t/native #0 protocol-error: unmasked frame\n" in text
    assert "t/native teardown: container removed\n" in text
    assert "connected: connection 7" not in text


def test_live_panel_stays_after_exit():
    console = terminal_console()
    with Display(console, clock=FakeClock()) as display:
        display.plan("debian12-openrc/recovery", "recovery", 2)
        display.event("debian12-openrc/recovery", 1, "verdict", "passed")

    text = console.export_text()
    assert "updatelab run" in text
    row = [line for line in text.splitlines() if "debian12-openrc/recovery" in line and "2/2" in line]
    assert row, text


def test_lines_without_terminal():
    console = plain_console()
    with Display(console) as display:
        display.event("t/native", None, "connected", "connection 7 from 10.0.0.2")
        display.event("t/native", 0, "agent-hash", "434bf98c5d4f")
        display.transfer("t/native", 10, 100)
        display.event("t/native", 0, "verdict", "failed: wrong hash")

    lines = console.export_text().splitlines()
    assert lines == [
        "t/native connected: connection 7 from 10.0.0.2",
        "t/native #0 verdict: failed: wrong hash",
    ]


def test_lines_keep_brackets_literal():
    console = plain_console()
    display = Display(console)
    display.event("local", 0, "console", "[red]not markup[/red] [1/2]")

    assert console.export_text().strip() == "local #0 console: [red]not markup[/red] [1/2]"


def test_transfer_before_any_event():
    display = Display(terminal_console(), clock=FakeClock())
    display.transfer("t/recovery", 512, 1024)

    cells = panel_cells(rendered_panel(display), "t/recovery")
    assert cells["transfer"].endswith("0.00/0.00 MB  50%"), "sizes are in MB with two decimals"
    assert cells["mode"] == "recovery"
