"""The VM part of ``updatelab doctor``: Vagrant, vagrant-libvirt, libvirtd, the box and KVM/TCG.

Every VM check is optional, because the container lab works without them.
"""

from __future__ import annotations

import grp
import os
import shutil
import stat
import subprocess

from lab.doctor import Check, _command_output

FIX = "sh scripts/ensure-vagrant.sh (as root)"


def vm_checks() -> list[Check]:
    checks = []
    vagrant = shutil.which("vagrant")
    if vagrant is None:
        checks.append(Check("vagrant", False, f"missing: {FIX}", required=False))
    else:
        ok, version = _command_output(["vagrant", "--version"])
        checks.append(Check("vagrant", ok, version if ok else f"`vagrant --version` failed: {version}; {FIX}", required=False))
        ok, plugins = _plugin_list()
        checks.append(Check("vagrant-libvirt", ok, plugins if ok else f"plugin missing: {FIX}", required=False))

    libvirtd_ok = False
    if shutil.which("virsh") is None:
        checks.append(Check("libvirtd", False, f"virsh missing: {FIX}", required=False))
    else:
        libvirtd_ok, detail = _command_output(["virsh", "-c", "qemu:///system", "version", "--daemon"])
        checks.append(Check("libvirtd", libvirtd_ok, "running" if libvirtd_ok else f"not reachable ({detail}): {FIX}", required=False))

    checks.append(_kvm_device_check())
    checks.append(_accel_check(libvirtd_ok))
    return checks


def _plugin_list() -> tuple[bool, str]:
    from lab import boxes

    # Vagrant writes a .vagrant folder into its working directory, so it runs from the cache.
    boxes.cache_dir().mkdir(parents=True, exist_ok=True)
    try:
        result = subprocess.run(["vagrant", "plugin", "list"], capture_output=True, text=True, timeout=120,
                                env=boxes.vagrant_environment(), cwd=boxes.cache_dir())
    except (OSError, subprocess.TimeoutExpired) as error:
        return False, str(error)
    line = next((line.strip() for line in result.stdout.splitlines() if line.startswith("vagrant-libvirt")), "")
    return bool(line), line


def _kvm_device_check() -> Check:
    try:
        info = os.stat("/dev/kvm")
    except OSError:
        return Check("/dev/kvm", False, "missing: VMs run under TCG emulation (slower)", required=False)
    group_rw = bool(info.st_mode & stat.S_IRGRP and info.st_mode & stat.S_IWGRP)
    try:
        group = grp.getgrgid(info.st_gid).gr_name
    except KeyError:
        group = str(info.st_gid)
    if group != "kvm" or not group_rw:
        return Check("/dev/kvm", False, f"owned by group {group}, mode {oct(info.st_mode & 0o777)}: QEMU (user libvirt-qemu) cannot open it; {FIX}", required=False)
    return Check("/dev/kvm", True, "present, group kvm read-write", required=False)


def _accel_check(libvirtd_ok: bool) -> Check:
    """Report the domain type that VM targets use, probing with the debian12-vm kernel when it is built."""
    from lab import boxes
    from lab.errors import LabError
    from lab.providers import accel

    if not libvirtd_ok:
        return Check("KVM/TCG", False, "unknown until libvirtd runs", required=False)
    try:
        definition = boxes.load_definition("debian12-vm")
        status = boxes.box_status(definition)
    except LabError as error:
        return Check("KVM/TCG", False, f"unknown: {error}", required=False)
    if not status.present:
        return Check("KVM/TCG", False, f"unknown until the box exists: {status.problem}", required=False)
    try:
        decision = accel.choose(boxes.built_box_files(definition, status.key).kernel)
    except LabError as error:
        return Check("KVM/TCG", False, str(error), required=False)
    cached = " (cached)" if decision.cached else ""
    return Check("KVM/TCG", True, f"domain type {decision.domain_type}: {decision.reason}{cached}", required=False)
