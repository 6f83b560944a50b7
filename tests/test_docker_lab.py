"""The Linux matrix end to end: real agent, real init systems, in containers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lab import agents
from lab.engine.expectations import Expectations, judge_matrix
from lab.engine.report import FAILED, PASSED, CycleResult, Report
from lab.errors import ConfigError
from lab.providers import docker as docker_provider

REPO = Path(__file__).resolve().parent.parent


def _docker_available() -> str | None:
    try:
        from lab.providers.docker import connect

        connect(timeout=10)
    except Exception as error:  # any failure means the container tests cannot run here
        return str(error)
    return None


_DOCKER_PROBLEM = _docker_available()
needs_docker = pytest.mark.skipif(_DOCKER_PROBLEM is not None, reason=f"Docker cannot run here: {_DOCKER_PROBLEM}")


def labelled_objects(run_id: str) -> list[str]:
    """Return the containers and networks labelled with `run_id`; other runs on this engine do not count."""
    from lab.providers.docker import connect, run_label_filter

    client = connect()
    selector = run_label_filter(run_id)
    names = [c.name for c in client.containers.list(all=True, filters={"label": selector})]
    names += [n.name for n in client.networks.list(filters={"label": selector})]
    return names


def run_id_of(report_dir: Path) -> str:
    return json.loads((report_dir / "report.json").read_text())["settings"]["run_id"]


def _run_cli(*arguments: str, timeout: float = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lab", *arguments], capture_output=True, text=True, timeout=timeout, cwd=REPO, check=False,
        env={**os.environ, **(env or {})},
    )


# -- expectations, no Docker needed ---------------------------------------------------------------


def _write_expectations(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "expectations.toml"
    path.write_text(text)
    return path


def _report_with(label: str, verdict: str, reason: str = "") -> Report:
    report = Report()
    report.cycles.append(CycleResult(label, 0, "native", "aa", "aa", 1.0, verdict, reason))
    return report


def test_expectations_known_failure_matches(tmp_path: Path) -> None:
    path = _write_expectations(
        tmp_path, '[[known_failure]]\ntarget = "t"\nmode = "native"\nreason = "no reconnect"\nevidence = "log"\n'
    )
    verdict = judge_matrix(_report_with("t/native", FAILED, "no reconnect: within 45 s"), Expectations.load(path), ["t/native"])
    assert verdict["ok"]


def test_expectations_unexpected_pass_is_mismatch(tmp_path: Path) -> None:
    path = _write_expectations(
        tmp_path, '[[known_failure]]\ntarget = "t"\nmode = "native"\nreason = "no reconnect"\nevidence = "log"\n'
    )
    verdict = judge_matrix(_report_with("t/native", PASSED), Expectations.load(path), ["t/native"])
    assert not verdict["ok"]
    assert "unexpected pass" in verdict["lines"][0]


def test_expectations_unlisted_failure_is_mismatch(tmp_path: Path) -> None:
    verdict = judge_matrix(_report_with("t/native", FAILED, "wrong hash"), Expectations({}), ["t/native"])
    assert not verdict["ok"]


def test_expectations_intermittent_pass_matches(tmp_path: Path) -> None:
    path = _write_expectations(
        tmp_path,
        '[[known_failure]]\ntarget = "t"\nmode = "native"\nreason = "no reconnect"\nevidence = "log"\n'
        "intermittent = true\n",
    )
    verdict = judge_matrix(_report_with("t/native", PASSED), Expectations.load(path), ["t/native"])
    assert verdict["ok"]
    assert "did not occur" in verdict["lines"][0]


def test_expectations_other_reason_is_mismatch(tmp_path: Path) -> None:
    path = _write_expectations(
        tmp_path, '[[known_failure]]\ntarget = "t"\nmode = "native"\nreason = "no reconnect"\nevidence = "log"\n'
    )
    verdict = judge_matrix(_report_with("t/native", FAILED, "wrong hash"), Expectations.load(path), ["t/native"])
    assert not verdict["ok"]


def test_expectations_missing_field_names_it(tmp_path: Path) -> None:
    path = _write_expectations(tmp_path, '[[known_failure]]\ntarget = "t"\nmode = "native"\n')
    with pytest.raises(ConfigError, match="missing evidence, reason"):
        Expectations.load(path)


def test_expectations_bad_mode_names_allowed(tmp_path: Path) -> None:
    path = _write_expectations(
        tmp_path, '[[known_failure]]\ntarget = "t"\nmode = "fast"\nreason = "x"\nevidence = "y"\n'
    )
    with pytest.raises(ConfigError, match="use native or recovery"):
        Expectations.load(path)


def test_repository_expectations_load() -> None:
    expectations = Expectations.load(REPO / "expectations.toml")
    assert "debian12-sysvinit/native" in expectations.failures


def test_unknown_target_lists_known() -> None:
    result = _run_cli("run", "--provider", "docker", "--targets", "nosuch-target", "--cycles", "1")
    assert result.returncode == 2
    assert "unknown target nosuch-target" in result.stdout
    assert "debian12-systemd" in result.stdout


@needs_docker
@pytest.mark.docker
@pytest.mark.agent
def test_binary_for_other_cpu_rejected(tmp_path: Path, agent_packages) -> None:
    amd64_agent = agent_packages[agents.DEFAULT_VERSION].binary("meshagent_x86-64")
    state = {"XDG_STATE_HOME": str(tmp_path / "state")}
    result = _run_cli(
        "run", "--provider", "docker", "--targets", "debian12-i386-systemd", "--binary", str(amd64_agent),
        "--cycles", "1", "--report-dir", str(tmp_path / "report"), env=state,
    )
    assert result.returncode == 2, result.stdout
    assert "an ELF executable for x86-64, but target debian12-i386-systemd runs x86 Linux builds" in result.stdout
    assert "meshagent_x86." in result.stdout
    assert not (tmp_path / "state" / "updatelab" / "runs").exists()


# -- container runs -----------------------------------------------------------------------------


@needs_docker
@pytest.mark.docker
@pytest.mark.agent
def test_systemd_native_and_recovery(tmp_path: Path, agent_packages) -> None:
    result = _run_cli(
        "run", "--provider", "docker", "--targets", "debian12-systemd", "--mode", "native,recovery",
        "--cycles", "2", "--report-dir", str(tmp_path),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    verdicts = {(c["target"], c["index"]): c["verdict"] for c in report["cycles"]}
    assert verdicts == {
        ("debian12-systemd/native", 0): "passed",
        ("debian12-systemd/native", 1): "passed",
        ("debian12-systemd/recovery", 0): "passed",
        ("debian12-systemd/recovery", 1): "passed",
    }
    native = [c for c in report["cycles"] if c["target"] == "debian12-systemd/native"]
    assert native[0]["checks"]["pid-changed"]["ok"]
    assert native[0]["checks"]["service-running"]["ok"]
    assert native[0]["checks"]["no-update-file"]["ok"]
    recovery = [c for c in report["cycles"] if c["target"] == "debian12-systemd/recovery"]
    assert recovery[0]["checks"]["pid-kept"]["ok"]
    kinds = [entry["kind"] for entry in report["timeline"] if entry["target"] == "debian12-systemd/recovery"]
    assert "downloaded" in kinds
    evidence = tmp_path / "debian12-systemd" / "native"
    assert (evidence / "usr_local_mesh_services_labagent_meshagent.log").is_file()
    assert (evidence / "lib_systemd_system_labagent.service").is_file()
    assert labelled_objects(run_id_of(tmp_path)) == []


@needs_docker
@pytest.mark.docker
@pytest.mark.agent
def test_sysvinit_known_failure_matches(tmp_path: Path, agent_packages) -> None:
    result = _run_cli(
        "run", "--provider", "docker", "--targets", "debian12-sysvinit", "--mode", "native",
        "--cycles", "1", "--reconnect-timeout", "20", "--expectations", str(REPO / "expectations.toml"),
        "--report-dir", str(tmp_path),
    )
    assert result.returncode == 0, result.stdout[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    cycle = report["cycles"][0]
    # The init.d restart races with the old process's exit, so the cycle may pass.
    assert cycle["verdict"] == "passed" or "no reconnect" in cycle["reason"]
    log = (tmp_path / "debian12-sysvinit" / "native" / "usr_local_mesh_services_labagent_meshagent.log").read_text()
    assert "Calling Service restart (INITD)" in log
    assert labelled_objects(run_id_of(tmp_path)) == []


@needs_docker
@pytest.mark.docker
@pytest.mark.agent
def test_sigkill_then_clean_leaves_nothing(tmp_path: Path, agent_packages) -> None:
    # A private state folder: the run's state file names its run id, and no other run is touched.
    state = {"XDG_STATE_HOME": str(tmp_path / "state")}
    process = subprocess.Popen(
        [sys.executable, "-m", "lab", "run", "--provider", "docker", "--targets", "debian12-systemd",
         "--cycles", "20", "--report-dir", str(tmp_path)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **state},
    )
    deadline = time.monotonic() + 180
    assert process.stdout is not None
    for line in process.stdout:
        if "connected" in line or time.monotonic() > deadline:
            break
    os.kill(process.pid, signal.SIGKILL)
    process.wait(30)
    (state_file,) = (tmp_path / "state" / "updatelab" / "runs").glob("*.json")
    run_id = json.loads(state_file.read_text())["run_id"]
    assert labelled_objects(run_id) != []

    try:
        result = _run_cli("clean", "--run-id", run_id, env=state)
        assert result.returncode == 0, result.stdout
        assert labelled_objects(run_id) == []
    finally:
        # A failed check above must not leave the killed run's container for later runs.
        docker_provider.clean(run_id)
