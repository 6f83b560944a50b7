"""Tests that drive the real MeshAgent through the local provider on this host.

Every test starts the lab server on 127.0.0.1 and one agent in console mode in a temporary
folder, and the agent's .msh points only at that server. The agents come from the meshcentral
npm packages 1.1.55 (Nov 2022 agent) and 0.7.99 (Mar 2021 agent) through the `agent_packages`
fixture. The tests check verdicts and the Report's timeline, never timings.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import platform
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lab import agents
from lab.agentfile import AgentBinary, agent_hash, embed_msh, load_agent_binary
from lab.certs import generate_identity
from lab.engine.cycles import AgentDriver, CycleOptions, Fault, Mode
from lab.engine.local_run import LOCAL_SERVICE_NAME, agent_msh, run_local
from lab.engine.report import PASSED, Report, TimelineEntry
from lab.protocol.commands import AuthInfo, Capability
from lab.protocol.events import AgentAuthenticated
from lab.providers.local import AGENT_NAME, LocalAgent
from lab.server.server import AgentConnection, LabServer, TimedEvent

pytestmark = [
    pytest.mark.agent,
    pytest.mark.skipif(
        sys.platform != "linux" or platform.machine() != "x86_64",
        reason="meshagent_x86-64 runs only on x86-64 Linux",
    ),
]

NEW_VERSION = "1.1.55"
OLD_VERSION = "0.7.99"
#: Limits, in seconds, on waiting for a CLI run, for its first agent connection and for its exit.
#: EXIT_TIMEOUT leaves room for a run whose Ctrl-C was lost and that completes its 50 cycles.
CLI_TIMEOUT = 300
CONNECT_TIMEOUT = 120
EXIT_TIMEOUT = 240


# -- fixtures and helpers -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def new_agent(agent_packages: dict[str, agents.AgentPackage]) -> AgentBinary:
    return load_agent_binary(agent_packages[NEW_VERSION].binary())


@pytest.fixture(scope="module")
def old_agent(agent_packages: dict[str, agents.AgentPackage]) -> AgentBinary:
    return load_agent_binary(agent_packages[OLD_VERSION].binary())


class ProgressRecorder:
    """Stand-in for lab.display.Display that records the acknowledged byte count of every block."""

    def __init__(self) -> None:
        self.acknowledged: list[int] = []

    def event(self, target: str, cycle: int | None, kind: str, detail: str) -> None:
        pass

    def transfer(self, target: str, done: int, total: int) -> None:
        self.acknowledged.append(done)


def run_cycles(binaries: list[AgentBinary], options: CycleOptions) -> tuple[Report, ProgressRecorder]:
    report = Report()
    recorder = ProgressRecorder()
    asyncio.run(run_local(binaries, options, report, display=recorder))  # type: ignore[arg-type]
    return report, recorder


def entries(report: Report, kind: str, cycle: int | None = None) -> list[TimelineEntry]:
    """Return the timeline entries of `kind`, only those of `cycle` when it is given."""
    return [entry for entry in report.timeline if entry.kind == kind and (cycle is None or entry.cycle == cycle)]


def block_sizes(acknowledged: list[int]) -> list[int]:
    """Convert running acknowledged byte counts into the size of each block sent."""
    return [done - before for before, done in zip([0] + acknowledged, acknowledged)]


async def handshake(binary: AgentBinary, *, embedded: bool) -> tuple[list[AuthInfo], bytes, Report, bytes]:
    """Start one agent, wait for it to authenticate and report its hash, then stop it.

    With `embedded`, the .msh settings go into the binary as a trailer and no .msh file is left
    beside it. Returns the AuthInfo of every authenticated connection, the MeshID in the
    settings, the report and the bytes of the file that the agent ran from.
    """
    infos: list[AuthInfo] = []

    def on_event(connection: AgentConnection, timed: TimedEvent) -> None:
        if isinstance(timed.event, AgentAuthenticated):
            infos.append(timed.event.info)

    mesh_id = os.urandom(48)
    report = Report()
    async with LabServer(generate_identity(["127.0.0.1"]), "127.0.0.1", 0, on_event=on_event) as server:
        agent = LocalAgent(binary, agent_msh(server, mesh_id, LOCAL_SERVICE_NAME))
        try:
            if embedded:
                msh_file = agent.folder / f"{AGENT_NAME}.msh"
                agent.binary_path.write_bytes(embed_msh(binary.data, msh_file.read_bytes()))
                msh_file.unlink()
            installed = agent.binary_path.read_bytes()
            agent.start()
            driver = AgentDriver(
                server=server,
                mesh_id=mesh_id,
                target="local",
                binaries=[binary],
                options=CycleOptions(count=0),
                report=report,
            )
            await driver.run()
        finally:
            agent.remove()
    return infos, mesh_id, report, installed


# -- handshake ----------------------------------------------------------------------------------


@pytest.mark.parametrize("embedded", [False, True], ids=["msh-file", "embedded-msh"])
def test_handshake(new_agent: AgentBinary, embedded: bool) -> None:
    infos, mesh_id, report, installed = asyncio.run(handshake(new_agent, embedded=embedded))
    plain_hash = agent_hash(Path(new_agent.path).read_bytes())

    assert report.cycles == [], "a failed handshake adds a failed cycle 0"
    assert len(infos) == 1
    info = infos[0]
    assert info.agent_id == 6, "meshagent_x86-64 is architecture id 6"
    assert info.mesh_id == mesh_id
    assert info.hostname == socket.gethostname()
    for capability in (Capability.CONSOLE, Capability.JAVASCRIPT, Capability.COMPRESSION):
        assert capability in info.capabilities, f"{capability!r} missing from {info.capabilities!r}"

    assert (installed != new_agent.data) is embedded, "only the embedded case changes the file"
    reported = entries(report, "agent-hash")
    assert [entry.detail for entry in reported] == [plain_hash.hex()]


# -- native updates -------------------------------------------------------------------------------


def test_native_three_cycles(new_agent: AgentBinary) -> None:
    report, _ = run_cycles([new_agent], CycleOptions(count=3))

    assert [cycle.index for cycle in report.cycles] == [0, 1, 2]
    for cycle in report.cycles:
        assert cycle.verdict == PASSED, f"cycle {cycle.index}: {cycle.reason}"
        assert cycle.reported_hash == new_agent.agent_hash.hex()
        assert [entry.detail for entry in entries(report, "agent-hash", cycle.index)] == [new_agent.agent_hash.hex()]
        assert len(entries(report, "disconnected", cycle.index)) == 1
        assert set(cycle.checks) == {"installed-hash", "process-running", "pid-unchanged"}
        for name, check in cycle.checks.items():
            assert check["ok"], f"cycle {cycle.index} check {name}: {check['detail']}"
    assert report.protocol_errors == 0


def test_native_ab_versions(new_agent: AgentBinary, old_agent: AgentBinary) -> None:
    report, _ = run_cycles([old_agent, new_agent], CycleOptions(count=2))

    assert len(report.cycles) == 2
    expected = [new_agent.agent_hash.hex(), old_agent.agent_hash.hex()]
    initial = [entry.detail for entry in entries(report, "agent-hash") if entry.cycle is None]
    assert initial == [old_agent.agent_hash.hex()]
    for cycle, expected_hash in zip(report.cycles, expected):
        assert cycle.verdict == PASSED, f"cycle {cycle.index}: {cycle.reason}"
        assert cycle.expected_hash == expected_hash
        assert [entry.detail for entry in entries(report, "agent-hash", cycle.index)] == [expected_hash]
        assert cycle.checks["installed-hash"]["ok"], cycle.checks["installed-hash"]["detail"]


def test_old_agent_unmasked_frames(old_agent: AgentBinary) -> None:
    report, _ = run_cycles([old_agent], CycleOptions(count=0))

    assert entries(report, "agent-hash")[0].detail == old_agent.agent_hash.hex()
    assert len(entries(report, "websocket")) == 1


@pytest.mark.parametrize(
    ("first_block_size", "expected_first"),
    [(None, 4096), (16384, 16384)],
    ids=["4096", "update-test-pacing"],
)
def test_native_small_blocks(new_agent: AgentBinary, first_block_size: int | None, expected_first: int) -> None:
    options = CycleOptions(count=1, block_size=4096, first_block_size=first_block_size, compress=False)
    report, recorder = run_cycles([new_agent], options)

    assert report.cycles[0].verdict == PASSED, report.cycles[0].reason
    assert entries(report, "transfer-start", 0)[0].detail == f"{new_agent.size} bytes in blocks of 4096"
    sizes = block_sizes(recorder.acknowledged)
    assert recorder.acknowledged[-1] == new_agent.size
    assert sizes[0] == expected_first
    assert set(sizes[1:-1]) == {4096}
    assert 0 < sizes[-1] <= 4096


def test_native_compressed(new_agent: AgentBinary) -> None:
    report, _ = run_cycles([new_agent], CycleOptions(count=1, compress=None))

    connected = entries(report, "connected")[0].detail
    capabilities = int(re.search(r"capabilities 0x([0-9a-f]+)", connected).group(1), 16)
    assert capabilities & Capability.COMPRESSION
    assert entries(report, "transfer-start", 0)[0].detail.endswith(", zip-compressed")
    assert report.cycles[0].verdict == PASSED, report.cycles[0].reason
    assert report.cycles[0].reported_hash == new_agent.agent_hash.hex()


def test_wrong_final_hash_rejected(new_agent: AgentBinary, old_agent: AgentBinary) -> None:
    # The update would install the 0.7.99 agent, so keeping the old binary is visible in its hash.
    options = CycleOptions(count=1, compress=False, fault=Fault.WRONG_FINAL_HASH)
    report, _ = run_cycles([new_agent, old_agent], options)
    cycle = report.cycles[0]

    assert cycle.verdict == PASSED, cycle.reason
    assert cycle.expected_outcome == "rejected"
    assert cycle.reported_hash == new_agent.agent_hash.hex()
    assert len(entries(report, "rejected", 0)) == 1
    assert cycle.checks["installed-hash"]["ok"], cycle.checks["installed-hash"]["detail"]
    assert cycle.checks["update-file-removed"]["ok"], cycle.checks["update-file-removed"]["detail"]
    assert cycle.checks["pid-unchanged"]["ok"], cycle.checks["pid-unchanged"]["detail"]


# -- recovery core ------------------------------------------------------------------------------


def test_recovery_console_refusal(new_agent: AgentBinary, agent_packages: dict[str, agents.AgentPackage]) -> None:
    script = agent_packages[NEW_VERSION].recovery_core.read_bytes()
    options = CycleOptions(mode=Mode.RECOVERY, count=1, recovery_core=script)
    report, _ = run_cycles([new_agent], options)
    cycle = report.cycles[0]
    # The server sends the core with 4 zero bytes in front, and the agent hashes what it received.
    core_hash = hashlib.sha384(bytes(4) + script).hexdigest()

    assert [entry.detail for entry in entries(report, "core-loaded", 0)] == [core_hash[:12]]
    assert cycle.verdict == PASSED, cycle.reason
    assert cycle.expected_outcome == "console-refusal"
    assert len(entries(report, "refused", 0)) == 1
    assert [entry.detail for entry in entries(report, "download-requests", 0)] == ["0"]
    assert entries(report, "downloaded", 0) == []
    assert cycle.reported_hash == new_agent.agent_hash.hex()
    assert any("not an instance of" in entry.detail for entry in entries(report, "console", 0))


# -- command line ---------------------------------------------------------------------------------


def cli_command() -> list[str]:
    script = shutil.which("updatelab")
    return [script] if script else [sys.executable, "-m", "lab"]


def cli_environment(temp_dir: Path) -> dict[str, str]:
    """Return an environment with its own TMPDIR, the agent cache of this test run and 240 output columns."""
    temp_dir.mkdir(exist_ok=True)
    environment = {key: value for key, value in os.environ.items() if key in ("PATH", "HOME", "LANG")}
    environment.update(
        TMPDIR=str(temp_dir),
        XDG_CACHE_HOME=str(agents.cache_root().parent),
        COLUMNS="240",
        PYTHONUNBUFFERED="1",
    )
    return environment


def processes_under(folder: Path) -> list[int]:
    """Return the PIDs of live processes whose executable path lies under `folder`."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv0 = (proc / "cmdline").read_bytes().split(b"\0", 1)[0].decode(errors="replace")
        except OSError:
            continue
        if argv0.startswith(str(folder) + os.sep):
            pids.append(int(proc.name))
    return pids


