"""Tests of lab.protocol.session.AgentSession against the in-memory agent double."""

from __future__ import annotations

import hashlib
import io
import math
import os
import struct
import zipfile

import pytest

from agent_double import AgentDouble, InMemoryLink, json_message, make_link, make_session, node_identity
from lab.certs import generate_identity
from lab.errors import LocalProtocolError
from lab.protocol.commands import MAX_BLOCK_SIZE, MIN_BLOCK_SIZE
from lab.protocol.events import (
    AgentAuthenticated,
    AgentHashReported,
    AgentNotice,
    BlockAcknowledged,
    CommitDateReported,
    ConsoleMessage,
    CoreHashReported,
    CoreInfoReported,
    HostInfoReported,
    JsonReceived,
    ProtocolViolation,
    UpdateDownloaded,
    UpdateHashSent,
)
from lab.protocol.session import NativeUpdate, TransferState


@pytest.fixture(scope="module")
def identity():
    return generate_identity()


@pytest.fixture
def link(identity) -> InMemoryLink:
    return make_link(identity)


@pytest.fixture
def connected(link) -> InMemoryLink:
    link.connect()
    return link


def command_ids(messages) -> list[int]:
    return [struct.unpack_from(">H", m)[0] if isinstance(m, bytes) else -1 for m in messages]


def violations(events) -> list[str]:
    return [event.description for event in events if isinstance(event, ProtocolViolation)]


def block_messages(link: InMemoryLink) -> list[bytes]:
    return [m for m in link.server_messages if isinstance(m, bytes) and m[:2] == b"\x00\x0e"]


# -- handshake ---------------------------------------------------------------------------------


def test_handshake_fresh_authenticates(link):
    events = link.connect()
    authenticated = [e for e in events if isinstance(e, AgentAuthenticated)]
    assert len(authenticated) == 1
    assert authenticated[0].resumed is False
    assert authenticated[0].node_id == node_identity().node_id
    assert authenticated[0].info.mesh_id == link.agent.mesh_id
    assert link.session.authenticated
    assert link.agent.authenticated
    assert link.session.protocol_errors == 0


def test_handshake_fresh_message_order(link):
    link.connect()
    assert command_ids(link.server_messages) == [1, 2, 4]


def test_handshake_echoes_agent_tls_hash(link, identity):
    link.connect()
    assert link.server_messages[0][2:50] == identity.tls_hash


def test_handshake_server_signature_verifies(link):
    link.connect()
    assert link.agent.server_verified
    assert link.agent.log == []


def test_handshake_reports_agent_details(link):
    events = link.connect()
    assert CommitDateReported("2022-Nov-2 23:01:45-0700") in events
    assert HostInfoReported("Debian GNU/Linux 12 (bookworm) - x64") in events


def test_handshake_resumed_skips_auth_verify(identity):
    link = make_link(identity, resumed=True)
    events = link.connect()
    assert command_ids(link.server_messages) == [1, 4]
    assert [e.resumed for e in events if isinstance(e, AgentAuthenticated)] == [True]
    assert link.agent.sent_auth_info == 1
    assert link.session.protocol_errors == 0


def test_handshake_resumed_still_checks_signature(identity):
    link = make_link(identity, resumed=True)
    link.send_to_server(link.agent.opening_messages())
    request = link.session.messages_to_send()
    assert command_ids(request) == [1]

    verify = bytearray(link.agent.auth_verify(request[0][2:50], request[0][50:98]))
    verify[-1] ^= 0x01
    events = link.send_to_server([bytes(verify)])
    assert len(violations(events)) == 1
    assert not link.session.authenticated


def test_auth_info_twice(connected):
    events = connected.send_to_server([connected.agent.auth_info()])
    assert violations(events) == ["AuthInfo received twice on one connection"]
    assert connected.session.protocol_errors == 1
    assert connected.session.authenticated


