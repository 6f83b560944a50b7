"""Service-manager adapters: one class per init system, and `detect` to pick one for a target.

Example::

    manager = detect(target)
    before = manager.agent_pids("meshagent")
    manager.restart("meshagent")
    assert manager.status("meshagent").running
"""

from lab.services.base import DEFAULT_LOG_LINES, NOT_FOUND, ServiceManager, ServiceStatus
from lab.services.detect import MANAGERS, detect, manager_for_name, platform_type
from lab.services.freebsd import FreeBSD
from lab.services.initd import OpenRC, SysVinit
from lab.services.launchd import Launchd
from lab.services.procd import Procd
from lab.services.runit import Runit
from lab.services.systemd import Systemd
from lab.services.upstart import Upstart
from lab.services.windows import WindowsScm

__all__ = [
    "DEFAULT_LOG_LINES",
    "MANAGERS",
    "NOT_FOUND",
    "FreeBSD",
    "Launchd",
    "OpenRC",
    "Procd",
    "Runit",
    "ServiceManager",
    "ServiceStatus",
    "SysVinit",
    "Systemd",
    "Upstart",
    "WindowsScm",
    "detect",
    "manager_for_name",
    "platform_type",
]
