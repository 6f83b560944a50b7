"""Choose the libvirt domain type for VM targets: ``kvm`` (hardware) or ``qemu`` (TCG emulation).

A usable /dev/kvm does not prove that guests run under KVM: on some nested hosts a guest
kernel hangs before it prints anything. So the choice is made by experiment. A short probe
boots the box's kernel directly in a transient libvirt domain, with no disk and its serial
console written to a file, and reads the console for the kernel's banner. KVM is tried first,
then TCG. The decision is cached per host boot, kernel file and QEMU binary, because neither
can change without one of those changing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from xml.sax.saxutils import escape

from lab.errors import PrerequisiteError
from lab.providers import libvirt_util

log = logging.getLogger(__name__)

#: Environment variable that skips the probe: ``kvm`` or ``qemu``.
ACCEL_ENV = "UPDATELAB_VM_ACCEL"
DOMAIN_TYPES = ("kvm", "qemu")

#: Text that every Linux kernel prints first on its console.
KERNEL_BANNER = "Linux version"

#: Seconds a probe waits for the kernel banner. Under TCG on a 2-core host the Debian 12
#: kernel prints it within 2 s, so 20 s leaves room for a loaded host.
DEFAULT_PROBE_TIMEOUT = 20.0

#: Name prefix of probe domains; the full name adds the lab's PID, so cleanup can tell whose it is.
PROBE_PREFIX = "updatelab-probe-"


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    domain_type: str
    booted: bool
    seconds: float
    #: Last lines of the serial console, or why the probe could not start.
    console_tail: str


@dataclasses.dataclass(frozen=True)
class AccelDecision:
    """The domain type that VM targets use, and why."""

    domain_type: str
    reason: str
    probes: tuple[ProbeResult, ...] = ()
    cached: bool = False


def kvm_device_usable() -> bool:
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


def decide(results: list[ProbeResult], kvm_present: bool) -> AccelDecision:
    """Pick the domain type from probe results in the order they ran (kvm first, then qemu).

    Raises PrerequisiteError, with the console tail of each probe, when no probe booted.
    """
    by_type = {result.domain_type: result for result in results}
    kvm = by_type.get("kvm")
    tcg = by_type.get("qemu")
    if kvm is not None and kvm.booted:
        return AccelDecision("kvm", f"a KVM guest printed its kernel banner in {kvm.seconds:.1f} s", tuple(results))
    if tcg is not None and tcg.booted:
        if not kvm_present:
            reason = "/dev/kvm is missing or not writable"
        elif kvm is None:
            reason = "KVM was not probed"
        elif kvm.console_tail.startswith(("QEMU stopped", "virsh create failed")):
            reason = "KVM failed to start a guest (" + kvm.console_tail.splitlines()[-1].strip() + ")"
        else:
            reason = f"a KVM guest printed nothing on its serial console in {kvm.seconds:.0f} s"
        return AccelDecision(
            "qemu", f"{reason}; a TCG guest printed its kernel banner in {tcg.seconds:.1f} s, so VMs use TCG emulation (slower)",
            tuple(results),
        )
    details = "\n".join(f"--- {result.domain_type} probe console ---\n{result.console_tail or '(empty)'}" for result in results)
    raise PrerequisiteError(
        "no virtual machine booted its kernel under KVM or TCG; check `virsh -c qemu:///system capabilities` "
        f"and the libvirtd log.\n{details}"
    )


def probe_xml(name: str, domain_type: str, kernel: Path, console_log: Path, memory_mib: int = 256) -> str:
    """Return a transient domain that boots `kernel` with no disk and logs its serial console to a file.

    The kernel panics when it finds no root file system, and ``panic=-1`` with
    ``on_reboot=destroy`` then removes the domain by itself.
    """
    # No <cpu> element: QEMU's default model (qemu64), the model that VM targets use too.
    return f"""<domain type='{domain_type}'>
  <name>{escape(name)}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{escape(str(kernel))}</kernel>
    <cmdline>console=ttyS0 panic=-1</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <serial type='file'>
      <source path='{escape(str(console_log))}'/>
      <target port='0'/>
    </serial>
  </devices>
