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
    if docker_ok:
        checks.append(_image_check())
    checks.append(_box_check())

    from lab.doctor_vm import vm_checks

    checks.extend(vm_checks())
    return checks


def _image_check() -> Check:
    """Return the doctor row of the offline container images. A run builds the ones it needs."""
    from lab import images
    from lab.errors import LabError

    try:
        # An image built from an older recipe is rebuilt by the next run, so it counts as missing.
        built = {info.target for info in images.list_images() if info.up_to_date}
        offline = [name for name in images.known_targets() if images.load_recipe(name).kind != "registry"]
    except LabError as error:
        return Check("container images", False, f"cannot list: {error}", required=False)
    missing = [name for name in offline if name not in built]
    detail = f"{len(offline) - len(missing)} of {len(offline)} offline images built"
    if missing:
        detail += f"; missing {', '.join(missing)}: make images (runs build them when needed)"
    return Check("container images", not missing, detail, required=False)


def _box_check() -> Check:
    """Return the doctor row of the VM boxes. Of these, only debian12-vm can be built here."""
    from lab import boxes
    from lab.errors import LabError

    try:
        statuses = boxes.list_boxes()
    except LabError as error:
        return Check("vagrant boxes", False, f"cannot list: {error}", required=False)
    present = [status.target for status in statuses if status.present]
    detail = f"present: {', '.join(present)}" if present else "none present"
    if "debian12-vm" not in present:
        detail += "; build debian12-vm with: updatelab boxes build debian12-vm"
    return Check("vagrant boxes", "debian12-vm" in present, detail, required=False)