def test_auth_request_twice(connected):
    events = connected.send_to_server([connected.agent.auth_request()])
    assert violations(events) == ["AuthRequest received twice on one connection"]


def test_auth_verify_twice(connected):
    events = connected.send_to_server([connected.agent.auth_verify(b"x" * 48, b"y" * 48)])
    assert violations(events) == ["AuthVerify received twice on one connection"]


def test_auth_verify_before_request(link):
    events = link.send_to_server([link.agent.auth_verify(b"x" * 48, b"y" * 48)])
    assert violations(events) == ["AuthVerify received before AuthRequest"]


def test_auth_verify_bad_signature(link):
    link.send_to_server(link.agent.opening_messages())
    request = link.session.messages_to_send()[0]
    verify = bytearray(link.agent.auth_verify(request[2:50], request[50:98]))
    verify[-10] ^= 0xFF
    events = link.send_to_server([bytes(verify), link.agent.auth_info()])
    assert violations(events) == ["agent signature over the handshake nonces is invalid"]
    assert not link.session.authenticated
    assert 4 not in command_ids(link.session.messages_to_send())


def test_auth_verify_signature_over_wrong_nonce(link):
    link.send_to_server(link.agent.opening_messages())
    request = link.session.messages_to_send()[0]
    events = link.send_to_server([link.agent.auth_verify(request[2:50], os.urandom(48))])
    assert len(violations(events)) == 1
    assert link.session.node_id is None


def test_auth_verify_certificate_not_der(link):
    link.send_to_server(link.agent.opening_messages())
    link.session.messages_to_send()
    events = link.send_to_server([b"\x00\x02\x00\x03abc" + bytes(384)])
    assert "not valid DER" in violations(events)[0]


def test_auth_verify_pkcs7_length(link):
    link.send_to_server(link.agent.opening_messages())
    link.session.messages_to_send()
    certificate = node_identity().certificate_der
    message = struct.pack(">HH", 2, len(certificate)) + certificate + bytes(1000)
    events = link.send_to_server([message])
    assert "PKCS#7" in violations(events)[0]


def test_tls_hash_mismatch(identity):
    other_hash = hashlib.sha384(b"another certificate").digest()
    link = make_link(identity, tls_hash=other_hash)
    events = link.connect()
    assert len(violations(events)) == 1
    assert "TLS certificate hash" in violations(events)[0]
    assert "Invalid server signature" in link.agent.log
    assert not link.session.authenticated


def test_stale_server_id(identity):
    stale = hashlib.sha384(b"old server key").digest()
    link = make_link(identity, server_id=stale)
    events = link.connect()
    assert len(violations(events)) == 1
    assert "ServerID is stale" in violations(events)[0]
    assert "Server certificate mismatch" in link.agent.log
    assert not link.agent.authenticated


def test_command_before_handshake(link):
    events = link.send_to_server([b"\x00\x0c\x00\x00" + bytes(48)])
    assert violations(events) == ["AgentHashReply received before the handshake completed"]


def test_json_before_handshake(link):
    events = link.send_to_server([json_message({"action": "agentName", "value": "lab"})])
    assert events == [JsonReceived({"action": "agentName", "value": "lab"})]


@pytest.mark.parametrize(
    "operation",
    ["request_agent_hash", "request_core_hash", "clear_core", "send_core_ok"],
)
def test_operation_before_handshake(link, operation):
    with pytest.raises(LocalProtocolError, match="before the handshake completed"):
        getattr(link.session, operation)()


def test_update_before_handshake(link):
    with pytest.raises(LocalProtocolError, match="before the handshake completed"):
        link.session.start_native_update(NativeUpdate(b"x" * 10, bytes(48)))


def test_session_counts_violations(link):
    for data in (b"", b"\x00", b"\x03\xe7\x00\x00", b"\x00\x01abc"):
        link.send_to_server([data])
    assert link.session.protocol_errors == 4


# -- hashes --------------------------------------------------------------------------------------


