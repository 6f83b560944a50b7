"""Run reports as plain data, with JSON, JUnit XML and text renderers.

A report contains a timeline (every event that matters, stamped in seconds since the run started)
and one record per update cycle with its verdict.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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
        json_path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        junit_path = directory / "junit.xml"
        junit_path.write_bytes(render_junit(self))
        return [json_path, junit_path]


@contextlib.contextmanager
def written_when_interrupted(
    report: Report, write: Callable[[], list[Path]], announce: Callable[[str], object]
) -> Iterator[None]:
    """Write the report with `write` when Ctrl-C or SIGTERM ends the block, then re-raise.

    The report then covers the cycles that finished, and its settings contain ``"interrupted": true``.
    """
    try:
        yield
    except KeyboardInterrupt:
        report.settings["interrupted"] = True
        try:
            paths = write()
        except OSError as error:
            announce(f"cannot write the report of the interrupted run: {error}")
        else:
            for path in paths:
                announce(f"wrote {path} (the run was interrupted; it covers the cycles that finished)")
        raise


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
    return ElementTree.tostring(root, encoding="utf-8", xml_declaration=True)


def short_hash(value: str | None) -> str:
    return value[:12] if value else "-"
