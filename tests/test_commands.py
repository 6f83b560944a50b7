"""Tests of lab.protocol.commands: parsing agent messages and building server messages."""

from __future__ import annotations

import json
import struct

import pytest

from lab.errors import LocalProtocolError, PeerProtocolError
from lab.protocol import commands
from lab.protocol.commands import (
    AgentCommitDate,
    AgentHashReply,
    AgentTag,
    AuthConfirm,
    AuthInfo,
    AuthRequest,
    AuthVerify,
    Capability,
    CommandId,
    CoreModuleHashReply,
    HostInfo,
    JsonMessage,
    ServerIdReport,
    UpdateBlockAck,
    parse_agent_message,
)

HASH_A = bytes(range(48))
HASH_B = bytes(range(100, 148))


def command(command_id: int, body: bytes = b"") -> bytes:
    return struct.pack(">H", command_id) + body


def auth_info_bytes(hostname: bytes = b"vm", *, declared_length: int | None = None, mesh_id: bytes = HASH_A) -> bytes:
    length = len(hostname) if declared_length is None else declared_length
    return struct.pack(">HIIII48sIH", 3, 1, 6, 0, 1, mesh_id, 0x118, length) + hostname


# -- parse: authentication ---------------------------------------------------------------------


def test_parse_auth_request():
    message = parse_agent_message(command(1, HASH_A + HASH_B))
    assert message == AuthRequest(HASH_A, HASH_B)


@pytest.mark.parametrize("length", [2, 3, 50, 97, 99, 200])
def test_parse_auth_request_wrong_length(length):
    data = command(1, bytes(length - 2))
    with pytest.raises(PeerProtocolError, match="expected 98 bytes"):
        parse_agent_message(data)


def test_parse_auth_verify():
    message = parse_agent_message(command(2, struct.pack(">H", 3) + b"abc" + b"signature"))
    assert message == AuthVerify(b"abc", b"signature")


@pytest.mark.parametrize(
    "body",
    [
        b"",  # no certificate length
        b"\x00",  # half a certificate length
        struct.pack(">H", 0) + b"signature",  # empty certificate
        struct.pack(">H", 3) + b"abc",  # no signature
        struct.pack(">H", 10) + b"abc",  # certificate cut short
    ],
    ids=["empty", "half-length", "zero-certificate", "no-signature", "truncated-certificate"],
)
def test_parse_auth_verify_malformed(body):
    with pytest.raises(PeerProtocolError, match="AUTH_VERIFY"):
        parse_agent_message(command(2, body))


def test_parse_auth_info_fields():
    message = parse_agent_message(auth_info_bytes(b"host-1"))
    assert isinstance(message, AuthInfo)
    assert message.info_version == 1
    assert message.agent_id == 6
    assert message.agent_version == 0
    assert message.platform_type == 1
    assert message.mesh_id == HASH_A
    assert message.capabilities == Capability.CONSOLE | Capability.JAVASCRIPT | Capability.COMPRESSION
    assert message.hostname == "host-1"


def test_parse_auth_info_empty_hostname():
    message = parse_agent_message(auth_info_bytes(b""))
    assert isinstance(message, AuthInfo)
    assert message.hostname == ""


def test_parse_auth_info_unknown_capability_bits():
    data = struct.pack(">HIIII48sIH", 3, 1, 6, 0, 1, HASH_A, 0x8000_0118, 0)
    message = parse_agent_message(data)
    assert isinstance(message, AuthInfo)
    assert int(message.capabilities) == 0x8000_0118


@pytest.mark.parametrize("cut", [2, 10, 66, 71])
def test_parse_auth_info_truncated_header(cut):
    with pytest.raises(PeerProtocolError, match="expected at least 72"):
        parse_agent_message(auth_info_bytes()[:cut])


@pytest.mark.parametrize("declared", [0, 1, 3, 500])
def test_parse_auth_info_hostname_length_mismatch(declared):
    with pytest.raises(PeerProtocolError, match="AUTH_INFO"):
        parse_agent_message(auth_info_bytes(b"vm", declared_length=declared))


@pytest.mark.parametrize("body", [b"", b"\x00\x00"])
def test_parse_auth_confirm_any_length(body):
    assert parse_agent_message(command(4, body)) == AuthConfirm()


def test_parse_server_id():
    assert parse_agent_message(command(5, HASH_A)) == ServerIdReport(HASH_A)


@pytest.mark.parametrize("length", [0, 32, 47, 49])
def test_parse_server_id_wrong_length(length):
    with pytest.raises(PeerProtocolError, match="SERVER_ID"):
        parse_agent_message(command(5, bytes(length)))


# -- parse: commands with a request id ---------------------------------------------------------


