"""``updatelab serve``: only the server, for an agent started by hand.

This is the lab's form of update-test.js --NoInstall. The server prints the .msh to put beside
the agent, waits for that agent to connect, and drives its update cycles like any other run.
"""

from __future__ import annotations

import os

from rich.console import Console

from lab.agentfile import AgentBinary, format_msh
from lab.certs import generate_identity
from lab.display import Display
from lab.engine.cycles import AgentDriver, CycleOptions
from lab.engine.local_run import agent_msh
from lab.engine.report import Report
from lab.server.server import LabServer


async def serve(
    host: str, port: int, binaries: list[AgentBinary], options: CycleOptions, report: Report, display: Display, console: Console
) -> Report:
    identity = generate_identity([host])
    mesh_id = os.urandom(48)
    async with LabServer(identity, host, port) as server:
        msh = format_msh(agent_msh(server, mesh_id, "meshagent")).decode()
        console.print(f"listening on {server.agent_url}. Save this as meshagent.msh beside the agent:\n")
        console.print(msh, highlight=False, markup=False)
        console.print(
            f"then start it with './meshagent run'. Waiting {options.timeouts.connect:.0f} s for it; "
            "--cycles 0 only completes the handshake."
        )
        driver = AgentDriver(
            server=server, mesh_id=mesh_id, target="manual", binaries=binaries, options=options, report=report,
            on_progress=display.transfer, on_event=display.event,
        )
        await driver.run()
        report.protocol_errors += server.protocol_errors
    return report
