"""MeshAgent executables: format detection, the agent hash, and .msh settings files.

The agent identifies its own binary by a SHA-384 hash that leaves out an embedded .msh trailer
and, for Windows PE files, the checksum field and the certificate table. The server compares
that hash with the hash of the binary it wants the agent to run, so the lab computes it the same
way the agent does (MeshAgent meshcore/agentcore.c, GenerateSHA384FileHash).

An embedded .msh trailer is ``msh || u32 big-endian len(msh) || MSH_POLICY_GUID`` appended to
the binary (MeshCentral exeHandler.js, streamExeWithMeshPolicy).
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import os
import platform
import re
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path

from lab.errors import AgentFileError, ConfigError

#: Trailer GUID that marks an embedded .msh settings block.
MSH_POLICY_GUID = bytes.fromhex("B996015880544A19B7F7E9BE44914C19")
#: Trailer GUID that marks an embedded JavaScript program; the binary then runs that script.
JAVASCRIPT_GUID = bytes.fromhex("B996015880544A19B7F7E9BE44914C18")
#: Trailer GUID of the random filler .msh that MeshCentral adds to Windows agents kept in memory.
NULL_POLICY_GUID = bytes.fromhex("B996015880544A19B7F7E9BE44914C20")

# Every MeshAgent build embeds its own source path in assertion and log messages.
_AGENT_MARKER = b"agentcore.c"
#: The characters that the agent's ILibTrimString removes from .msh lines and values.
_MSH_BLANKS = " \t"
_HEX_DIGITS = re.compile(r"(?:[0-9a-fA-F]{2})+")


class ExecutableFormat(enum.Enum):
    ELF = "elf"
    PE = "pe"
    MACHO = "mach-o"


_MACHO_MAGICS = {
    b"\xfe\xed\xfa\xce",
    b"\xce\xfa\xed\xfe",
    b"\xfe\xed\xfa\xcf",
    b"\xcf\xfa\xed\xfe",
    b"\xca\xfe\xba\xbe",  # universal (fat) binary
}

# ELF e_machine values of the architectures the lab can run, mapped to the agent's ARCHID.
# 64-bit x86 Linux is ARCHID 6 (meshagent_x86-64); 32-bit x86 is ARCHID 5 (meshagent_x86).
_ELF_MACHINES = {62: "x86-64", 3: "x86", 183: "aarch64", 40: "arm", 8: "mips", 243: "riscv64"}


def detect_format(data: bytes) -> ExecutableFormat | None:
    """Return the executable format of `data`: ELF, PE, Mach-O, or None for anything else."""
    if data[:4] == b"\x7fELF":
        return ExecutableFormat.ELF
    if data[:2] == b"MZ":
        return ExecutableFormat.PE
    if data[:4] in _MACHO_MAGICS:
        return ExecutableFormat.MACHO
    return None


def elf_machine(data: bytes) -> str | None:
    """Return the CPU name of an ELF file (``x86-64``, ``x86``, ...), or None if unknown."""
    if detect_format(data) is not ExecutableFormat.ELF or len(data) < 20:
        return None
    byte_order = "<" if data[5] == 1 else ">"
    (machine,) = struct.unpack_from(byte_order + "H", data, 18)
    return _ELF_MACHINES.get(machine)


def _msh_trailer_start(data: bytes) -> int | None:
    """Return the offset where an embedded .msh trailer starts, or None if there is none."""
    if len(data) < 20 or data[-16:] != MSH_POLICY_GUID:
        return None
    (length,) = struct.unpack_from(">I", data, len(data) - 20)
    start = len(data) - 20 - length
    if start < 0:
        return None
    return start


@dataclasses.dataclass(frozen=True)
class _PeLayout:
    checksum_offset: int
    security_entry_offset: int
    certificate_table_offset: int


def _pe_layout(data: bytes) -> _PeLayout | None:
    """Locate the PE checksum field and the security data-directory entry, or return None."""
    if len(data) < 64:
        return None
    (nt_offset,) = struct.unpack_from("<I", data, 60)
    optional_header = nt_offset + 24
    if data[nt_offset : nt_offset + 4] != b"PE\0\0" or len(data) < optional_header + 152:
        return None
    (magic,) = struct.unpack_from("<H", data, optional_header)
    if magic == 0x10B:
        security_entry = optional_header + 128
    elif magic == 0x20B:
        security_entry = optional_header + 144
    else:
        return None
    (table_offset,) = struct.unpack_from("<I", data, security_entry)
    return _PeLayout(optional_header + 64, security_entry, table_offset)


def agent_hash(data: bytes) -> bytes:
    """Compute the 48-byte SHA-384 agent hash of an executable, as the agent computes it.

    ELF, Mach-O and unknown files: the hash covers the file up to an embedded .msh trailer, or
    the whole file if it has none. PE files: the checksum field and the security directory
    entry are hashed as zeros and the hash stops at the certificate table, or at the .msh
    trailer when the file is unsigned.
    """
    layout = _pe_layout(data) if detect_format(data) is ExecutableFormat.PE else None
    if layout is None:
        end = _msh_trailer_start(data)
        return hashlib.sha384(data if end is None else data[:end]).digest()

    end = layout.certificate_table_offset
    if end == 0:
        end = _msh_trailer_start(data) or len(data)
    digest = hashlib.sha384()
    digest.update(data[: layout.checksum_offset])
    digest.update(bytes(4))
    digest.update(data[layout.checksum_offset + 4 : layout.security_entry_offset])
    digest.update(bytes(8))
    digest.update(data[layout.security_entry_offset + 8 : end])
    return digest.digest()


def embedded_msh(data: bytes) -> bytes | None:
    """Return the .msh text embedded at the end of an unsigned binary, or None."""
    start = _msh_trailer_start(data)
    if start is None:
        return None
    return data[start : len(data) - 20]


def embed_msh(data: bytes, msh: bytes) -> bytes:
    """Return `data` with `msh` appended as an embedded .msh trailer.

    An existing trailer is replaced. Signed PE files need the trailer inside the certificate
    table, which the lab does not build; they raise ConfigError.
    """
    layout = _pe_layout(data) if detect_format(data) is ExecutableFormat.PE else None
    if layout is not None and layout.certificate_table_offset != 0:
        raise ConfigError("embedding a .msh into a signed PE file is not supported")
    start = _msh_trailer_start(data)
    body = data if start is None else data[:start]
    return body + msh + struct.pack(">I", len(msh)) + MSH_POLICY_GUID


@dataclasses.dataclass(frozen=True)
class AgentBinary:
    """A MeshAgent executable read from disk, with the hashes the server and agent use."""

    path: Path
    data: bytes
    format: ExecutableFormat
    machine: str | None

    @property
    def agent_hash(self) -> bytes:
        return agent_hash(self.data)

    @property
    def file_hash(self) -> bytes:
        """Plain SHA-384 of the file bytes, which the recovery core checks after a download."""
        return hashlib.sha384(self.data).digest()

    @property
    def size(self) -> int:
        return len(self.data)


def load_agent_binary(path: str | os.PathLike[str], *, option: str = "--binary") -> AgentBinary:
    """Read and check an agent executable given on the command line as `option`.

    Raises AgentFileError when the file is missing, unreadable, not an executable, or an
    executable that is not a MeshAgent build.
    """
    file_path = Path(path)
    try:
        data = file_path.read_bytes()
    except FileNotFoundError:
        raise AgentFileError(
            f"{option} {file_path}: file not found. Run 'updatelab agents fetch' and pass one of "
            "the files it lists."
        ) from None
    except IsADirectoryError:
        raise AgentFileError(f"{option} {file_path}: is a directory, expected an agent binary") from None
    except OSError as error:
        raise AgentFileError(f"{option} {file_path}: cannot be read: {error.strerror}") from error

    executable_format = detect_format(data)
    if executable_format is None:
        raise AgentFileError(
            f"{option} {file_path}: not an executable (no ELF, PE or Mach-O header). "
            "Pass a MeshAgent binary from 'updatelab agents fetch'."
        )
    if _AGENT_MARKER not in data:
        raise AgentFileError(
            f"{option} {file_path}: {describe_format(executable_format)}, but not a MeshAgent build "
            f"(the marker {_AGENT_MARKER.decode()!r} is missing)."
        )
    return AgentBinary(file_path, data, executable_format, elf_machine(data))


def describe_format(executable_format: ExecutableFormat) -> str:
    """Return the format as a phrase, such as "an ELF executable"."""
    return {
        ExecutableFormat.ELF: "an ELF executable",
        ExecutableFormat.PE: "a Windows (PE) executable",
        ExecutableFormat.MACHO: "a macOS (Mach-O) executable",
    }[executable_format]


#: ``platform.machine()`` values and the ELF machine names of agent builds that run on them.
_HOST_MACHINES = {"x86_64": "x86-64", "amd64": "x86-64", "i386": "x86", "i686": "x86", "aarch64": "aarch64", "arm64": "aarch64"}


def host_machine() -> str:
    """Return the ELF machine name of agent builds for this host's CPU, such as "x86-64"."""
    machine = platform.machine()
    return _HOST_MACHINES.get(machine.lower(), machine)


