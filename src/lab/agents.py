"""The real MeshAgent binaries, taken from the `meshcentral` npm package and cached.

`npm pack meshcentral@VERSION` downloads the package tarball without installing its
dependencies. The lab extracts its agents/ folder (the binaries for every platform, the
recovery core and exeHandler.js) into the user's cache directory. Nothing binary is committed.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from lab.agentfile import agent_hash, detect_format
from lab.errors import AgentPackageError, ConfigError, PrerequisiteError

DEFAULT_VERSION = "1.1.55"
#: Versions the lab is tested with: 1.1.55 ships a Nov 2022 agent, 0.7.99 a Mar 2021 agent.
KNOWN_VERSIONS = ("1.1.55", "0.7.99")

# Architecture ids from MeshCentral's meshAgentsArchitectureNumbers, for the files the lab uses.
ARCHITECTURE_IDS = {
    "MeshService.exe": 3,
    "MeshService64.exe": 4,
    "meshagent_x86": 5,
    "meshagent_x86-64": 6,
    "meshagent_mips": 7,
    "meshagent_arm": 9,
    "meshagent_pogo": 13,
    "meshagent_poky": 15,
    "meshagent_osx-x86-64": 16,
    "meshagent_poky64": 18,
    "meshagent_x86_nokvm": 19,
    "meshagent_x86-64_nokvm": 20,
    "meshagent_arm-linaro": 24,
    "meshagent_armhf": 25,
    "meshagent_armhf2": 27,
    "meshagent_mips24kc": 28,
    "meshagent_osx-arm-64": 29,
    "meshagent_freebsd_x86-64": 30,
    "meshagent_aarch64": 32,
    "meshagent_openwrt_x86_64": 36,
    "meshagent_linux-armada370-hf": 35,
    "meshagent_openbsd_x86-64": 37,
    "meshagent_mipsel24kc": 40,
    "meshagent_aarch64-cortex-a53": 41,
    "MeshServiceARM64.exe": 43,
    "meshagent_riscv64": 45,
    "meshagent_osx-universal-64": 10005,
}

# Files kept from the package besides the binaries.
_SUPPORT_FILES = ("recoverycore.js", "agentrecoverycore.js", "meshcore.js", "exeHandler.js")


def cache_root() -> Path:
    """Return the lab's cache folder: $XDG_CACHE_HOME/updatelab or ~/.cache/updatelab."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "updatelab"


@dataclasses.dataclass(frozen=True)
class AgentEntry:
    """One agent binary of a package, as listed by ``updatelab agents fetch``."""

    name: str
    architecture_id: int | None
    size: int
    agent_hash: str


@dataclasses.dataclass(frozen=True)
class AgentPackage:
    """The cached agents/ folder of one meshcentral package version."""

    version: str
    path: Path

    def binary(self, name: str = "meshagent_x86-64") -> Path:
        path = self.path / name
        if not path.is_file():
            raise AgentPackageError(
                f"meshcentral {self.version} has no agents/{name}; the package contains: "
                + ", ".join(sorted(p.name for p in self.path.iterdir() if p.name.startswith(("mesh", "Mesh"))))
            )
        return path

    @property
    def recovery_core(self) -> Path:
        return self.path / "recoverycore.js"

    @property
    def exe_handler(self) -> Path:
        return self.path / "exeHandler.js"

    def entries(self) -> list[AgentEntry]:
        """List the agent binaries with their architecture id, size and agent hash."""
        entries = []
        for path in sorted(self.path.iterdir()):
            known_name = path.name in ARCHITECTURE_IDS or path.name.startswith("meshagent")
            if not path.is_file() or not known_name:
                continue
            data = path.read_bytes()
            if detect_format(data) is None:
                continue
            entries.append(AgentEntry(path.name, ARCHITECTURE_IDS.get(path.name), len(data), agent_hash(data).hex()))
        return entries


def _validate_version(version: str) -> None:
    parts = version.split(".")
    if len(parts) != 3 or not all(part.isdigit() for part in parts):
        raise ConfigError(f"invalid meshcentral version {version!r}: expected three numbers such as {DEFAULT_VERSION}")


def cached_package(version: str = DEFAULT_VERSION) -> AgentPackage | None:
    """Return the cached package for `version`, or None if it was not fetched yet."""
    _validate_version(version)
    path = cache_root() / "meshcentral" / version / "agents"
    if (path / ".complete").is_file():
        return AgentPackage(version, path)
    return None


def require_package(version: str = DEFAULT_VERSION) -> AgentPackage:
    """Return the cached package, or raise AgentPackageError naming the fetch command."""
    package = cached_package(version)
    if package is None:
        raise AgentPackageError(
            f"meshcentral {version} agents are not cached. Run: updatelab agents fetch --version {version}"
        )
    return package


def fetch_package(version: str = DEFAULT_VERSION, *, npm: str = "npm", timeout: float = 900) -> AgentPackage:
    """Download the meshcentral package with npm and cache its agents/ folder.

    An already cached version is returned without running npm. The cache is filled through a
    temporary folder and renamed into place, so an interrupted fetch leaves nothing half-written.
    """
    package = cached_package(version)
    if package is not None:
        return package
    npm_path = shutil.which(npm)
    if npm_path is None:
        raise PrerequisiteError(f"{npm} not found. Install Node.js and npm (Debian: apt-get install npm)")

    destination = cache_root() / "meshcentral" / version
    destination.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".fetch-{version}-", dir=destination.parent) as work:
        command = [npm_path, "pack", f"meshcentral@{version}", "--pack-destination", work, "--silent"]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise AgentPackageError(f"'npm pack meshcentral@{version}' timed out after {timeout:.0f} s") from None
        if result.returncode != 0:
            tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-10:])
            raise AgentPackageError(f"'npm pack meshcentral@{version}' failed with status {result.returncode}:\n{tail}")
        tarballs = list(Path(work).glob("meshcentral-*.tgz"))
        if len(tarballs) != 1:
            raise AgentPackageError(f"'npm pack' left {len(tarballs)} tarballs in {work}, expected one")

        staging = Path(work, "agents")
        staging.mkdir()
        _extract_agents(tarballs[0], staging)
        (staging / ".complete").write_text(version + "\n")
        if destination.exists():
            shutil.rmtree(destination)
        destination.mkdir()
        staging.rename(destination / "agents")
    return AgentPackage(version, destination / "agents")


def _extract_agents(tarball: Path, destination: Path) -> None:
    """Extract agents/* and exeHandler.js from a package tarball into `destination`."""
    with tarfile.open(tarball, "r:gz") as archive:
        for member in archive.getmembers():
            name = member.name.removeprefix("package/")
            if not member.isfile():
                continue
            if name.startswith("agents/") and name.count("/") == 1:
                target_name = name.removeprefix("agents/")
            elif name in _SUPPORT_FILES:
                target_name = name
            else:
                continue
            source = archive.extractfile(member)
            if source is None:
                continue
            target = destination / target_name
            with source, open(target, "wb") as output:
                shutil.copyfileobj(source, output)
            target.chmod(0o755 if detect_format(target.read_bytes()[:4]) else 0o644)
    if not (destination / "meshagent_x86-64").is_file():
        raise AgentPackageError(f"{tarball.name} has no agents/meshagent_x86-64; is it a meshcentral package?")
