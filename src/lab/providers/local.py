"""The local provider: the real agent runs on this host, in a temporary folder, in console mode.

With no service manager, a native update ends in the agent's console path: it copies the
update over its binary and re-executes itself with execv, so the PID stays the same. The
recovery core refuses to restart an agent that is not an installed service on Linux, so a
local recovery cycle ends after the download is verified.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from lab.agentfile import AgentBinary, agent_hash, format_msh
from lab.engine.cycles import Outcome

logger = logging.getLogger(__name__)

AGENT_NAME = "meshagent"
# Variables passed to the agent. Proxy settings are left out so that the agent connects
# straight to the lab server on loopback.
_ENVIRONMENT_KEEP = ("PATH", "LANG", "LC_ALL", "HOME", "TZ")


class LocalAgent:
    """One agent process in a temporary folder, with probes for each cycle."""

    def __init__(self, binary: AgentBinary, msh: dict[str, str], *, keep: bool = False, evidence_dir: Path | None = None) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="updatelab-local-"))
        self.binary_path = self.folder / AGENT_NAME
        self.keep = keep
        self.evidence_dir = evidence_dir
        shutil.copyfile(binary.path, self.binary_path)
        self.binary_path.chmod(0o755)
        (self.folder / f"{AGENT_NAME}.msh").write_bytes(format_msh(msh))
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        environment = {key: os.environ[key] for key in _ENVIRONMENT_KEEP if key in os.environ}
        console = open(self.folder / "console.log", "ab")
        with console:
            self.process = subprocess.Popen(
                [str(self.binary_path), "run"],
                cwd=self.folder,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                env=environment,
                start_new_session=True,
            )
        logger.info("local agent started, pid %d, in %s", self.process.pid, self.folder)

    def stop(self) -> None:
        """Stop the agent: SIGTERM to its process group, then SIGKILL after 5 s.

        An agent stuck in its block-write retry ignores SIGTERM, hence the SIGKILL.
        """
        process = self.process
        if process is None or process.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                return
            try:
                process.wait(wait)
                logger.info("local agent pid %d stopped with %s", process.pid, sig.name)
                return
            except subprocess.TimeoutExpired:
                continue
        logger.warning("local agent pid %d did not exit after SIGKILL", process.pid)

    def remove(self) -> None:
        self.stop()
        if self.keep:
            logger.info("kept the local agent folder %s", self.folder)
            return
        shutil.rmtree(self.folder, ignore_errors=True)

    # -- TargetProbe ---------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        return {"pid": self.process.pid if self.process else None, "running": self.running}

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def verify(self, before: dict[str, Any], expected_hash: bytes, outcome: Outcome) -> dict[str, dict[str, Any]]:
        checks: dict[str, dict[str, Any]] = {}
        on_disk = agent_hash(self.binary_path.read_bytes())
        checks["installed-hash"] = {
            "ok": on_disk == expected_hash,
            "detail": f"binary on disk hashes to {on_disk.hex()[:12]}, expected {expected_hash.hex()[:12]}",
        }
        checks["process-running"] = {"ok": self.running, "detail": f"pid {self.process.pid if self.process else None}"}
        # In console mode the agent re-executes itself, so the PID must stay the same.
        pid = self.process.pid if self.process else None
        checks["pid-unchanged"] = {"ok": pid == before.get("pid"), "detail": f"before {before.get('pid')}, after {pid}"}
        if outcome is Outcome.REJECTED:
            update_file = self.binary_path.with_name(AGENT_NAME + ".update")
            checks["update-file-removed"] = {
                "ok": not update_file.exists(),
                "detail": f"{update_file.name} {'exists' if update_file.exists() else 'is gone'}",
            }
        return checks

    def collect_evidence(self, cycle: int) -> list[str]:
        if self.evidence_dir is None:
            return []
        self.evidence_dir.mkdir(parents=True, exist_ok=True)
        saved = []
        for name in (f"{AGENT_NAME}.log", "console.log", f"{AGENT_NAME}.msh"):
            source = self.folder / name
            if source.exists():
                destination = self.evidence_dir / name
                shutil.copyfile(source, destination)
                saved.append(str(destination))
        return saved

    def file_sha384(self) -> str:
        return hashlib.sha384(self.binary_path.read_bytes()).hexdigest()
