"""Run reports as plain data, with JSON, JUnit XML and text renderers.

A report contains a timeline (every event that matters, stamped in seconds since the run started)
and one record per update cycle with its verdict.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lab.errors import ConfigError

PASSED = "passed"
FAILED = "failed"


@dataclasses.dataclass(frozen=True)
class TimelineEntry:
    time: float  # seconds since the run started
    target: str
    cycle: int | None
    kind: str
    detail: str = ""


@dataclasses.dataclass
class CycleResult:
    """The verdict on one update cycle of one target."""

    target: str
    index: int
    mode: str
    expected_hash: str
    reported_hash: str | None
    duration: float
    verdict: str
    reason: str = ""
    #: What the lab expected: "updated", or a known outcome such as "rejected".
    expected_outcome: str = "updated"
    checks: dict[str, Any] = dataclasses.field(default_factory=dict)
    evidence: list[str] = dataclasses.field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.verdict == PASSED


@dataclasses.dataclass
class Report:
    started: float = dataclasses.field(default_factory=time.time)
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    cycles: list[CycleResult] = dataclasses.field(default_factory=list)
    timeline: list[TimelineEntry] = dataclasses.field(default_factory=list)
    targets: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    protocol_errors: int = 0

    def add_event(self, target: str, cycle: int | None, kind: str, detail: str = "") -> TimelineEntry:
        entry = TimelineEntry(round(time.time() - self.started, 3), target, cycle, kind, detail)
        self.timeline.append(entry)
        return entry

    @property
    def failed_cycles(self) -> list[CycleResult]:
        return [cycle for cycle in self.cycles if not cycle.passed]

    def to_dict(self) -> dict[str, Any]:
        return {
            "started": self.started,
            "settings": self.settings,
            "targets": self.targets,
            "protocol_errors": self.protocol_errors,
            "summary": {
                "cycles": len(self.cycles),
                "passed": sum(cycle.passed for cycle in self.cycles),
                "failed": len(self.failed_cycles),
            },
            "cycles": [dataclasses.asdict(cycle) for cycle in self.cycles],
            "timeline": [dataclasses.asdict(entry) for entry in self.timeline],
        }

    def write(self, directory: Path) -> list[Path]:
        """Write report.json and junit.xml into `directory` and return their paths."""
        directory.mkdir(parents=True, exist_ok=True)
        json_path = directory / "report.json"
        replace_file(json_path, (json.dumps(self.to_dict(), indent=2) + "\n").encode())
        junit_path = directory / "junit.xml"
        replace_file(junit_path, render_junit(self))
        return [json_path, junit_path]


def replace_file(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file next to `path`, then rename it over `path`.

    A reader, or a run cut short while writing, finds either the old file or the new one.
    """
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def prepare_report_dir(path: Path) -> None:
    """Create `path` and check that files can be written in it, before anything is started."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"cannot write the report to {path}: it is a file, not a folder. Pick another --report-dir.")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".updatelab-write-check"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise ConfigError(f"cannot write the report to {path}: {error.strerror or error}; pick another --report-dir") from None


@contextlib.contextmanager
def write_report_on_interrupt(
    report: Report, write: Callable[[], list[Path]], announce: Callable[[str], object], *, unit: str = "cycles"
) -> Iterator[None]:
    """Run the block, and when Ctrl-C or SIGTERM ends it, write the report with `write` and re-raise.

    The report then covers the `unit` (cycles or scenarios) that finished, and its settings
    contain ``"interrupted": true``. Ctrl-C is ignored while the files are written.
    """
    try:
        yield
    except KeyboardInterrupt:
        report.settings["interrupted"] = True
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            paths = write()
        except OSError as error:
            announce(f"failed to write the report of the interrupted run: {error}")
        else:
            if paths:
                written = ", ".join(str(path) for path in paths)
                announce(f"wrote {written}: a partial report of the {unit} that finished before the interruption")
        finally:
            signal.signal(signal.SIGINT, previous)
        raise


def add_interruption_case(root: ElementTree.Element, report: Report, finished: int, unit: str) -> None:
    """Add a test suite with one erroring test case to `root` when the report's run was interrupted.

    Without it, a JUnit reader would show an interrupted run whose finished cases passed as green.
    """
    if not report.settings.get("interrupted"):
        return
    suite = ElementTree.SubElement(root, "testsuite", name="updatelab run", tests="1", errors="1", failures="0", time="0")
    case = ElementTree.SubElement(suite, "testcase", classname="updatelab", name="run interrupted")
    ElementTree.SubElement(case, "error", message=f"the run was interrupted ({unit} finished: {finished})")


def render_junit(report: Report) -> bytes:
    """Render one JUnit test suite per target and one test case per cycle."""
    root = ElementTree.Element("testsuites", name="updatelab")
    targets: dict[str, list[CycleResult]] = {}
    for cycle in report.cycles:
        targets.setdefault(cycle.target, []).append(cycle)
    for target, cycles in targets.items():
        suite = ElementTree.SubElement(
            root,
            "testsuite",
            name=target,
            tests=str(len(cycles)),
            failures=str(sum(not cycle.passed for cycle in cycles)),
            time=f"{sum(cycle.duration for cycle in cycles):.3f}",
        )
        for cycle in cycles:
            case = ElementTree.SubElement(
                suite, "testcase", classname=target, name=f"cycle {cycle.index} {cycle.mode}", time=f"{cycle.duration:.3f}"
            )
            if not cycle.passed:
                failure = ElementTree.SubElement(case, "failure", message=cycle.reason)
                failure.text = json.dumps(dataclasses.asdict(cycle), indent=2)
    add_interruption_case(root, report, len(report.cycles), "cycles")
    return ElementTree.tostring(root, encoding="utf-8", xml_declaration=True)


def short_hash(value: str | None) -> str:
    return value[:12] if value else "-"
