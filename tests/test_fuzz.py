"""Property tests with hypothesis for the parsers and the session state machine.

Example counts are kept small so that the whole file runs in a few seconds.
"""

from __future__ import annotations

import json
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent_double import InMemoryLink, client_frame, make_link
from lab.certs import generate_identity
from lab.errors import PeerProtocolError
from lab.protocol import commands
from lab.protocol.commands import AgentHashReply, AuthInfo, AuthRequest, AuthVerify, CoreModuleHashReply, UpdateBlockAck
from lab.protocol.events import ProtocolViolation
from lab.protocol.frames import DataMessage, FrameReader
from lab.protocol.session import AgentSession, NativeUpdate

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
SESSION_FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

KNOWN_IDS = [1, 2, 3, 4, 5, 10, 11, 12, 13, 14, 15, 16, 20, 30, 31]

hashes = st.binary(min_size=48, max_size=48)
request_ids = st.integers(0, 0xFFFF)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
# Arbitrary bytes, plus bytes that start with a known command id so parsing gets past the id.
agent_bytes = st.one_of(
    st.binary(max_size=200),
    st.builds(lambda cid, tail: struct.pack(">H", cid) + tail, st.sampled_from(KNOWN_IDS), st.binary(max_size=200)),
    st.builds(lambda tail: b"{" + tail, st.binary(max_size=50)),
    st.builds(lambda value: json.dumps(value).encode(), st.dictionaries(st.text(max_size=8), json_values, max_size=5)),
)


@pytest.fixture(scope="module")
def identity():
    return generate_identity()


# -- parse_agent_message -------------------------------------------------------------------------


@FUZZ
@given(agent_bytes)
def test_parse_raises_only_peer_error(data):
    try:
        commands.parse_agent_message(data)
    except PeerProtocolError:
        pass


@FUZZ
@given(hashes, hashes)
def test_auth_request_round_trip(certificate_hash, nonce):
    parsed = commands.parse_agent_message(commands.build_auth_request(certificate_hash, nonce))
    assert parsed == AuthRequest(certificate_hash, nonce)


@FUZZ
@given(st.binary(min_size=1, max_size=2000), st.binary(min_size=1, max_size=600))
def test_auth_verify_round_trip(certificate, signature):
    parsed = commands.parse_agent_message(commands.build_auth_verify(certificate, signature))
    assert parsed == AuthVerify(certificate, signature)


@FUZZ
@given(
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
    st.integers(1, 8),
    hashes,
    st.integers(0, 0x1FF),
    st.text(max_size=40),
)
def test_auth_info_round_trip(agent_id, version, platform, mesh_id, capabilities, hostname):
    encoded = hostname.encode()
    data = struct.pack(">HIIII48sIH", 3, 1, agent_id, version, platform, mesh_id, capabilities, len(encoded)) + encoded
    parsed = commands.parse_agent_message(data)
    assert isinstance(parsed, AuthInfo)
    assert (parsed.agent_id, parsed.agent_version, parsed.platform_type) == (agent_id, version, platform)
    assert parsed.mesh_id == mesh_id
    assert int(parsed.capabilities) == capabilities
    assert parsed.hostname == hostname


@FUZZ
@given(request_ids, hashes)
def test_hash_replies_round_trip(request_id, value):
    header = struct.pack(">H", request_id)
    assert commands.parse_agent_message(b"\x00\x0c" + header + value) == AgentHashReply(request_id, value)
    assert commands.parse_agent_message(b"\x00\x0b" + header + value) == CoreModuleHashReply(request_id, value)
    assert commands.parse_agent_message(b"\x00\x0e" + header) == UpdateBlockAck(request_id)


@FUZZ
@given(st.dictionaries(st.text(max_size=8), json_values, max_size=6))
def test_json_round_trip(value):
    assert commands.parse_agent_message(commands.build_json(value).encode()).value == value


@FUZZ
@given(request_ids, st.binary(max_size=300))
def test_update_block_layout(request_id, data):
    message = commands.build_agent_update_block(data, request_id)
    assert struct.unpack_from(">HH", message) == (14, request_id)
    assert message[4:] == data


# -- FrameReader ---------------------------------------------------------------------------------


def split_points(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    pieces, start = [], 0
    for point in points:
        pieces.append(data[start:point])
        start = point
    pieces.append(data[start:])
    return pieces


@FUZZ
@given(st.binary(max_size=400), st.lists(st.integers(0, 10_000), max_size=8))
def test_frame_reader_raises_only_peer_error(stream, cuts):
    reader = FrameReader(1024)
    try:
        for piece in split_points(stream, cuts):
            reader.receive_data(piece)
            reader.events()
    except PeerProtocolError:
        pass


@FUZZ
@given(
    st.lists(
        st.tuples(st.binary(max_size=3000), st.booleans(), st.lists(st.integers(1, 2000), max_size=5), st.booleans()),
        min_size=1,
        max_size=4,
    ),
    st.lists(st.integers(0, 100_000), max_size=10),
)
def test_frame_reader_reassembles(messages, cuts):
    stream = b""
    for payload, text, fragment_sizes, masked in messages:
        pieces = []
        rest = payload
        for size in fragment_sizes:
            pieces.append(rest[:size])
            rest = rest[size:]
        pieces.append(rest)
        for index, piece in enumerate(pieces):
            if index > 0:
                opcode = 0x0
            elif text:
                opcode = 0x1
            else:
                opcode = 0x2
            mask = os.urandom(4) if masked else None
            stream += client_frame(opcode, piece, fin=index == len(pieces) - 1, mask=mask)
            if index == 0:
                stream += client_frame(0x9, b"ping", mask=mask)

    reader = FrameReader(1 << 20)
    received = []
    for piece in split_points(stream, cuts):
        reader.receive_data(piece)
        received.extend(event for event in reader.events() if isinstance(event, DataMessage))
    assert received == [DataMessage(payload, text) for payload, text, _, _ in messages]


# -- AgentSession --------------------------------------------------------------------------------

STATES = ["fresh", "after-auth-request", "resumed-opening", "authenticated", "updating", "hash-sent"]


def session_in_state(identity, state: str) -> AgentSession:
    resumed = state == "resumed-opening"
    link: InMemoryLink = make_link(identity, resumed=resumed)
    if state == "fresh":
        return link.session
    if state in ("after-auth-request", "resumed-opening"):
        link.send_to_server(link.agent.opening_messages()[:-1] if resumed else link.agent.opening_messages())
        link.session.messages_to_send()
        return link.session
    link.connect()
    if state == "updating":
        link.session.start_native_update(NativeUpdate(os.urandom(5000), bytes(48), block_size=1024))
        link.session.messages_to_send()
    if state == "hash-sent":
        link.session.start_native_update(NativeUpdate(os.urandom(500), bytes(48)))
        link.pump()
    return link.session


@pytest.mark.parametrize("state", STATES)
def test_session_never_raises(identity, state):
    @SESSION_FUZZ
    @given(st.lists(agent_bytes, min_size=1, max_size=5))
    def check(messages):
        session = session_in_state(identity, state)
        for message in messages:
            events = session.receive_message(message)
            assert isinstance(events, list)
        assert session.protocol_errors <= len(messages)

    check()


@pytest.mark.parametrize("state", STATES)
def test_session_violation_events_counted(identity, state):
    @SESSION_FUZZ
    @given(st.lists(st.binary(max_size=120), min_size=1, max_size=5))
    def check(messages):
        session = session_in_state(identity, state)
        reported = 0
        for message in messages:
            reported += sum(isinstance(event, ProtocolViolation) for event in session.receive_message(message))
        assert session.protocol_errors == reported

    check()