def agent_folders(temp_dir: Path) -> list[Path]:
    return list(temp_dir.glob("updatelab-local-*"))


def test_cli_one_cycle(tmp_path: Path) -> None:
    temp_dir = tmp_path / "tmp"
    report_dir = tmp_path / "report"
    command = cli_command() + ["run", "--cycles", "1", "--report-dir", str(report_dir)]
    result = subprocess.run(command, env=cli_environment(temp_dir), capture_output=True, text=True, timeout=CLI_TIMEOUT)

    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((report_dir / "report.json").read_text())
    assert [(cycle["index"], cycle["verdict"]) for cycle in report["cycles"]] == [(0, PASSED)]
    assert agent_folders(temp_dir) == []


def test_cli_network_faults_through_proxy(tmp_path: Path) -> None:
    temp_dir = tmp_path / "tmp"
    report_dir = tmp_path / "reset"
    # The first connection is reset in the middle of the update; the real agent must notice.
    command = cli_command() + ["run", "--cycles", "1", "--net-reset-after", "1000000", "--report-dir", str(report_dir)]
    result = subprocess.run(command, env=cli_environment(temp_dir), capture_output=True, text=True, timeout=CLI_TIMEOUT)
    assert result.returncode == 1, result.stdout + result.stderr
    report = json.loads((report_dir / "report.json").read_text())
    assert report["cycles"][0]["reason"].startswith("disconnected")
    faults = [entry["detail"] for entry in report["timeline"] if entry["kind"] == "fault"]
    assert any(detail.startswith("proxy-reset: connection 1: reset after 1000000 bytes") for detail in faults)
    assert report["settings"]["network_faults"]["reset_after_bytes"] == 1000000

    # Latency and a rate cap slow the update down but must not break it.
    report_dir = tmp_path / "slow"
    command = cli_command() + ["run", "--cycles", "1", "--net-latency", "50", "--net-rate", "2000000", "--report-dir", str(report_dir)]
    result = subprocess.run(command, env=cli_environment(temp_dir), capture_output=True, text=True, timeout=CLI_TIMEOUT)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((report_dir / "report.json").read_text())
    assert report["cycles"][0]["verdict"] == PASSED
    assert agent_folders(temp_dir) == []


