"""Small wrappers around ``virsh`` for the objects that VM runs create in libvirt.

Vagrant creates and removes the domains, volumes and networks of a run. These functions
find and remove what an interrupted run left, by name: every such object's name starts with
``updatelab-<run id>``. They talk to the system connection (``qemu:///system``), which is
the one vagrant-libvirt uses by default.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ElementTree
import shutil
import subprocess

from lab.errors import PrerequisiteError, ProviderError

log = logging.getLogger(__name__)

URI = "qemu:///system"
ENSURE_HINT = "run `sh scripts/ensure-vagrant.sh` (as root) to install and start it"


def virsh(*arguments: str, check: bool = True, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """Run ``virsh -c qemu:///system ARGUMENTS`` and return the finished process.

    Raises PrerequisiteError when virsh is missing or libvirtd does not respond, and
    ProviderError when `check` is true and virsh exits non-zero.
    """
    if shutil.which("virsh") is None:
        raise PrerequisiteError(f"virsh (libvirt-clients) is missing; {ENSURE_HINT}")
    command = ["virsh", "-c", URI, *arguments]
    try:
        result = subprocess.run(command, capture_output=True, text=True, errors="replace", timeout=timeout)
    except subprocess.TimeoutExpired as error:
        raise ProviderError(f"{' '.join(command)} timed out after {timeout:.0f} s") from error
    if result.returncode != 0 and "failed to connect to the hypervisor" in result.stderr:
        raise PrerequisiteError(f"libvirtd is not reachable at {URI} ({result.stderr.strip().splitlines()[-1]}); {ENSURE_HINT}")
    if check and result.returncode != 0:
        raise ProviderError(f"{' '.join(command)} exited with status {result.returncode}: {result.stderr.strip()}")
    return result


def _names(*arguments: str) -> list[str]:
    return [line.strip() for line in virsh(*arguments).stdout.splitlines() if line.strip()]


def domains_with_prefix(prefix: str) -> list[str]:
    return [name for name in _names("list", "--all", "--name") if name.startswith(prefix)]


def networks_with_prefix(prefix: str) -> list[str]:
    return [name for name in _names("net-list", "--all", "--name") if name.startswith(prefix)]


def volumes_with_prefix(prefix: str) -> list[tuple[str, str]]:
    """Return (pool, volume) pairs of every volume in an active pool whose name starts with `prefix`."""
    found = []
    for pool in _names("pool-list", "--name"):
        result = virsh("vol-list", "--pool", pool, check=False)
        for line in result.stdout.splitlines()[2:]:
            fields = line.split()
            if fields and fields[0].startswith(prefix):
                found.append((pool, fields[0]))
    return found


def remove_domain(name: str) -> None:
    """Stop and undefine a domain with its storage. A domain that is already gone is not an error."""
    virsh("destroy", name, check=False)
    result = virsh("undefine", name, "--remove-all-storage", "--nvram", check=False)
    if result.returncode != 0 and "--nvram" in result.stderr:
        result = virsh("undefine", name, "--remove-all-storage", check=False)
    if result.returncode != 0 and name in domains_with_prefix(name):
        raise ProviderError(f"cannot undefine libvirt domain {name}: {result.stderr.strip()}")


def remove_network(name: str) -> None:
    virsh("net-destroy", name, check=False)
    result = virsh("net-undefine", name, check=False)
    if result.returncode != 0 and name in networks_with_prefix(name):
        raise ProviderError(f"cannot undefine libvirt network {name}: {result.stderr.strip()}")


def delete_volume(pool: str, volume: str) -> None:
    result = virsh("vol-delete", "--pool", pool, volume, check=False)
    if result.returncode != 0 and (pool, volume) in volumes_with_prefix(volume):
        raise ProviderError(f"cannot delete libvirt volume {pool}/{volume}: {result.stderr.strip()}")


def remove_objects(prefix: str) -> list[str]:
    """Remove every domain, volume and network whose name starts with `prefix`, and return what was removed."""
    removed = []
    for domain in domains_with_prefix(prefix):
        remove_domain(domain)
        removed.append(f"domain {domain}")
    for pool, volume in volumes_with_prefix(prefix):
        delete_volume(pool, volume)
        removed.append(f"volume {pool}/{volume}")
    for network in networks_with_prefix(prefix):
        remove_network(network)
        removed.append(f"network {network}")
    if removed:
        log.info("removed %s", ", ".join(removed))
    return removed


def network_subnets() -> list[str]:
    """Return the IPv4 subnets (``address/netmask``) of every defined libvirt network."""
    subnets = []
    for name in _names("net-list", "--all", "--name"):
        text = virsh("net-dumpxml", name, check=False).stdout
        try:
            tree = ElementTree.fromstring(text)
        except ElementTree.ParseError:
            continue
        for ip in tree.findall("ip"):
            if ip.get("family", "ipv4") == "ipv4" and ip.get("address"):
                netmask = ip.get("netmask") or ip.get("prefix") or "24"
                subnets.append(f"{ip.get('address')}/{netmask}")
    return subnets
