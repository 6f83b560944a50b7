"""Choose the service-manager adapter that applies to a target.

The rules follow getServiceType() in MeshAgent's modules/service-manager.js, so the lab picks
the manager that the agent itself will use, with two additions. OpenRC is distinguished from SysV
init, which the agent treats alike as ``init``, and runit is recognised, which the agent calls ``unknown``.
"""

from __future__ import annotations

from lab.errors import ServiceManagerError
from lab.providers.base import Target
from lab.services.base import ServiceManager
from lab.services.freebsd import FreeBSD
from lab.services.initd import OpenRC, SysVinit
from lab.services.launchd import Launchd
from lab.services.procd import Procd
from lab.services.runit import Runit
from lab.services.systemd import Systemd
from lab.services.upstart import Upstart
from lab.services.windows import WindowsScm

#: Every adapter class by its `ServiceManager.name`.
MANAGERS: dict[str, type[ServiceManager]] = {
    manager.name: manager
    for manager in (Systemd, SysVinit, OpenRC, Upstart, Runit, Procd, Launchd, FreeBSD, WindowsScm)
}

# `uname -s` prefixes of POSIX layers on Windows (Git for Windows, MSYS2, Cygwin).
_WINDOWS_UNAME_PREFIXES = ("MINGW", "MSYS", "CYGWIN")


def detect(target: Target) -> ServiceManager:
    """Return the adapter for the service manager that runs on `target`.

    Raises ServiceManagerError when the target runs an operating system or a PID 1 that no
    adapter covers. The message names what was found.
    """
    uname = target.run(["uname", "-s"], check=False)
    system = uname.output.strip()
    if not uname.ok or system.upper().startswith(_WINDOWS_UNAME_PREFIXES):
        # Windows OpenSSH runs commands in cmd.exe, which has no uname.
        version = target.run("cmd /c ver", check=False)
        if version.ok and "Windows" in version.output:
            return WindowsScm(target)
        raise ServiceManagerError(
            "unknown",
            "detect",
            f"uname -s failed ({uname.output.strip()!r}) and 'cmd /c ver' did not report Windows"
            f" ({version.output.strip()!r})",
        )

    if system == "FreeBSD":
        return FreeBSD(target)
    if system == "Darwin":
        return Launchd(target)
    if system != "Linux":
        raise ServiceManagerError(
            "unknown",
            "detect",
            f"uname -s printed {system!r}. Supported systems are Linux, FreeBSD, Darwin and Windows.",
        )
    return _detect_linux(target)


def _detect_linux(target: Target) -> ServiceManager:
    # /proc files report a size of 0, so they are read with cat. Copying them with
    # get_file through a container archive would return them empty.
    process_name = parse_process_name(target.run(["cat", "/proc/1/status"]).output)
    if process_name == "busybox":
        # NOTE: BusyBox init started as "busybox init" has this name. The agent then reads PID 1's
        # arguments instead, and this adapter choice assumes the init applet.
        process_name = "init"

    if process_name == "systemd":
        return Systemd(target)
    if process_name == "init":
        # The agent checks for /etc/init before anything else, so an init system with that
        # folder counts as Upstart even when OpenRC is installed too.
        if target.run(["test", "-d", "/etc/init"], check=False).ok:
            return Upstart(target)
        if target.file_exists("/sbin/openrc-run"):
            return OpenRC(target)
        return SysVinit(target)
    if process_name in ("runit", "runit-init"):
        return Runit(target)
    if process_name == "procd":
        return Procd(target)
    raise ServiceManagerError(
        "unknown",
        "detect",
        f"PID 1 is {process_name!r}, which is none of systemd, init, busybox, runit, runit-init or procd."
        " Start the target with its init system as PID 1.",
    )


def parse_process_name(status_text: str) -> str:
    """Return the ``Name:`` field of a /proc/PID/status file."""
    for line in status_text.splitlines():
        key, separator, value = line.partition(":")
        if separator and key == "Name":
            return value.strip()
    raise ServiceManagerError(
        "unknown",
        "detect",
        f"/proc/1/status has no Name: line, so PID 1 is unknown. Check that /proc is mounted: {status_text[:200]!r}",
    )


def platform_type(manager: ServiceManager | type[ServiceManager]) -> int:
    """Return the platformType number that the agent logs as ``PLATFORM_TYPE: n`` under `manager`.

    The values are MeshAgent_Posix_PlatformTypes in meshcore/agentcore.h: 1 systemd, 2 init.d
    (SysV init and OpenRC), 3 launchd, 4 Upstart, 5 BSD, 7 procd, 10 Windows and 0 unknown,
    which covers runit.
    """
    return manager.platform_type


def manager_for_name(name: str, target: Target) -> ServiceManager:
    """Build the adapter called `name` (a key of MANAGERS) for `target`, skipping detection."""
    try:
        manager_class = MANAGERS[name]
    except KeyError:
        raise ServiceManagerError(
            name, "select", f"unknown service manager. Expected one of {', '.join(sorted(MANAGERS))}"
        ) from None
    return manager_class(target)
