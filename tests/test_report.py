"""Tests of lab.engine.report: the report files, and the report of an interrupted run."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ElementTree

import pytest

from lab.engine.report import PASSED, CycleResult, Report, write_report_on_interrupt


def one_cycle_report() -> Report:
    report = Report(settings={"run_id": "20260101-000000-aaaaaa"})
    report.cycles.append(CycleResult("debian12-systemd", 1, "native", "ab" * 24, "ab" * 24, 3.5, PASSED))
    return report


def test_interrupt_writes_finished_cycles(tmp_path):
    report = one_cycle_report()
    lines = []
    with pytest.raises(KeyboardInterrupt):
        with write_report_on_interrupt(report, lambda: report.write(tmp_path), lines.append):
            raise KeyboardInterrupt

    data = json.loads((tmp_path / "report.json").read_text())
    assert data["settings"]["interrupted"] is True
    assert [cycle["index"] for cycle in data["cycles"]] == [1]
    assert lines == [
        f"wrote {tmp_path / 'report.json'}, {tmp_path / 'junit.xml'}: "
        "a partial report of the cycles that finished before the interruption"
    ]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["junit.xml", "report.json"]


def test_interrupted_junit_has_error_case(tmp_path):
    report = one_cycle_report()
    with pytest.raises(KeyboardInterrupt):
        with write_report_on_interrupt(report, lambda: report.write(tmp_path), lambda line: None):
            raise KeyboardInterrupt

    root = ElementTree.parse(tmp_path / "junit.xml").getroot()
    errors = root.findall("./testsuite/testcase/error")
    assert [error.get("message") for error in errors] == ["the run was interrupted (cycles finished: 1)"]
    assert root.findall("./testsuite/testcase/failure") == []


def test_uninterrupted_junit_has_no_error_case(tmp_path):
    report = one_cycle_report()
    with write_report_on_interrupt(report, lambda: report.write(tmp_path), lambda line: None):
        pass

    assert not (tmp_path / "report.json").exists()
    report.write(tmp_path)
    root = ElementTree.parse(tmp_path / "junit.xml").getroot()
    assert root.findall("./testsuite/testcase/error") == []
    assert "interrupted" not in json.loads((tmp_path / "report.json").read_text())["settings"]


def test_interrupt_with_unwritable_report(tmp_path):
    report = one_cycle_report()
    blocker = tmp_path / "report"
    blocker.write_text("a file where the report folder should be")
    lines = []
    with pytest.raises(KeyboardInterrupt):
        with write_report_on_interrupt(report, lambda: report.write(blocker), lines.append):
            raise KeyboardInterrupt

    assert len(lines) == 1
    assert lines[0].startswith("failed to write the report of the interrupted run: ")


def test_write_replaces_existing_report(tmp_path):
    (tmp_path / "report.json").write_text("{an older, longer report that must not survive in part}")
    report = one_cycle_report()
    report.write(tmp_path)

    assert json.loads((tmp_path / "report.json").read_text())["summary"]["cycles"] == 1
    assert sorted(path.name for path in tmp_path.iterdir()) == ["junit.xml", "report.json"]
