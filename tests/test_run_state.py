"""Run state files and crash recovery, with Docker replaced by a recorder."""

from __future__ import annotations

import json

import pytest

from lab.engine import docker_run
from lab.engine.report import prepare_report_dir
from lab.errors import ConfigError


@pytest.fixture
def state_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    folder = tmp_path / "updatelab" / "runs"
    folder.mkdir(parents=True)
    return folder


@pytest.fixture
def cleaned(monkeypatch):
    calls: list[str | None] = []

    def record(run_id=None, **_):
        calls.append(run_id)
        return [f"container updatelab-{run_id}-x"]

    monkeypatch.setattr(docker_run.docker_provider, "clean", record)
    return calls


DEAD_PID = 2**22 + 1  # above the kernel's default pid_max, so no process has it


def test_crashed_run_is_cleaned_once(state_home, cleaned):
    path = state_home / "r1.json"
    path.write_text(json.dumps({"run_id": "20261204-000000-abcdef", "pid": DEAD_PID, "status": "started"}))
    assert docker_run.recover_crashed_runs() == ["container updatelab-20261204-000000-abcdef-x"]
    assert cleaned == ["20261204-000000-abcdef"]
    assert json.loads(path.read_text())["status"] == "cleaned"
    assert docker_run.recover_crashed_runs() == []
    assert cleaned == ["20261204-000000-abcdef"]


@pytest.mark.parametrize(
    "text",
    [
        "[1, 2]",
        "{}",
        json.dumps({"run_id": None, "pid": DEAD_PID}),
        json.dumps({"run_id": "", "pid": DEAD_PID}),
        json.dumps({"run_id": "a b", "pid": DEAD_PID}),
        "not json",
        "\udcff",
    ],
)
def test_malformed_state_file_is_skipped(state_home, cleaned, text):
    (state_home / "bad.json").write_text(text, errors="surrogateescape")
    assert docker_run.recover_crashed_runs() == []
    # Above all, no call with a missing run id, which would select every run's containers.
    assert cleaned == []


def test_running_process_is_left_alone(state_home, cleaned):
    import os

    (state_home / "live.json").write_text(json.dumps({"run_id": "live-run", "pid": os.getpid(), "status": "started"}))
    assert docker_run.recover_crashed_runs() == []
    assert cleaned == []


def test_report_dir_must_be_writable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=r"cannot write the report to .*file/sub.*pick another --report-dir"):
        prepare_report_dir(blocker / "sub")
    prepare_report_dir(tmp_path / "new" / "dir")
    assert (tmp_path / "new" / "dir").is_dir()
    assert list((tmp_path / "new" / "dir").iterdir()) == []


def test_mark_cleaned(state_home):
    path = state_home / "run-x.json"
    path.write_text(json.dumps({"run_id": "run-x", "status": "started"}))
    docker_run.mark_cleaned("run-x")
    assert json.loads(path.read_text())["status"] == "cleaned"
    docker_run.mark_cleaned("absent")  # no file: nothing to do


def test_clean_reaches_vms_after_docker_fails(state_home, monkeypatch, capsys):
    from lab import cli, cli_boxes
    from lab.errors import PrerequisiteError
    from lab.providers import docker as docker_provider

    def docker_stopped(run_id):
        raise PrerequisiteError("the Docker daemon is not running")

    def libvirtd_stopped(run_id, console):
        vm_calls.append(run_id)
        raise PrerequisiteError("libvirtd is not reachable")

    vm_calls = []
    marked = []
    monkeypatch.setattr(docker_provider, "clean", docker_stopped)
    monkeypatch.setattr(cli_boxes, "clean_vms", libvirtd_stopped)
    monkeypatch.setattr(docker_run, "mark_cleaned", marked.append)
    assert cli.main(["clean", "--run-id", "20260101-000000-cccccc"]) == 2
    assert vm_calls == ["20260101-000000-cccccc"]
    assert marked == []
    output = capsys.readouterr().out
    assert output.index("the Docker daemon is not running") < output.index("libvirtd is not reachable")


@pytest.mark.parametrize("run_id", ["", "-leading-dash", "has space", "slash/in", "ünï"])
def test_provider_rejects_invalid_run_id(run_id):
    from lab.providers.base import check_run_id

    with pytest.raises(ValueError, match="invalid run id"):
        check_run_id(run_id)


def test_provider_accepts_lab_run_id():
    from lab.providers.base import check_run_id

    assert check_run_id("20261204-205856-3f768e") is None