BAD_INPUT = {
    "binary-missing": (["--binary", "/nonexistent"], ["--binary /nonexistent", "file not found"]),
    "binary-not-agent": (["--binary", "/bin/ls"], ["--binary /bin/ls", "not a MeshAgent build"]),
    "alt-binary-text": (["--alt-binary", "{text_file}"], ["--alt-binary {text_file}", "not an executable"]),
    "recoverycore-missing": (
        ["--mode", "recovery", "--recoverycore", "/nonexistent"],
        ["--recoverycore /nonexistent", "file not found"],
    ),
    "block-size-small": (["--block-size", "100"], ["block size 100 is out of range"]),
    "block-size-large": (["--block-size", "70000"], ["block size 70000 is out of range"]),
    "port-in-use": (["--port", "{port}"], ["cannot listen on 127.0.0.1:{port}"]),
    "binary-other-cpu": (["--binary", "{arm_agent}"], ["an ELF executable for aarch64", "this host runs x86-64 Linux builds"]),
    "binary-windows": (["--alt-binary", "{windows_agent}"], ["a Windows (PE) executable", "meshagent_x86-64"]),
    "report-dir-file": (["--report-dir", "{text_file}"], ["it is a file, not a folder"]),
    "report-dir-unwritable": (["--report-dir", "/proc/updatelab-report"], ["cannot write the report to /proc/updatelab-report"]),
}