def test_parse_core_hash_none():
    assert parse_agent_message(command(11, b"\x00\x07")) == CoreModuleHashReply(7, None)


def test_parse_core_hash_value():
    assert parse_agent_message(command(11, b"\x00\x01" + HASH_A)) == CoreModuleHashReply(1, HASH_A)


@pytest.mark.parametrize("length", [0, 1, 3, 49, 51, 53])
def test_parse_core_hash_wrong_length(length):
    with pytest.raises(PeerProtocolError, match="CORE_MODULE_HASH"):
        parse_agent_message(command(11, bytes(length)))


def test_parse_agent_hash():
    assert parse_agent_message(command(12, b"\x00\x00" + HASH_B)) == AgentHashReply(0, HASH_B)


@pytest.mark.parametrize("length", [0, 1, 2, 49, 51])
def test_parse_agent_hash_wrong_length(length):
    with pytest.raises(PeerProtocolError, match="AGENT_HASH"):
        parse_agent_message(command(12, bytes(length)))


def test_parse_block_ack():
    assert parse_agent_message(command(14, b"\x00\x01")) == UpdateBlockAck(1)


@pytest.mark.parametrize("length", [0, 1, 3, 100])
def test_parse_block_ack_wrong_length(length):
    with pytest.raises(PeerProtocolError, match="AGENT_UPDATE_BLOCK"):
        parse_agent_message(command(14, bytes(length)))


def test_parse_agent_tag_strips_nuls():
    assert parse_agent_message(command(15, b"lab\0\0")) == AgentTag(b"lab")


def test_parse_agent_tag_empty():
    assert parse_agent_message(command(15)) == AgentTag(b"")


def test_parse_commit_date():
    message = parse_agent_message(command(30, b"2022-Nov-2 23:01:45-0700\0"))
    assert message == AgentCommitDate("2022-Nov-2 23:01:45-0700")


def test_parse_host_info():
    message = parse_agent_message(command(31, b"Debian GNU/Linux 12 (bookworm) - x64"))
    assert message == HostInfo("Debian GNU/Linux 12 (bookworm) - x64")


@pytest.mark.parametrize("command_id", [10, 13, 16, 20])
def test_parse_server_only_command(command_id):
    with pytest.raises(PeerProtocolError, match="server-to-agent"):
        parse_agent_message(command(command_id, bytes(60)))


@pytest.mark.parametrize("command_id", [10, 11, 12, 13, 14, 16, 20])
def test_parse_short_header(command_id):
    with pytest.raises(PeerProtocolError, match="4-byte header"):
        parse_agent_message(command(command_id, b"\x00"))


@pytest.mark.parametrize("command_id", [0, 6, 9, 17, 999, 1000, 0xFFFF])
def test_parse_unknown_command(command_id):
    with pytest.raises(PeerProtocolError, match=f"unknown command id {command_id}"):
        parse_agent_message(command(command_id, bytes(4)))


@pytest.mark.parametrize("data", [b"", b"\x00"])
def test_parse_too_short(data):
    with pytest.raises(PeerProtocolError, match="too short"):
        parse_agent_message(data)


# -- parse: JSON -------------------------------------------------------------------------------


def test_parse_json_object():
    message = parse_agent_message(b'{"action":"coreinfo","value":"MeshCore Recovery","caps":14}')
    assert message == JsonMessage({"action": "coreinfo", "value": "MeshCore Recovery", "caps": 14})


@pytest.mark.parametrize(
    "data",
    [b"{", b'{"a":}', b"{\xff}", b'{"a":1} trailing'],
    ids=["unterminated", "missing-value", "invalid-utf8", "trailing-data"],
)
def test_parse_json_invalid(data):
    with pytest.raises(PeerProtocolError, match="invalid JSON"):
        parse_agent_message(data)


def test_parse_json_deep_nesting():
    data = b'{"a":' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    with pytest.raises(PeerProtocolError, match="invalid JSON"):
        parse_agent_message(data)


def test_parse_json_huge_integer():
    data = b'{"a":' + b"9" * 5000 + b"}"
    with pytest.raises(PeerProtocolError, match="invalid JSON"):
        parse_agent_message(data)


def test_parse_json_array_is_binary_command():
    # Only a leading "{" marks JSON, so "[" is read as the command id 0x5B22.
    with pytest.raises(PeerProtocolError, match="unknown command id"):
        parse_agent_message(b'["a"]')


# -- builders ----------------------------------------------------------------------------------


def test_build_auth_request():
    assert commands.build_auth_request(HASH_A, HASH_B) == b"\x00\x01" + HASH_A + HASH_B