</domain>
"""


def probe(domain_type: str, kernel: Path, timeout: float = DEFAULT_PROBE_TIMEOUT) -> ProbeResult:
    """Boot `kernel` in a transient domain of `domain_type` and report whether it printed its banner."""
    name = f"{PROBE_PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="updatelab-accel-") as folder:
        os.chmod(folder, 0o755)
        console_log = Path(folder) / "console.log"
        xml_path = Path(folder) / "domain.xml"
        xml_path.write_text(probe_xml(name, domain_type, kernel, console_log))
        result = libvirt_util.virsh("create", str(xml_path), check=False)
        if result.returncode != 0:
            return ProbeResult(domain_type, False, time.monotonic() - started, f"virsh create failed: {result.stderr.strip()}")
        # The clock starts when the guest does, because libvirtd may take a while to start QEMU.
        started = time.monotonic()
        try:
            deadline = started + timeout
            text = ""
            while time.monotonic() < deadline:
                text = _read(console_log)
                if KERNEL_BANNER in text:
                    return ProbeResult(domain_type, True, time.monotonic() - started, _tail(text))
                if not _domain_running(name):
                    qemu_log = _tail(_read(Path("/var/log/libvirt/qemu") / f"{name}.log"), 5)
                    return ProbeResult(
                        domain_type, False, time.monotonic() - started,
                        f"QEMU stopped before the kernel printed anything:\n{qemu_log}",
                    )
                time.sleep(0.25)
            return ProbeResult(domain_type, False, time.monotonic() - started, _tail(_read(console_log)))
        finally:
            libvirt_util.virsh("destroy", name, check=False)


def _domain_running(name: str) -> bool:
    return libvirt_util.virsh("domstate", name, check=False).stdout.strip() == "running"


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.replace("\r", "").rstrip().splitlines()[-lines:])


def cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "updatelab" / "accel.json"


def _cache_key(kernel: Path) -> str:
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot_id = "unknown"
    qemu = shutil.which("qemu-system-x86_64") or ""
    qemu_stamp = str(os.stat(qemu).st_mtime_ns) if qemu else ""
    kernel_stamp = f"{kernel}:{kernel.stat().st_size}:{kernel.stat().st_mtime_ns}" if kernel.exists() else str(kernel)
    return hashlib.sha256("\n".join([boot_id, qemu_stamp, kernel_stamp]).encode()).hexdigest()[:16]


def choose(kernel: Path, *, timeout: float = DEFAULT_PROBE_TIMEOUT, use_cache: bool = True) -> AccelDecision:
    """Return the domain type for VMs booting `kernel`, probing when no cached decision applies.

    UPDATELAB_VM_ACCEL=kvm or qemu skips the probe.
    """
    forced = os.environ.get(ACCEL_ENV, "").strip().lower()
    if forced:
        if forced not in DOMAIN_TYPES:
            raise PrerequisiteError(f"invalid {ACCEL_ENV}={forced!r}: use kvm or qemu")
        return AccelDecision(forced, f"set by {ACCEL_ENV}")

    key = _cache_key(kernel)
    if use_cache:
        try:
            cached = json.loads(cache_path().read_text())
            if cached.get("key") == key and cached.get("domain_type") in DOMAIN_TYPES:
                return AccelDecision(cached["domain_type"], cached.get("reason", ""), cached=True)
        except (OSError, json.JSONDecodeError):
            pass

    results = []
    kvm_present = kvm_device_usable()
    if kvm_present:
        results.append(probe("kvm", kernel, timeout))
        log.info("KVM probe: booted=%s after %.1f s", results[-1].booted, results[-1].seconds)
    if not results or not results[-1].booted:
        results.append(probe("qemu", kernel, timeout))
        log.info("TCG probe: booted=%s after %.1f s", results[-1].booted, results[-1].seconds)
    decision = decide(results, kvm_present)
    cache_path().parent.mkdir(parents=True, exist_ok=True)
    cache_path().write_text(json.dumps({"key": key, "domain_type": decision.domain_type, "reason": decision.reason}))
    return decision
