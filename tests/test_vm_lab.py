"""End-to-end VM tests: the real agent in a debian12-vm VM through Vagrant, libvirt and paramiko.

The set-up runs scripts/ensure-vagrant.sh (which installs and starts what is missing) and
builds the debian12-vm box when it is missing (cached afterwards). The tests skip, saying
why, only where that set-up cannot make Vagrant and libvirt work.
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

from lab import boxes
from lab.errors import LabError
from lab.providers import libvirt_util

pytestmark = [pytest.mark.vm, pytest.mark.agent]

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def vm_ready(agent_packages) -> None:
    result = subprocess.run(["sh", str(REPO / "scripts/ensure-vagrant.sh")], capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        pytest.skip(f"Vagrant and libvirt cannot run here: scripts/ensure-vagrant.sh exited {result.returncode}: {result.stderr.strip()[-500:]}")
    try:
        boxes.build("debian12-vm")
    except LabError as error:
        pytest.fail(f"building the debian12-vm box failed: {error}")


def _lab(*arguments: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "lab", *arguments], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs
    )


def _leftovers(run_id: str) -> list[str]:
    prefix = f"updatelab-{run_id}"
    return (
        libvirt_util.domains_with_prefix(prefix)
        + libvirt_util.networks_with_prefix(prefix)
        + [volume for _, volume in libvirt_util.volumes_with_prefix(prefix)]
    )


def test_vm_native_and_recovery_cycles(vm_ready, tmp_path):
    report_dir = tmp_path / "report"
    process = _lab("run", "--provider", "vagrant", "--targets", "debian12-vm", "--mode", "native,recovery",
                   "--cycles", "1", "--report-dir", str(report_dir))
    output, _ = process.communicate(timeout=1500)
    assert process.returncode == 0, output[-4000:]

    report = json.loads((report_dir / "report.json").read_text())
    cycles = {cycle["target"]: cycle for cycle in report["cycles"]}
    assert set(cycles) == {"debian12-vm/native", "debian12-vm/recovery"}
    for label, cycle in cycles.items():
        assert cycle["verdict"] == "passed", (label, cycle)
        assert cycle["reported_hash"] == cycle["expected_hash"], label
        assert all(check["ok"] for check in cycle["checks"].values()), (label, cycle["checks"])
    assert cycles["debian12-vm/native"]["checks"]["pid-changed"]["ok"]
    assert cycles["debian12-vm/recovery"]["checks"]["pid-kept"]["ok"]
    for label in cycles:
        target = report["targets"][label]
        assert target["provider"] == "vagrant"
        assert target["service_state"] == "active (running)"

    for mode in ("native", "recovery"):
        evidence = report_dir / "debian12-vm" / mode
        msh = (evidence / "usr_local_mesh_services_labagent_meshagent.msh").read_text()
        assert "MeshServer=wss://127.0.0.1:" in msh
        assert (evidence / "console.log").stat().st_size > 0
        assert (evidence / "install.log").is_file()
        assert (evidence / "service-manager.log").is_file()

    run_id = report["settings"]["run_id"]
    assert _leftovers(run_id) == []


def test_vm_killed_run_is_cleaned(vm_ready, tmp_path):
    from lab.engine import vm_run

    state_home = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "updatelab" / "runs"
    before = set(state_home.glob("*.json")) if state_home.is_dir() else set()
    process = _lab("run", "--provider", "vagrant", "--targets", "debian12-vm", "--mode", "native", "--cycles", "3",
                   "--report-dir", str(tmp_path / "report"))
    run_id = None
    deadline = time.monotonic() + 600
    try:
        # Kill the lab as soon as its VM's domain exists, in the middle of `vagrant up` or later.
        while time.monotonic() < deadline and process.poll() is None:
            new = set(state_home.glob("*.json")) - before
            if new and run_id is None:
                run_id = json.loads(sorted(new)[0].read_text())["run_id"]
            if run_id and libvirt_util.domains_with_prefix(f"updatelab-{run_id}"):
                break
            time.sleep(1)
        assert run_id is not None, "the run wrote no state file"
        assert libvirt_util.domains_with_prefix(f"updatelab-{run_id}"), "no domain appeared before the deadline"
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert _leftovers(run_id), "the killed run left nothing to clean"

    removed = vm_run.clean_vm_runs()
    # `vagrant destroy` in the run's working folder removes the domain, and cleanup by name
    # removes whatever it missed, so the list names the folder and possibly libvirt objects.
    assert any(item.startswith("folder ") and run_id in item for item in removed), removed
    assert _leftovers(run_id) == []
    assert not vm_run.work_root(run_id).exists()