def test_agent_hash_request(connected):
    connected.session.request_agent_hash()
    events = connected.pump()
    assert events == [AgentHashReported(connected.agent.agent_hash)]


def test_core_hash_request_no_core(connected):
    connected.session.request_core_hash()
    assert connected.pump() == [CoreHashReported(None)]


# -- core push -----------------------------------------------------------------------------------


def test_push_core_hash(connected):
    script = b"console.log('lab core');"
    core_hash = connected.session.push_core(script)
    assert core_hash == hashlib.sha384(bytes(4) + script).digest()


def test_push_core_agent_accepts(connected):
    script = b"var x = 1;"
    core_hash = connected.session.push_core(script)
    events = connected.pump()
    assert events == [CoreHashReported(core_hash)]
    assert connected.agent.core == bytes(4) + script


def test_push_core_message_layout(connected):
    script = b"var y = 2;"
    core_hash = connected.session.push_core(script)
    message = connected.session.messages_to_send()[0]
    assert message[:4] == b"\x00\x0a\x00\x00"
    assert message[4:52] == core_hash
    assert message[52:] == bytes(4) + script


def test_push_core_compressed(connected):
    script = b"var z = 3;" * 100
    core_hash = connected.session.push_core(script, compress=True)
    outgoing = connected.session.messages_to_send()
    assert command_ids(outgoing) == [20]

    replies = connected.agent.receive(outgoing[0])
    assert connected.send_to_server(replies) == [CoreHashReported(core_hash)]
    assert connected.agent.core == bytes(4) + script


def test_clear_core(connected):
    connected.session.push_core(b"var a;")
    connected.pump()
    connected.session.clear_core()
    assert connected.pump() == [CoreHashReported(None)]
    assert connected.agent.core is None


def test_core_ok(connected):
    connected.session.send_core_ok()
    connected.pump()
    assert connected.agent.core_ok


# -- native update -------------------------------------------------------------------------------


@pytest.mark.parametrize("block_size", [MIN_BLOCK_SIZE, 4096, 16384, MAX_BLOCK_SIZE])
def test_update_block_sizes(connected, block_size):
    binary = os.urandom(150_000)
    update = NativeUpdate.for_binary(binary, hashlib.sha384(binary).digest(), block_size=block_size)
    connected.session.start_native_update(update)
    events = connected.pump()

    blocks = block_messages(connected)
    assert len(blocks) == math.ceil(len(binary) / block_size)
    assert max(len(b) for b in blocks) == 4 + block_size
    assert len([e for e in events if isinstance(e, BlockAcknowledged)]) == len(blocks)
    assert connected.agent.update_verified is True
    assert connected.agent.installed_binary == binary
    assert connected.session.transfer_state is TransferState.HASH_SENT


@pytest.mark.parametrize("block_size", [0, MIN_BLOCK_SIZE - 1, MAX_BLOCK_SIZE + 1])
def test_update_block_size_out_of_range(block_size):
    with pytest.raises(LocalProtocolError, match="outside 1024..65531"):
        NativeUpdate(b"x", bytes(48), block_size=block_size)


def test_update_first_block_size_out_of_range():
    with pytest.raises(LocalProtocolError, match="first block size"):
        NativeUpdate(b"x", bytes(48), first_block_size=MAX_BLOCK_SIZE + 1)


def test_update_message_order(connected):
    binary = os.urandom(5000)
    connected.session.start_native_update(NativeUpdate.for_binary(binary, hashlib.sha384(binary).digest()))
    connected.pump()
    ids = command_ids(connected.server_messages[3:])
    assert ids == [10, 13, 14, 13]
    assert len(connected.server_messages[3]) == 4
    assert len(connected.server_messages[4]) == 4
    assert len(connected.server_messages[-1]) == 52


def test_update_without_core_clear(connected):
    binary = os.urandom(5000)
    update = NativeUpdate.for_binary(binary, hashlib.sha384(binary).digest(), clear_core=False)
    connected.session.start_native_update(update)
    assert command_ids(connected.session.messages_to_send()) == [13, 14]