@pytest.mark.parametrize("length", [0, 32, 47, 49])
def test_build_auth_request_bad_hash(length):
    with pytest.raises(LocalProtocolError, match="certificate hash"):
        commands.build_auth_request(bytes(length), HASH_B)


@pytest.mark.parametrize("length", [0, 47, 49])
def test_build_auth_request_bad_nonce(length):
    with pytest.raises(LocalProtocolError, match="nonce"):
        commands.build_auth_request(HASH_A, bytes(length))


def test_build_auth_verify():
    assert commands.build_auth_verify(b"cert", b"sig") == b"\x00\x02\x00\x04certsig"


def test_build_auth_verify_round_trip():
    parsed = parse_agent_message(commands.build_auth_verify(b"c" * 1500, b"s" * 384))
    assert parsed == AuthVerify(b"c" * 1500, b"s" * 384)


@pytest.mark.parametrize("length", [0, 0x10000])
def test_build_auth_verify_bad_certificate(length):
    with pytest.raises(LocalProtocolError, match="u16 length"):
        commands.build_auth_verify(bytes(length), b"sig")


def test_build_auth_confirm():
    assert commands.build_auth_confirm() == b"\x00\x04"


def test_build_core_module():
    message = commands.build_core_module(b"\0\0\0\0js", HASH_A, request_id=3)
    assert message == b"\x00\x0a\x00\x03" + HASH_A + b"\0\0\0\0js"


def test_build_core_module_compressed():
    message = commands.build_core_module(b"\0\0\0\0js", HASH_A, compressed_payload=b"deflated")
    assert message == b"\x00\x14\x00\x00" + HASH_A + b"deflated"


@pytest.mark.parametrize("length", [0, 32, 49])
def test_build_core_module_bad_hash(length):
    with pytest.raises(LocalProtocolError, match="core hash"):
        commands.build_core_module(b"js", bytes(length))


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (commands.build_core_module_clear, b"\x00\x0a\x00\x00"),
        (commands.build_core_module_hash_request, b"\x00\x0b\x00\x00"),
        (commands.build_agent_hash_request, b"\x00\x0c\x00\x00"),
        (commands.build_agent_update_start, b"\x00\x0d\x00\x00"),
        (commands.build_core_ok, b"\x00\x10\x00\x00"),
    ],
    ids=["core-clear", "core-hash-request", "agent-hash-request", "update-start", "core-ok"],
)
def test_build_four_byte_commands(build, expected):
    assert build() == expected


@pytest.mark.parametrize(
    "build",
    [
        commands.build_core_module_clear,
        commands.build_core_module_hash_request,
        commands.build_agent_hash_request,
        commands.build_agent_update_start,
        commands.build_core_ok,
    ],
)
def test_build_request_id(build):
    assert build(0x1234)[2:] == b"\x12\x34"


def test_build_update_block_default_request_id():
    assert commands.build_agent_update_block(b"data") == b"\x00\x0e\x00\x01data"


def test_build_update_block_empty():
    assert commands.build_agent_update_block(b"") == b"\x00\x0e\x00\x01"


def test_build_update_end():
    assert commands.build_agent_update_end(HASH_B) == b"\x00\x0d\x00\x00" + HASH_B


@pytest.mark.parametrize("length", [0, 47, 49])
def test_build_update_end_bad_hash(length):
    with pytest.raises(LocalProtocolError, match="update hash"):
        commands.build_agent_update_end(bytes(length))


def test_build_json_compact():
    text = commands.build_json({"action": "agentupdate", "hash": "ab"})
    assert text == '{"action":"agentupdate","hash":"ab"}'


def test_build_json_is_text():
    assert isinstance(commands.build_json({"a": 1}), str)


def test_build_json_round_trip():
    value = {"action": "msg", "value": {"1": {"msg": "é", "icon": 3}}}
    assert parse_agent_message(commands.build_json(value).encode()) == JsonMessage(value)


def test_command_ids_match_wire():
    assert [int(c) for c in CommandId] == [1, 2, 3, 4, 5, 10, 11, 12, 13, 14, 15, 16, 20, 30, 31]


def test_block_size_fills_reassembly_limit():
    assert len(commands.build_agent_update_block(bytes(commands.MAX_BLOCK_SIZE))) == 65535


def test_json_builder_parses_back():
    assert json.loads(commands.build_json({"k": [1, 2]})) == {"k": [1, 2]}


@pytest.mark.parametrize("request_id", [-1, 0x10000])
def test_build_rejects_invalid_request_id(request_id):
    with pytest.raises(LocalProtocolError, match=f"invalid request id {request_id}"):
        commands.build_agent_hash_request(request_id)
    with pytest.raises(LocalProtocolError, match="0 to 65535"):
        commands.build_agent_update_block(b"block", request_id)