@pytest.mark.parametrize("case", BAD_INPUT.values(), ids=BAD_INPUT.keys())
def test_cli_bad_input(tmp_path: Path, case: tuple[list[str], list[str]]) -> None:
    arguments, expected_messages = case
    temp_dir = tmp_path / "tmp"
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not an agent\n")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        package = agents.require_package(agents.DEFAULT_VERSION)
        values = {
            "text_file": text_file,
            "port": listener.getsockname()[1],
            "arm_agent": package.binary("meshagent_aarch64"),
            "windows_agent": package.binary("MeshService64.exe"),
        }
        command = cli_command() + ["run", "--cycles", "1"] + [argument.format(**values) for argument in arguments]
        result = subprocess.run(command, env=cli_environment(temp_dir), capture_output=True, text=True, timeout=CLI_TIMEOUT)

    output = result.stdout + result.stderr
    assert result.returncode != 0
    for message in expected_messages:
        assert message.format(**values) in output
    assert "Traceback" not in output
    assert agent_folders(temp_dir) == []
    assert processes_under(temp_dir) == []


def read_lines(stream, lines: queue.Queue[str]) -> None:
    for line in stream:
        lines.put(line)


def test_cli_interrupt(tmp_path: Path) -> None:
    temp_dir = tmp_path / "tmp"
    command = cli_command() + ["run", "--cycles", "50", "--report-dir", str(tmp_path / "report")]
    process = subprocess.Popen(
        command, env=cli_environment(temp_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=read_lines, args=(process.stdout, lines), daemon=True)
    reader.start()
    try:
        output = []
        deadline = time.monotonic() + CONNECT_TIMEOUT
        while not any("connected:" in line for line in output) and time.monotonic() < deadline:
            try:
                output.append(lines.get(timeout=1))
            except queue.Empty:
                assert process.poll() is None, "".join(output)
        assert any("connected:" in line for line in output), "".join(output)
        folders = agent_folders(temp_dir)
        agent_pids = processes_under(temp_dir)
        assert len(folders) == 1
        assert len(agent_pids) == 1

        process.send_signal(signal.SIGINT)
        returncode = process.wait(EXIT_TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(EXIT_TIMEOUT)
            # The agent runs in its own session, so killing the CLI leaves it running.
            for pid in processes_under(temp_dir):
                os.kill(pid, signal.SIGKILL)

    assert processes_under(temp_dir) == []
    assert not folders[0].exists()
    assert returncode == 130
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["settings"]["interrupted"] is True
    reader.join(EXIT_TIMEOUT)
    remaining = []
    while not lines.empty():
        remaining.append(lines.get())
    assert any("interrupted: stopping the agent" in line for line in output + remaining), "".join(output + remaining)