def test_update_pacing_16384_then_4096(connected):
    binary = os.urandom(30_000)
    update = NativeUpdate.for_binary(binary, hashlib.sha384(binary).digest(), block_size=4096, first_block_size=16384)
    connected.session.start_native_update(update)
    connected.pump()
    sizes = [len(b) - 4 for b in block_messages(connected)]
    assert sizes == [16384, 4096, 4096, 4096, 1328]
    assert connected.agent.installed_binary == binary


def test_update_one_block_per_ack(connected):
    binary = os.urandom(3 * 1024 + 10)
    update = NativeUpdate.for_binary(binary, hashlib.sha384(binary).digest(), block_size=1024, clear_core=False)
    connected.session.start_native_update(update)

    outgoing = connected.session.messages_to_send()
    assert command_ids(outgoing) == [13, 14]
    for _ in range(3):
        replies = [reply for message in outgoing for reply in connected.agent.receive(message)]
        assert replies == [b"\x00\x0e\x00\x01"]
        connected.send_to_server(replies)
        outgoing = connected.session.messages_to_send()
        assert command_ids(outgoing) == [14]


def test_update_hash_after_last_ack(connected):
    binary = os.urandom(2048)
    final_hash = hashlib.sha384(binary).digest()
    connected.session.start_native_update(NativeUpdate.for_binary(binary, final_hash, block_size=1024))
    connected.session.messages_to_send()

    first_ack = connected.send_to_server([b"\x00\x0e\x00\x01"])
    assert first_ack == [BlockAcknowledged(1024, 2048)]
    assert command_ids(connected.session.messages_to_send()) == [14]

    last_ack = connected.send_to_server([b"\x00\x0e\x00\x01"])
    assert last_ack == [BlockAcknowledged(2048, 2048), UpdateHashSent(final_hash)]
    assert connected.session.messages_to_send() == [b"\x00\x0d\x00\x00" + final_hash]


def test_update_ack_wrong_request_id(connected):
    connected.agent.ack_request_id = 7
    binary = os.urandom(10_000)
    connected.session.start_native_update(NativeUpdate.for_binary(binary, hashlib.sha384(binary).digest(), block_size=1024))
    events = connected.pump()
    assert violations(events) == ["update block acknowledgement has request id 7, expected 1"]
    assert len(block_messages(connected)) == 1
    assert connected.session.transfer_state is TransferState.SENDING


def test_update_ack_without_transfer(connected):
    events = connected.send_to_server([b"\x00\x0e\x00\x01"])
    assert violations(events) == ["update block acknowledgement (request id 1) with no transfer running"]


def test_update_ack_after_hash_sent(connected):
    binary = os.urandom(100)
    connected.session.start_native_update(NativeUpdate.for_binary(binary, hashlib.sha384(binary).digest()))
    connected.pump()
    events = connected.send_to_server([b"\x00\x0e\x00\x01"])
    assert len(violations(events)) == 1


def test_update_twice_at_once(connected):
    update = NativeUpdate(os.urandom(5000), bytes(48), block_size=1024)
    connected.session.start_native_update(update)
    with pytest.raises(LocalProtocolError, match="already running"):
        connected.session.start_native_update(update)


def test_update_wrong_final_hash(connected):
    binary = os.urandom(5000)
    connected.session.start_native_update(NativeUpdate(binary, hashlib.sha384(b"other").digest()))
    connected.pump()
    assert connected.agent.update_verified is False
    assert connected.agent.installed_binary is None


def test_update_empty_block_stalls_agent(connected):
    connected.session.start_native_update(NativeUpdate(b"", bytes(48)))
    events = connected.pump()
    assert connected.agent.stalled
    assert not [e for e in events if isinstance(e, BlockAcknowledged)]


