"""``updatelab doctor``: check each prerequisite and print how to fix what is missing."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess

from lab import agents


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    required: bool = True


def _command_output(command: list[str]) -> tuple[bool, str]:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        return False, str(error)
    output = (result.stdout or result.stderr).strip()
    first_line = output.splitlines()[0] if output else ""
    return result.returncode == 0, first_line


def run_checks() -> list[Check]:
    checks = []
    npm = shutil.which("npm")
    checks.append(Check("npm", npm is not None, npm or "missing: apt-get install npm"))
    node = shutil.which("node")
    checks.append(Check("node", node is not None, node or "missing: apt-get install nodejs (used to compare hashes with MeshCentral)", required=False))
    for version in agents.KNOWN_VERSIONS:
        package = agents.cached_package(version)
        checks.append(Check(
            f"agents {version}", package is not None,
            str(package.path) if package else f"not cached: updatelab agents fetch --version {version}",
        ))

    docker_ok, docker_detail = _command_output(["docker", "info", "--format", "{{.ServerVersion}}"]) if shutil.which("docker") else (False, "")
    checks.append(Check(
        "docker engine", docker_ok,
        f"server {docker_detail}" if docker_ok else "not running or not installed: sh scripts/ensure-docker.sh (as root)",
    ))
    debootstrap = shutil.which("debootstrap") or (os.path.exists("/usr/sbin/debootstrap") and "/usr/sbin/debootstrap")
    checks.append(Check("debootstrap", bool(debootstrap), str(debootstrap) if debootstrap else "missing: apt-get install debootstrap"))

    from lab.doctor_vm import vm_checks

    checks.extend(vm_checks())
    return checks
