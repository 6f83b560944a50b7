"""Server-side faults of a cycle, driven against the Python agent double over TLS on loopback.

These check the lab's own fault mechanics (what goes on the wire, how the driver reacts).
What the real agent does with each fault is checked by the scenarios in tests/test_faults_lab.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
from pathlib import Path

from agent_double import AgentClient, AgentDouble, http_get, node_identity
from lab.agentfile import AgentBinary, ExecutableFormat
from lab.certs import generate_identity
from lab.engine.cycles import AgentDriver, CycleFaults, CycleOptions, Mode, Outcome, Reason, Timeouts
from lab.engine.report import Report
from lab.server.server import Download, LabServer

HOST = "127.0.0.1"
TIMEOUT = 10
NEW_BINARY = os.urandom(300_000)


def binary(data: bytes, name: str) -> AgentBinary:
    return AgentBinary(Path(name), data, ExecutableFormat.ELF, "x86-64")


def run(coroutine, timeout: float = 60) -> None:
    asyncio.run(asyncio.wait_for(coroutine, timeout))


async def serve_forever(client: AgentClient) -> None:
    try:
        await client.serve_until(lambda: False, timeout=120)
    except Exception:  # the test cancels or the server closes; either ends the double
        pass


async def serving_double(server: LabServer, identity) -> tuple[AgentDouble, AgentClient, asyncio.Task]:
    """Connect a double to `server`, serve it in a task, and return the double, its client and the task."""
    agent = AgentDouble(server_id=identity.server_id, mesh_id=os.urandom(48), identity=node_identity(0))
    client = await AgentClient.connect(HOST, server.port, agent)
    await client.send_messages(agent.opening_messages())
    return agent, client, asyncio.create_task(serve_forever(client))


async def drive(faults: CycleFaults, outcome: Outcome, block_ack: float = 5) -> tuple[AgentDouble, dict]:
    identity = generate_identity([HOST])
    async with LabServer(identity, HOST) as server:
        agent, client, serving = await serving_double(server, identity)
        report = Report()
        old = binary(b"old", "old")
        new = binary(NEW_BINARY, "new")
        agent.agent_hash = old.agent_hash
        options = CycleOptions(
            mode=Mode.NATIVE, faults=faults, outcome=outcome,
            timeouts=Timeouts(connect=TIMEOUT, hash_reply=TIMEOUT, block_ack=block_ack, restart=2, rejection=1),
        )
        driver = AgentDriver(server=server, mesh_id=agent.mesh_id, target="double", binaries=[old, new], options=options, report=report)
        await driver.connect()
        result = await driver.run_cycle(0, binary=new)
        serving.cancel()
        await client.close()
        return agent, {"result": result, "report": report}


def test_corrupted_block_is_rejected():
    async def case():
        agent, outcome = await drive(CycleFaults(corrupt_block=2), Outcome.REJECTED)
        assert agent.update_verified is False
        assert "Hash FAILED" in agent.log
        assert outcome["result"].passed, outcome["result"].reason
        assert any(entry.kind == "rejected" for entry in outcome["report"].timeline)

    run(case())


def test_truncated_binary_sends_half_with_the_full_hash():
    async def case():
        agent, outcome = await drive(CycleFaults(truncate=0.5), Outcome.REJECTED)
        assert agent.update_verified is False
        transfer = next(entry for entry in outcome["report"].timeline if entry.kind == "transfer-start")
        assert transfer.detail.startswith(f"{len(NEW_BINARY) // 2} bytes")
        assert outcome["result"].passed

    run(case())


def test_wrong_final_hash_is_rejected():
    async def case():
        agent, outcome = await drive(CycleFaults(wrong_final_hash=True), Outcome.REJECTED)
        assert agent.update_verified is False
        assert outcome["result"].passed

    run(case())


def test_empty_faults_send_the_binary_intact():
    async def case():
        agent, _ = await drive(CycleFaults(), Outcome.REJECTED)
        assert agent.update_verified is True
        assert agent.installed_binary == NEW_BINARY

    run(case())


def test_server_restart_ends_cycle_at_once():
    async def case():
        identity = generate_identity([HOST])
        async with LabServer(identity, HOST) as server:
            agent, client, serving = await serving_double(server, identity)
            old, new = binary(b"old", "old"), binary(NEW_BINARY, "new")
            agent.agent_hash = old.agent_hash
            options = CycleOptions(mode=Mode.NATIVE, timeouts=Timeouts(connect=TIMEOUT, hash_reply=TIMEOUT, block_ack=30))
            report = Report()
            restarted: list[asyncio.Task] = []

            def on_event(target, cycle, kind, detail):
                if kind == "transfer-start":
                    restarted.append(asyncio.get_running_loop().create_task(server.restart(0.5)))

            driver = AgentDriver(server=server, mesh_id=agent.mesh_id, target="double", binaries=[old, new],
                                 options=options, report=report, on_event=on_event)
            await driver.connect()
            port = server.port
            loop = asyncio.get_running_loop()
            started = loop.time()
            result = await driver.run_cycle(0, binary=new)
            # The closed connection ends the cycle, well before the 30 s block timeout.
            assert loop.time() - started < 10
            assert not result.passed
            assert result.reason.startswith(str(Reason.DISCONNECTED))
            # The hash reported before the update is not this cycle's result.
            assert driver.reported_hash == old.agent_hash
            assert result.reported_hash is None
            await restarted[0]
            serving.cancel()
            await client.close()
            assert server.port == port
            again = AgentDouble(server_id=identity.server_id, mesh_id=os.urandom(48), identity=node_identity(1))
            second = await AgentClient.connect(HOST, port, again)
            await second.handshake(TIMEOUT)
            assert again.authenticated
            await second.close()

    run(case())


def test_download_faults_change_what_is_served():
    async def case():
        identity = generate_identity([HOST])
        other = generate_identity([HOST])
        async with LabServer(identity, HOST) as server, LabServer(other, HOST) as second:
            server.downloads["error"] = Download(b"data", status=503)
            response, _ = await http_get(HOST, server.port, "/update/error")
            assert response.status_code == 503

            data = bytes(range(256)) * 100
            middle = len(data) // 2
            altered = data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]
            second.downloads["moved"] = Download(altered)
            response, body = await http_get(HOST, second.port, "/update/moved")
            assert response.status_code == 200
            assert body == altered
            assert hashlib.sha384(body).digest() != hashlib.sha384(data).digest()
            assert second.identity.tls_hash != server.identity.tls_hash

    run(case())


def test_cycle_faults_default_to_none():
    faults = CycleFaults()
    for field in dataclasses.fields(faults):
        assert getattr(faults, field.name) in (None, False), field.name


async def connected_driver(server: LabServer, identity, report: Report) -> tuple[AgentDouble, AgentClient, asyncio.Task, AgentDriver]:
    """Connect a double to `server`, serve it in a task, and return it with a connected driver."""
    agent, client, serving = await serving_double(server, identity)
    options = CycleOptions(timeouts=Timeouts(connect=TIMEOUT, hash_reply=1))
    driver = AgentDriver(server=server, mesh_id=agent.mesh_id, target="double",
                         binaries=[binary(b"old", "old")], options=options, report=report)
    assert await driver.connect() == agent.agent_hash
    return agent, client, serving, driver


def test_current_hash_waits_for_a_busy_agent():
    async def case():
        identity = generate_identity([HOST])
        async with LabServer(identity, HOST) as server:
            agent, client, serving, driver = await connected_driver(server, identity, Report())

            # The double stops reading, as an agent asleep in its write path does, and wakes
            # up after 3 s. Each request times out after 1 s, so the driver has to ask again.
            serving.cancel()
            loop = asyncio.get_running_loop()

            async def wake_up_later() -> None:
                await asyncio.sleep(3)
                await serve_forever(client)

            waking = asyncio.create_task(wake_up_later())
            started = loop.time()
            assert await driver.current_hash(10) == agent.agent_hash
            assert loop.time() - started >= 2.5
            waking.cancel()
            await client.close()

    run(case())


def test_current_hash_gives_up_on_silence():
    async def case():
        identity = generate_identity([HOST])
        report = Report()
        async with LabServer(identity, HOST) as server:
            _, client, serving, driver = await connected_driver(server, identity, report)
            serving.cancel()
            assert await driver.current_hash(2.5) is None
            assert report.timeline[-1].kind == "offline"
            await client.close()

    run(case())
