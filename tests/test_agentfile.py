"""Tests of lab.agentfile: agent hashes, .msh files and loading agent binaries.

The first part uses small synthetic ELF, PE and Mach-O files. The second part uses the real
agents of the meshcentral npm package cached by ``updatelab agents fetch`` and compares the
lab's hash with the one that MeshCentral's own agents/exeHandler.js computes under node.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from lab import agents
from lab.agentfile import (
    JAVASCRIPT_GUID,
    MSH_POLICY_GUID,
    NULL_POLICY_GUID,
    ExecutableFormat,
    agent_hash,
    detect_format,
    elf_machine,
    embed_msh,
    embedded_msh,
    format_msh,
    load_agent_binary,
    parse_msh,
)
from lab.errors import AgentFileError, ConfigError

MSH = b"MeshName=lab\nMeshServer=wss://127.0.0.1:1/agent.ashx\n"


def sha384(data: bytes) -> bytes:
    return hashlib.sha384(data).digest()


def synthetic_elf(size: int = 4000) -> bytes:
    header = b"\x7fELF\x02\x01\x01" + bytes(11) + struct.pack("<H", 62)
    return header + bytes(range(256)) * (size // 256)


def trailer(msh: bytes, guid: bytes = MSH_POLICY_GUID) -> bytes:
    return msh + struct.pack(">I", len(msh)) + guid


def synthetic_pe(*, plus: bool, certificate_table: bytes = b"") -> bytes:
    """Build a minimal PE32 or PE32+ image with a checksum and, optionally, a certificate table."""
    nt_offset = 0x80
    optional_header = nt_offset + 24
    security_entry = optional_header + (144 if plus else 128)
    image = bytearray(b"MZ" + bytes(58) + struct.pack("<I", nt_offset))
    image += bytes(nt_offset - len(image))
    image += b"PE\0\0" + struct.pack("<HH", 0x8664 if plus else 0x14C, 0) + bytes(16)
    image += struct.pack("<H", 0x20B if plus else 0x10B) + bytes(300)
    image += bytes(range(256)) * 8
    struct.pack_into("<I", image, optional_header + 64, 0xDEADBEEF)  # CheckSum
    if certificate_table:
        struct.pack_into("<II", image, security_entry, len(image), len(certificate_table))
        image += certificate_table
    return bytes(image)


def expected_pe_hash(data: bytes, *, plus: bool, end: int) -> bytes:
    """Zero the checksum and security entry in a copy, then hash up to `end`."""
    copy = bytearray(data)
    optional_header = struct.unpack_from("<I", data, 60)[0] + 24
    security_entry = optional_header + (144 if plus else 128)
    copy[optional_header + 64 : optional_header + 68] = bytes(4)
    copy[security_entry : security_entry + 8] = bytes(8)
    return sha384(bytes(copy[:end]))


# -- ELF and Mach-O ------------------------------------------------------------------------------


def test_elf_hash_plain():
    elf = synthetic_elf()
    assert agent_hash(elf) == sha384(elf)


def test_elf_hash_excludes_msh():
    elf = synthetic_elf()
    assert agent_hash(elf + trailer(MSH)) == sha384(elf)


def test_elf_hash_keeps_null_policy_trailer():
    elf = synthetic_elf()
    with_filler = elf + trailer(MSH, NULL_POLICY_GUID)
    assert agent_hash(with_filler) == sha384(with_filler)


def test_elf_hash_keeps_javascript_trailer():
    elf = synthetic_elf()
    with_script = elf + trailer(b"console.log(1);", JAVASCRIPT_GUID)
    assert agent_hash(with_script) == sha384(with_script)


def test_elf_hash_little_endian_length_not_excluded():
    # A length written little-endian points before the start of the file, so nothing is cut.
    elf = synthetic_elf()
    data = elf + MSH + struct.pack("<I", len(MSH)) + MSH_POLICY_GUID
    assert agent_hash(data) == sha384(data)


def test_elf_hash_empty_msh():
    elf = synthetic_elf()
    assert agent_hash(elf + trailer(b"")) == sha384(elf)


def test_elf_hash_changes_with_body():
    elf = bytearray(synthetic_elf())
    before = agent_hash(bytes(elf))
    elf[100] ^= 1
    assert agent_hash(bytes(elf)) != before


def test_elf_machine():
    assert elf_machine(synthetic_elf()) == "x86-64"


def test_macho_hash_excludes_msh():
    macho = b"\xcf\xfa\xed\xfe" + bytes(range(256)) * 10
    assert detect_format(macho) is ExecutableFormat.MACHO
    assert agent_hash(macho) == sha384(macho)
    assert agent_hash(macho + trailer(MSH)) == sha384(macho)


def test_universal_macho_detected():
    assert detect_format(b"\xca\xfe\xba\xbe" + bytes(100)) is ExecutableFormat.MACHO


def test_embed_msh_round_trip():
    elf = synthetic_elf()
    embedded = embed_msh(elf, MSH)
    assert embedded == elf + trailer(MSH)
    assert embedded_msh(embedded) == MSH


def test_embed_msh_replaces_existing():
    elf = synthetic_elf()
    twice = embed_msh(embed_msh(elf, b"old=1\n"), MSH)
    assert twice == elf + trailer(MSH)


def test_embedded_msh_absent():
    assert embedded_msh(synthetic_elf()) is None


# -- PE ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("plus", [False, True], ids=["pe32", "pe32plus"])
def test_pe_hash_unsigned(plus):
    pe = synthetic_pe(plus=plus)
    assert detect_format(pe) is ExecutableFormat.PE
    assert agent_hash(pe) == expected_pe_hash(pe, plus=plus, end=len(pe))


@pytest.mark.parametrize("plus", [False, True], ids=["pe32", "pe32plus"])
def test_pe_hash_stops_at_certificate_table(plus):
    pe = synthetic_pe(plus=plus, certificate_table=b"\x10\x00\x00\x00\x00\x02\x02\x00signature")
    end = len(pe) - len(b"\x10\x00\x00\x00\x00\x02\x02\x00signature")
    assert agent_hash(pe) == expected_pe_hash(pe, plus=plus, end=end)


@pytest.mark.parametrize("plus", [False, True], ids=["pe32", "pe32plus"])
def test_pe_hash_ignores_checksum(plus):
    pe = bytearray(synthetic_pe(plus=plus))
    before = agent_hash(bytes(pe))
    optional_header = struct.unpack_from("<I", pe, 60)[0] + 24
    struct.pack_into("<I", pe, optional_header + 64, 0x12345678)
    assert agent_hash(bytes(pe)) == before


@pytest.mark.parametrize("plus", [False, True], ids=["pe32", "pe32plus"])
def test_pe_hash_ignores_certificate_contents(plus):
    first = synthetic_pe(plus=plus, certificate_table=b"A" * 64)
    second = synthetic_pe(plus=plus, certificate_table=b"B" * 64)
    assert agent_hash(first) == agent_hash(second)


def test_pe32_and_pe32plus_differ_in_security_entry():
    # The same bytes at the PE32 security entry are hashed as data in a PE32+ file.
    pe = bytearray(synthetic_pe(plus=True))
    before = agent_hash(bytes(pe))
    optional_header = struct.unpack_from("<I", pe, 60)[0] + 24
    pe[optional_header + 128] = 0x55
    assert agent_hash(bytes(pe)) != before


@pytest.mark.parametrize("plus", [False, True], ids=["pe32", "pe32plus"])
def test_pe_hash_unsigned_excludes_msh(plus):
    pe = synthetic_pe(plus=plus)
    assert agent_hash(pe + trailer(MSH)) == agent_hash(pe)


def test_pe_embed_msh_signed_rejected():
    signed = synthetic_pe(plus=True, certificate_table=b"C" * 32)
    with pytest.raises(ConfigError, match="signed PE"):
        embed_msh(signed, MSH)


def test_mz_without_pe_header_hashed_plainly():
    data = b"MZ" + bytes(200)
    assert agent_hash(data) == sha384(data)


# -- load_agent_binary ---------------------------------------------------------------------------


def test_load_missing_file(tmp_path):
    with pytest.raises(AgentFileError, match=r"--binary .*missing-agent: file not found"):
        load_agent_binary(tmp_path / "missing-agent")


def test_load_directory(tmp_path):
    with pytest.raises(AgentFileError, match="--binary .*: is a directory"):
        load_agent_binary(tmp_path)


def test_load_not_executable(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("just text\n")
    with pytest.raises(AgentFileError, match="--binary .*notes.txt: not an executable"):
        load_agent_binary(path)


def test_load_other_executable():
    ls = shutil.which("ls")
    if ls is None:
        pytest.skip("no ls executable on PATH")
    with pytest.raises(AgentFileError, match="not a MeshAgent build"):
        load_agent_binary(ls)


def test_load_error_names_option(tmp_path):
    with pytest.raises(AgentFileError, match="^--new-binary "):
        load_agent_binary(tmp_path / "missing", option="--new-binary")


def test_load_unreadable(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root can read files without read permission")
    path = tmp_path / "agent"
    path.write_bytes(synthetic_elf())
    path.chmod(0)
    with pytest.raises(AgentFileError, match="cannot be read"):
        load_agent_binary(path)


def test_load_synthetic_agent(tmp_path):
    path = tmp_path / "meshagent"
    data = synthetic_elf() + b"meshcore/agentcore.c"
    path.write_bytes(data)
    binary = load_agent_binary(path)
    assert binary.format is ExecutableFormat.ELF
    assert binary.machine == "x86-64"
    assert binary.agent_hash == sha384(data)
    assert binary.file_hash == sha384(data)
    assert binary.size == len(data)


# -- .msh text -----------------------------------------------------------------------------------


def test_msh_round_trip():
    settings = {"MeshID": "0x" + "ab" * 48, "MeshServer": "wss://127.0.0.1:1/agent.ashx", "ServerID": "cd" * 48}
    assert parse_msh(format_msh(settings)) == settings


def test_msh_format_pairs():
    assert format_msh([("a", "1"), ("b", "x=y"), ("c", "1\x0b"), ("MeshID", "0xAB01"), ("d", "")]) == (
        b"a=1\nb=x=y\nc=1\x0b\nMeshID=0xAB01\nd=\n"
    )


def test_msh_format_rejects_repeated_key():
    with pytest.raises(ConfigError, match="the key is repeated"):
        format_msh([("MeshServer", "wss://127.0.0.1:1/agent.ashx"), ("MeshServer", "wss://127.0.0.1:2/agent.ashx")])


def test_msh_crlf():
    assert parse_msh(b"MeshName=lab\r\nMeshType=2\r\n") == {"MeshName": "lab", "MeshType": "2"}


def test_msh_comments_and_blank_lines():
    text = "# comment=ignored\n\n  # indented comment\nkey=value\nno equals sign\n"
    assert parse_msh(text) == {"key": "value"}


def test_msh_value_split_at_first_equals():
    assert parse_msh("MeshServer=wss://h/a?x=1") == {"MeshServer": "wss://h/a?x=1"}


def test_msh_whitespace_trimmed():
    # The agent trims the line and the value, but keeps a space before the "=" in the key.
    assert parse_msh("  key =  value  \n\tother=\t1 \r\n") == {"key ": "value", "other": "1"}


def test_msh_empty_key_ignored():
    assert parse_msh("=value\nkey=1\n") == {"key": "1"}


def test_msh_empty_value_kept():
    assert parse_msh("disableUpdate=\n") == {"disableUpdate": ""}


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("a\nb", "1", "line break"),
        ("a", "1\n2", "line break"),
        ("a", "1\r", "line break"),
        ("a=b", "1", "contains '='"),
        ("", "1", "key is empty"),
        ("#MeshServer", "wss://127.0.0.1:1/agent.ashx", "comment"),
        (" a", "1", "trims spaces and tabs"),
        ("a", "1 ", "trims spaces and tabs"),
        ("a", "\t1", "trims spaces and tabs"),
        ("CoreModule", "1", "ignores the key CoreModule"),
        ("MeshName", "0xcafe shop", "reads a value starting with 0x as hex"),
        ("MeshID", "0xabc", "reads a value starting with 0x as hex"),
    ],
)
def test_msh_format_rejects(key, value, problem):
    with pytest.raises(ConfigError, match=f"invalid .msh setting .*{problem}"):
        format_msh({key: value})


# -- real agents from the meshcentral package ----------------------------------------------------

REAL_AGENTS = [
    "meshagent_x86-64",
    "MeshService64.exe",
    "MeshService.exe",
    "meshagent_osx-x86-64",
    "meshagent_osx-universal-64",
]

# Runs exeHandler.hashExecutableFile for each path and prints {path: sha384 hex} as JSON.
NODE_HASH_SCRIPT = r"""
const handler = require(process.argv[1]);
const crypto = require('crypto');
const paths = process.argv.slice(2);
const results = {};
function next(index) {
  if (index >= paths.length) { console.log(JSON.stringify(results)); return; }
  const digest = crypto.createHash('sha384');
  digest.setEncoding('hex');
  let hex = '';
  digest.on('data', (chunk) => { hex += chunk; });
  digest.on('end', () => { results[paths[index]] = hex; next(index + 1); });
  handler.hashExecutableFile({ sourcePath: paths[index], targetStream: digest });
}
next(0);
"""


@pytest.fixture(scope="module")
def package():
    found = agents.cached_package("1.1.55")
    if found is None:
        pytest.skip("meshcentral 1.1.55 agents are not cached; run: updatelab agents fetch --version 1.1.55")
    return found


def node_hashes(package, paths: list[Path]) -> dict[str, str]:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed; it is needed to run MeshCentral's exeHandler.js")
    result = subprocess.run(
        [node, "-e", NODE_HASH_SCRIPT, str(package.exe_handler), *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def exe_handler_hashes(package):
    return node_hashes(package, [package.binary(name) for name in REAL_AGENTS])


@pytest.mark.parametrize("name", REAL_AGENTS)
def test_real_agent_hash_matches_meshcentral(package, exe_handler_hashes, name):
    path = package.binary(name)
    assert agent_hash(path.read_bytes()).hex() == exe_handler_hashes[str(path)]


def test_real_linux_agent_loads(package):
    binary = load_agent_binary(package.binary("meshagent_x86-64"))
    assert binary.format is ExecutableFormat.ELF
    assert binary.machine == "x86-64"


@pytest.mark.parametrize("name", ["MeshService64.exe", "meshagent_osx-universal-64"])
def test_real_agent_formats(package, name):
    assert load_agent_binary(package.binary(name)).format is not ExecutableFormat.ELF


def test_embedded_msh_differs_from_meshcentral(package, tmp_path):
    """With an embedded .msh, the agent's rule drops the trailer but exeHandler.js hashes it.

    exeHandler.js 1.1.55 compares the trailer GUID as lowercase hex against an uppercase
    constant and reads the length little-endian, so it never cuts the trailer.
    """
    plain = package.binary("meshagent_x86-64").read_bytes()
    embedded = embed_msh(plain, MSH)
    path = tmp_path / "meshagent_with_msh"
    path.write_bytes(embedded)

    meshcentral_hash = node_hashes(package, [path])[str(path)]
    assert agent_hash(embedded) == agent_hash(plain)
    assert meshcentral_hash == hashlib.sha384(embedded).hexdigest()
    assert meshcentral_hash != agent_hash(embedded).hex()
