"""Run update cycles against the real agent on this host (``updatelab run --provider local``)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from pathlib import Path

from lab.agentfile import AgentBinary
from lab.certs import generate_identity
from lab.display import Display
from lab.engine.cycles import AgentDriver, CycleOptions, Mode, Outcome
from lab.engine.report import Report
from lab.faults.proxy import ProxyFaults, proxied
from lab.providers.local import LocalAgent
from lab.server.server import LabServer

LOCAL_SERVICE_NAME = "updatelab-local"


def _record_fault(report: Report, display: Display | None, detail: str) -> None:
    report.add_event("local", None, "fault", detail)
    if display is not None:
        display.event("local", None, "fault", detail)


def agent_msh(server: LabServer, mesh_id: bytes, service_name: str) -> dict[str, str]:
    """Return the .msh settings that point an agent at `server` and nowhere else."""
    return {
        "MeshName": "updatelab",
        "MeshType": "2",
        "MeshID": "0x" + mesh_id.hex().upper(),
        "ServerID": server.identity.server_id.hex().upper(),
        "MeshServer": server.agent_url,
        "meshServiceName": service_name,
        "logUpdate": "1",
    }


async def run_local(
    binaries: list[AgentBinary],
    options: CycleOptions,
    report: Report,
    *,
    port: int = 0,
    keep: bool = False,
    report_dir: Path | None = None,
    display: Display | None = None,
    network: ProxyFaults | None = None,
) -> Report:
    """Start the server on loopback, run the agent in console mode, and drive its cycles.

    The agent is stopped and its folder removed on every exit path, Ctrl-C included, unless
    `keep` is set. With `network`, the agent connects through a fault proxy on loopback.
    """
    if options.mode is Mode.RECOVERY:
        options = dataclasses.replace(options, recovery_outcome=Outcome.CONSOLE_REFUSAL)
    identity = generate_identity(["127.0.0.1"])
    mesh_id = os.urandom(48)
    target = "local"
    async with LabServer(identity, "127.0.0.1", port) as server, proxied(
        server, network, lambda kind, detail: _record_fault(report, display, f"{kind}: {detail}")
    ):
        evidence = report_dir / target if report_dir else None
        agent = LocalAgent(binaries[0], agent_msh(server, mesh_id, LOCAL_SERVICE_NAME), keep=keep, evidence_dir=evidence)
        report.targets[target] = {"provider": "local", "folder": str(agent.folder), "server": server.agent_url}
        if display:
            display.event(target, None, "provision", f"agent {binaries[0].path.name} in {agent.folder}")
        try:
            agent.start()
            driver = AgentDriver(
                server=server,
                mesh_id=mesh_id,
                target=target,
                binaries=binaries,
                options=options,
                report=report,
                probe=agent,
                on_progress=display.transfer if display else None,
                on_event=display.event if display else None,
            )
            await driver.run()
        except asyncio.CancelledError:
            # After Ctrl-C the agent may take its 5 s SIGTERM grace period to stop, so the wait is announced.
            if display:
                display.event(target, None, "teardown", "interrupted: stopping the agent (SIGTERM, then SIGKILL after 5 s)")
            raise
        finally:
            report.protocol_errors += server.protocol_errors
            agent.remove()
            if display:
                display.event(target, None, "teardown", "agent stopped" + ("" if keep else " and folder removed"))
    return report