def require_linux_machine(binary: AgentBinary, machine: str, where: str) -> None:
    """Raise AgentFileError unless `binary` is a Linux build for `machine`. `where` names the system that runs it."""
    if binary.format is ExecutableFormat.ELF and binary.machine == machine:
        return
    build = describe_format(binary.format) + (f" for {binary.machine}" if binary.format is ExecutableFormat.ELF else "")
    raise AgentFileError(
        f"{binary.path}: {build}, but {where} runs {machine} Linux builds. "
        f"Pass the matching agent from 'updatelab agents fetch', such as meshagent_{machine}."
    )


def parse_msh(text: str | bytes) -> dict[str, str]:
    """Parse .msh settings text into an ordered mapping, as the agent's importSettings reads it.

    Each LF-separated line loses its leading and trailing spaces and tabs. Lines starting with
    ``#`` are skipped, and so are lines whose first ``=`` is missing or first. The key is the
    text before that ``=``, kept as it is. The value is the text after it, without a trailing CR
    and without spaces and tabs at either end. Unlike the agent, the mapping keeps empty values
    (the agent deletes such a setting), ``CoreModule`` (ignored) and ``0x`` values as text
    (stored hex-decoded).
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    settings: dict[str, str] = {}
    for raw_line in text.split("\n"):
        line = raw_line.strip(_MSH_BLANKS)
        if line.startswith("#") or line.find("=") <= 0:
            continue
        key, value = line.split("=", 1)
        settings[key] = value.removesuffix("\r").strip(_MSH_BLANKS)
    return settings


def format_msh(settings: Mapping[str, str] | Iterable[tuple[str, str]]) -> bytes:
    """Render settings as .msh text with LF line endings.

    Raises ConfigError for a setting that the agent's reader would not read back as written.
    """
    items = settings.items() if isinstance(settings, Mapping) else settings
    lines = []
    seen: set[str] = set()
    for key, value in items:
        problem = _msh_setting_problem(key, value, seen)
        if problem:
            raise ConfigError(f"invalid .msh setting {key!r}={value!r}: {problem}")
        seen.add(key)
        lines.append(f"{key}={value}")
    return ("\n".join(lines) + "\n").encode()


def _msh_setting_problem(key: str, value: str, seen: set[str]) -> str | None:
    """Return why the agent would not read the setting as written, or None."""
    if any(character in key + value for character in "\r\n"):
        return "it contains a line break"
    if "=" in key:
        return "the key contains '='"
    if not key:
        return "the key is empty"
    if key.startswith("#"):
        return "a key starting with '#' makes the line a comment"
    if key != key.lstrip(_MSH_BLANKS) or value != value.strip(_MSH_BLANKS):
        return "the agent trims spaces and tabs at the start of a line and around a value"
    if key == "CoreModule":
        return "the agent ignores the key CoreModule"
    if len(value) > 2 and value.startswith("0x") and not _HEX_DIGITS.fullmatch(value[2:]):
        return "the agent reads a value starting with 0x as hex, and the rest is not an even number of hex digits"
    if key in seen:
        return "the key is repeated, and the agent keeps only the last value"
    return None
