"""Fault scenarios against the real agent in containers: a bounded subset of the catalogue.

`make lab-faults` runs every scenario. These tests run one of each kind of fault (network,
server, target, watchdog, version change) and check the report, the evidence and the teardown.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_docker_lab import REPO, _run_cli, labelled_objects, needs_docker, run_id_of

SUBSET = [
    "corrupted-block",  # server fault, native
    "network-reset-mid-transfer",  # proxy fault
    "kill-during-transfer",  # target fault
    "other-certificate-recovery",  # recovery mode
    "disk-full-during-transfer",  # the watchdog catches a hung agent
    "update-0.7.99-to-1.1.55",  # between releases
]


@needs_docker
@pytest.mark.docker
@pytest.mark.agent
def test_subset_of_scenarios_against_the_real_agent(tmp_path: Path, agent_packages) -> None:
    files = [str(REPO / "scenarios" / f"{name}.toml") for name in SUBSET]
    result = _run_cli("reproduce", *files, "--parallel", "2", "--report-dir", str(tmp_path), timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]

    report = json.loads((tmp_path / "report.json").read_text())
    scenarios = {entry["name"]: entry for entry in report["scenarios"]}
    assert list(scenarios) == SUBSET
    for name, entry in scenarios.items():
        assert entry["verdict"] == "passed", (name, entry["reason"])
        assert set(entry["expected"]) <= set(entry["observed"]), name
        assert entry["fault"] and entry["evidence"], name
        for path in entry["evidence"]:
            assert Path(path).is_file(), path
        assert (tmp_path / name / "timeline.json").is_file()

    # The agent keeps its old binary after a corrupted block: the faulted cycle was rejected
    # on the same connection, and the clean cycle afterwards passed its in-target checks.
    corrupted = scenarios["corrupted-block"]
    assert [cycle["kind"] for cycle in corrupted["cycles"]] == ["faulted", "clean"]
    assert corrupted["cycles"][1]["checks"]["pid-changed"]["ok"]

    # The watchdog reports how long the agent was silent and what its process was doing.
    hung = scenarios["disk-full-during-transfer"]["hung"]
    assert hung["watchdog_seconds"] == 60
    assert hung["agent_silent_seconds"] > 10
    assert "wchan" in hung["processes"]

    # The proxy reset shows in the timeline, and the agent came back on its own.
    kinds = [entry["kind"] for entry in report["timeline"] if entry["target"] == "network-reset-mid-transfer"]
    assert "fault" in kinds
    assert kinds.count("connected") >= 2

    junit = (tmp_path / "junit.xml").read_text()
    assert junit.count("<testcase") == len(SUBSET)
    assert "<failure" not in junit
    assert labelled_objects(run_id_of(tmp_path)) == []


@needs_docker
@pytest.mark.docker
@pytest.mark.agent
def test_bad_scenario_file_names_the_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('description = "x"\n[fault]\nkind = "meteor"\n[expect]\noutcomes = ["updated"]\n')
    result = _run_cli("reproduce", str(path))
    assert result.returncode == 2
    assert "kind 'meteor' is unknown; allowed values:" in result.stdout


INTERRUPTIONS = {
    "ctrl-c": (signal.SIGINT, 1, 130),
    "ctrl-c-three-times": (signal.SIGINT, 3, 130),
    "sigterm": (signal.SIGTERM, 1, 143),
}


@needs_docker
@pytest.mark.docker
@pytest.mark.agent
@pytest.mark.parametrize("interruption", INTERRUPTIONS.values(), ids=INTERRUPTIONS.keys())
def test_interrupted_scenario_leaves_nothing(tmp_path: Path, agent_packages, interruption) -> None:
    signal_number, presses, exit_status = interruption
    state = {"XDG_STATE_HOME": str(tmp_path / "state")}
    process = subprocess.Popen(
        [sys.executable, "-m", "lab", "reproduce", str(REPO / "scenarios" / "disk-full-during-transfer.toml"),
         "--report-dir", str(tmp_path / "report")],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **state},
    )
    assert process.stdout is not None
    deadline = time.monotonic() + 240
    seen = []
    for line in process.stdout:
        seen.append(line)
        # The agent sleeps in its write path from here on.
        if "disk-full" in line and "fault" in line or time.monotonic() > deadline:
            break
    for _ in range(presses):
        process.send_signal(signal_number)
        time.sleep(0.3)
    output = "".join(seen) + process.communicate(timeout=120)[0]
    assert process.returncode == exit_status, output[-3000:]
    assert "Traceback" not in output
    assert "targets and temporary files were removed" in output
    (state_file,) = (tmp_path / "state" / "updatelab" / "runs").glob("*.json")
    state_data = json.loads(state_file.read_text())
    assert state_data["status"] == "cleaned"
    assert labelled_objects(state_data["run_id"]) == []
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["settings"]["interrupted"] is True
    assert report["scenarios"] == []
    assert "run interrupted" in (tmp_path / "report" / "junit.xml").read_text()