def test_update_block_filter(connected):
    binary = os.urandom(3000)
    update = NativeUpdate(binary, hashlib.sha384(binary).digest(), block_size=1024)
    update.block_filter = lambda index, block: block[::-1] if index == 1 else block
    connected.session.start_native_update(update)
    connected.pump()
    assert connected.agent.update_verified is False


def test_update_compressed_zip_entry(connected):
    binary = os.urandom(20_000)
    update = NativeUpdate.for_binary(binary, hashlib.sha384(binary).digest(), compress=True)
    with zipfile.ZipFile(io.BytesIO(update.payload)) as archive:
        assert archive.namelist() == ["meshagent"]
        assert archive.read("meshagent") == binary


def test_update_compressed_hash_is_zip_hash(connected):
    binary = os.urandom(20_000)
    update = NativeUpdate.for_binary(binary, hashlib.sha384(binary).digest(), compress=True)
    assert update.final_hash == hashlib.sha384(update.payload).digest()
    assert update.compressed


def test_update_compressed_transfer(connected):
    binary = b"\x7fELF" + os.urandom(100_000)
    update = NativeUpdate.for_binary(binary, hashlib.sha384(binary).digest(), compress=True, block_size=4096)
    connected.session.start_native_update(update)
    events = connected.pump()
    assert events[-1] == UpdateHashSent(hashlib.sha384(update.payload).digest())
    assert connected.agent.update_verified is True
    assert connected.agent.installed_binary == binary
    assert connected.session.transfer_started_event().compressed


def test_transfer_started_event(connected):
    update = NativeUpdate(bytes(5000), bytes(48), block_size=2048)
    connected.session.start_native_update(update)
    event = connected.session.transfer_started_event()
    assert (event.total_bytes, event.block_size, event.compressed) == (5000, 2048, False)


def test_transfer_started_event_without_update(connected):
    with pytest.raises(LocalProtocolError, match="no update transfer"):
        connected.session.transfer_started_event()


# -- recovery JSON events ------------------------------------------------------------------------


def test_json_coreinfo(connected):
    events = connected.send_to_server([json_message({"action": "coreinfo", "value": "MeshCore Recovery", "caps": 14})])
    assert events == [CoreInfoReported("MeshCore Recovery")]


def test_json_update_downloaded(connected):
    events = connected.send_to_server([json_message({"action": "agentupdatedownloaded"})])
    assert events == [UpdateDownloaded()]


def test_json_console_message(connected):
    message = {"action": "msg", "type": "console", "value": "Download complete", "sessionid": "none"}
    assert connected.send_to_server([json_message(message)]) == [ConsoleMessage("Download complete")]


def test_json_sessions_notice(connected):
    text = "Self-Update FAILED. Write Error while writing update block"
    message = {"action": "sessions", "type": "msg", "value": {"1": {"msg": text, "icon": 3}}}
    assert connected.send_to_server([json_message(message)]) == [AgentNotice(text)]


def test_json_sessions_without_notice(connected):
    message = {"action": "sessions", "type": "msg", "value": {"1": {"icon": 3}}}
    assert connected.send_to_server([json_message(message)]) == [JsonReceived(message)]


def test_json_unknown_action(connected):
    message = {"action": "somethingelse", "value": [1, 2]}
    assert connected.send_to_server([json_message(message)]) == [JsonReceived(message)]


def test_send_json_is_text(connected):
    connected.session.send_json({"action": "agentupdate", "hash": "ab"})
    connected.pump()
    assert connected.server_messages[-1] == '{"action":"agentupdate","hash":"ab"}'
    assert connected.agent.json_received == [{"action": "agentupdate", "hash": "ab"}]


def test_session_random_bytes_used(identity):
    session = make_session(identity, random_bytes=lambda n: b"\xab" * n)
    agent = AgentDouble(server_id=identity.server_id, mesh_id=bytes(48), tls_hash=identity.tls_hash)
    InMemoryLink(session, agent).connect()
    assert agent.server_nonce == b"\xab" * 48
    assert session.authenticated
