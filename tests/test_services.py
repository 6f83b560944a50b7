"""Tests of the service-manager adapters in lab.services, replayed from recorded command outputs.

Each adapter runs against ReplayTarget, which replays the outputs stored in tests/data/services.
The README there describes the file format and which outputs came from real systems.
"""

from __future__ import annotations

import collections
import dataclasses
import pathlib
import re

import pytest

from lab.errors import CommandError, ServiceManagerError
from lab.providers.base import ExecResult, Target
from lab.services import (
    MANAGERS,
    NOT_FOUND,
    FreeBSD,
    Launchd,
    OpenRC,
    Procd,
    Runit,
    ServiceManager,
    ServiceStatus,
    Systemd,
    SysVinit,
    Upstart,
    WindowsScm,
    detect,
    manager_for_name,
    platform_type,
)
from lab.services.windows import powershell

DATA = pathlib.Path(__file__).parent / "data" / "services"

PROC_EXE_LISTING = (
    'for d in /proc/[0-9]*; do e=$(readlink "$d/exe" 2>/dev/null) && echo "${d#/proc/} $e"; done; true'
)
AGENT = "/usr/local/mesh_services/meshagent/meshagent"


@dataclasses.dataclass(frozen=True)
class Recording:
    command: str
    exit_status: int
    output: str
    source: str


def load(relative_path: str) -> Recording:
    """Read one recording: header lines, a ``---`` line, then the output byte for byte."""
    text = (DATA / relative_path).read_bytes().decode("utf-8")
    header, separator, output = text.partition("---\n")
    assert separator, f"{relative_path} has no --- line"
    fields = dict(line.split(": ", 1) for line in header.splitlines())
    return Recording(fields["command"], int(fields["exit_status"]), output, fields["source"])


class ReplayTarget(Target):
    """A Target that replays the recordings queued for each command, in order.

    The last recording queued for a command repeats. ``test -e`` and ``test -d`` succeed
    for paths in `files` and `folders` unless a recording for them is queued. Any other command fails
    the test, so an adapter cannot send a command that no recording covers.
    """

    def __init__(
        self, *recordings: Recording, files: dict[str, bytes] | None = None, folders: set[str] | None = None
    ) -> None:
        self.name = "replay"
        self.server_address = "127.0.0.1"
        self.responses: dict[str, collections.deque[Recording]] = collections.defaultdict(collections.deque)
        self.files = dict(files or {})
        self.folders = set(folders or ())
        self.commands: list[str] = []
        for recording in recordings:
            self.add(recording)

    def add(self, recording: Recording) -> None:
        self.responses[recording.command].append(recording)

    def queue_result(self, command: str, exit_status: int, output: str = "") -> None:
        self.add(Recording(command, exit_status, output, "test"))

    def _run(self, command: str, *, timeout: float) -> ExecResult:
        self.commands.append(command)
        queue = self.responses.get(command)
        if queue:
            recording = queue.popleft() if len(queue) > 1 else queue[0]
            return ExecResult(command, recording.exit_status, recording.output)
        test = re.fullmatch(r"test -([ed]) (\S+)", command)
        if test is not None:
            kind, path = test.groups()
            exists = path in self.folders if kind == "d" else (path in self.files or path in self.folders)
            return ExecResult(command, 0 if exists else 1, "")
        raise AssertionError(f"unexpected command {command!r}; recorded commands: {sorted(self.responses)}")

    def put_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self.files[path] = data

    def get_file(self, path: str) -> bytes:
        try:
            return self.files[path]
        except KeyError:
            raise FileNotFoundError(path) from None


def files_of(folder: str) -> dict[str, bytes]:
    """Load the files under DATA/FOLDER/files, keyed by their path on the target."""
    root = DATA / folder / "files"
    return {
        "/" + str(path.relative_to(root)): path.read_bytes() for path in root.rglob("*") if path.is_file()
    }


def replay(
    folder: str, *names: str, with_files: bool = True, folders: set[str] | None = None
) -> ReplayTarget:
    recordings = [load(f"{folder}/{name}") for name in names]
    files = files_of(folder) if with_files and (DATA / folder / "files").is_dir() else {}
    return ReplayTarget(*recordings, files=files, folders=folders)


# Recording files.


def test_recordings_have_known_sources():
    paths = sorted(DATA.rglob("*.txt"))
    assert len(paths) > 50
    for path in paths:
        recording = load(str(path.relative_to(DATA)))
        assert recording.source.startswith(("recorded:", "written from")), path


def test_recorded_folders_come_from_real_systems():
    for folder in ("systemd", "sysvinit", "runit"):
        for path in (DATA / folder).glob("*.txt"):
            assert load(f"{folder}/{path.name}").source.startswith("recorded:"), path


# systemd, recorded in a debian12-systemd container.


def test_systemd_status_running():
    manager = Systemd(replay("systemd", "status-running.txt"))
    status = manager.status("meshagent")
    assert status.running is True
    assert status.pid == 2186
    assert status.state == "active (running)"
    assert status.found is True
    assert "MainPID=2186" in status.raw


def test_systemd_status_stopped():
    status = Systemd(replay("systemd", "status-stopped.txt")).status("meshagent")
    assert status.running is False
    assert status.pid is None
    assert status.state == "inactive (dead)"


def test_systemd_status_not_found():
    status = Systemd(replay("systemd", "status-not-found.txt")).status("nosuchservice")
    assert status.state == NOT_FOUND
    assert status.found is False
    assert status.running is False


def test_systemd_status_without_systemd_raises():
    manager = Systemd(replay("systemd", "status-no-systemd.txt"))
    with pytest.raises(CommandError) as raised:
        manager.status("meshagent")
    assert raised.value.exit_status == 1
    assert "has not been booted with systemd" in raised.value.output


def test_systemd_main_pid_changes_on_restart():
    target = replay(
        "systemd", "status-running-after-start.txt", "restart.txt", "status-running-after-restart.txt"
    )
    manager = Systemd(target)
    before = manager.main_pid("meshagent")
    manager.restart("meshagent")
    after = manager.main_pid("meshagent")
    assert before == 2298
    assert after == 2333
    assert "systemctl restart meshagent.service" in target.commands


def test_systemd_start_unknown_unit_raises():
    manager = Systemd(replay("systemd", "start-not-found.txt"))
    with pytest.raises(CommandError) as raised:
        manager.start("nosuchservice")
    assert raised.value.exit_status == 5


def test_systemd_mask_blocks_restart():
    target = replay("systemd", "mask.txt", "status-masked-running.txt", "start-masked.txt", "unmask.txt")
    manager = Systemd(target)
    manager.disable_restart("meshagent")
    assert target.commands == ["systemctl mask meshagent.service"]

    # Masking leaves the running process alone.
    assert manager.status("meshagent").running is True

    with pytest.raises(CommandError) as raised:
        manager.start("meshagent")
    assert "is masked" in raised.value.output

    manager.restore_restart("meshagent")
    assert target.commands[-1] == "systemctl unmask meshagent.service"


def test_systemd_masked_unit_stays_down_after_kill():
    status = Systemd(replay("systemd", "status-masked-after-kill.txt")).status("meshagent")
    assert status.running is False
    assert status.pid is None
    assert status.state == "failed (failed)"


def test_systemd_service_files_prefer_lib():
    manager = Systemd(replay("systemd"))
    assert manager.service_files("meshagent") == ["/lib/systemd/system/meshagent.service"]


def test_systemd_service_files_usr_lib_only():
    target = ReplayTarget(files={"/usr/lib/systemd/system/meshagent.service": b""})
    assert Systemd(target).service_files("meshagent") == ["/usr/lib/systemd/system/meshagent.service"]


def test_systemd_service_files_missing():
    assert Systemd(ReplayTarget()).service_files("meshagent") == []


def test_systemd_agent_executable_from_unit():
    assert Systemd(replay("systemd")).agent_executable("meshagent") == AGENT


def test_systemd_agent_executable_unescapes_spaces():
    unit = b"[Service]\nExecStart=/usr/local/mesh_services/My\\x20Co/meshagent --installedByUser=0\n"
    target = ReplayTarget(files={"/lib/systemd/system/meshagent.service": unit})
    assert Systemd(target).agent_executable("meshagent") == "/usr/local/mesh_services/My Co/meshagent"


def test_systemd_agent_executable_without_unit_raises():
    with pytest.raises(ServiceManagerError) as raised:
        Systemd(ReplayTarget()).agent_executable("meshagent")
    assert raised.value.manager == "systemd"
    assert raised.value.operation == "agent_executable"


def test_systemd_agent_pids_from_proc():
    manager = Systemd(replay("systemd", "proc-exe-listing.txt"))
    assert manager.agent_pids("meshagent") == [2186]


def test_systemd_logs_show_journal():
    target = replay("systemd", "logs.txt")
    text = Systemd(target).logs("meshagent", lines=20)
    assert "meshagent.service: Main process exited, code=killed, status=9/KILL" in text
    assert target.commands == ["journalctl --no-pager --output=short-iso --lines=20 --unit=meshagent.service"]


# SysV init, recorded in a debian12-sysvinit container.


def test_sysvinit_status_running():
    status = SysVinit(replay("sysvinit", "status-running.txt")).status("meshagent")
    assert status.running is True
    assert status.pid == 1577
    assert status.state == "start/running"


def test_sysvinit_main_pid_is_wrapper():
    manager = SysVinit(replay("sysvinit", "status-running.txt"))
    ps_lines = load("sysvinit/ps-agent.txt").output.splitlines()
    wrapper = [line for line in ps_lines if "-b64exec" in line]
    child = [line for line in ps_lines if "--installedByUser" in line]
    assert wrapper[0].split()[:2] == ["1577", "1"]
    assert child[0].split()[:2] == ["1585", "1577"]
    assert manager.main_pid("meshagent") == 1577


def test_sysvinit_pidfile_matches_status():
    target = replay("sysvinit")
    assert target.get_file("/var/run/meshagent.pid").strip() == b"1577"


def test_sysvinit_status_stopped():
    status = SysVinit(replay("sysvinit", "status-stopped.txt")).status("meshagent")
    assert status.running is False
    assert status.pid is None
    assert status.state == "stop/waiting"


def test_sysvinit_status_not_found():
    status = SysVinit(replay("sysvinit", "status-not-found.txt")).status("nosuchservice")
    assert status.state == NOT_FOUND
    assert status.running is False


def test_sysvinit_agent_pids_change_on_restart():
    target = replay("sysvinit", "proc-exe-listing.txt", "restart.txt", "proc-exe-listing-after-restart.txt")
    manager = SysVinit(target)
    before = manager.agent_pids("meshagent")
    manager.restart("meshagent")
    after = manager.agent_pids("meshagent")
    assert before == [1577, 1585]
    assert after == [1794, 1799]
    assert set(before).isdisjoint(after)


def test_sysvinit_agent_pids_count_deleted_binary():
    target = ReplayTarget(files=files_of("sysvinit"))
    target.queue_result(
        PROC_EXE_LISTING, 0, f"1 /usr/sbin/init\n700 {AGENT} (deleted)\n701 {AGENT}\n702 /usr/bin/dash\n"
    )
    assert SysVinit(target).agent_pids("meshagent") == [700, 701]


def test_sysvinit_agent_pids_explicit_executable():
    target = replay("sysvinit", "proc-exe-listing.txt", with_files=False)
    assert SysVinit(target).agent_pids("meshagent", executable="/usr/sbin/init") == [1]


def test_sysvinit_agent_executable_from_script():
    assert SysVinit(replay("sysvinit")).agent_executable("meshagent") == AGENT


def test_sysvinit_logs_empty_file():
    target = replay("sysvinit", "logs.txt")
    assert SysVinit(target).logs("meshagent") == ""
    assert target.commands == ["tail -n 100 /var/log/meshagent.log"]


def test_sysvinit_disable_restart_moves_script():
    target = replay(
        "sysvinit",
        "disable-restart-0.txt",
        "disable-restart-1.txt",
        "status-disabled.txt",
        "restart-disabled.txt",
    )
    manager = SysVinit(target)
    manager.disable_restart("meshagent")
    assert (
        target.commands[-1]
        == "mkdir -p /var/tmp/updatelab-disabled && mv /etc/init.d/meshagent /var/tmp/updatelab-disabled/meshagent"
    )
    assert manager.status("meshagent").state == NOT_FOUND
    with pytest.raises(CommandError) as raised:
        manager.restart("meshagent")
    assert raised.value.exit_status == 1
    assert "unrecognized service" in raised.value.output


def test_sysvinit_restore_restart_moves_script_back():
    target = replay("sysvinit", "restore-restart-0.txt", "restore-restart-1.txt")
    SysVinit(target).restore_restart("meshagent")
    assert target.commands == [
        "test -e /var/tmp/updatelab-disabled/meshagent",
        "mv /var/tmp/updatelab-disabled/meshagent /etc/init.d/meshagent",
    ]


def test_sysvinit_disable_restart_missing_script_raises():
    with pytest.raises(ServiceManagerError) as raised:
        SysVinit(ReplayTarget()).disable_restart("meshagent")
    assert raised.value.manager == "sysvinit"
    assert raised.value.operation == "disable_restart"


def test_sysvinit_restore_without_disable_raises():
    with pytest.raises(ServiceManagerError) as raised:
        SysVinit(ReplayTarget()).restore_restart("meshagent")
    assert raised.value.operation == "restore_restart"


def test_sysvinit_lsb_script_status():
    # A Debian LSB script, not one written by the MeshAgent installer. Exit 0 means running, and
    # the PID then comes from the pidfile. Exit 3 means stopped.
    target = ReplayTarget(files={"/var/run/cron.pid": b"321\n"})
    target.queue_result("service cron status", 0, "cron is running.\n")
    target.queue_result("service cron status", 3, "cron is not running ... failed!\n")
    manager = SysVinit(target)
    running = manager.status("cron")
    stopped = manager.status("cron")
    assert running.running is True
    assert running.pid == 321
    assert running.state == "cron is running."
    assert stopped.running is False
    assert stopped.pid is None


def test_sysvinit_service_files():
    assert SysVinit(replay("sysvinit")).service_files("meshagent") == ["/etc/init.d/meshagent"]
    assert SysVinit(ReplayTarget()).service_files("meshagent") == []


# OpenRC, written from documentation.


def test_openrc_status_started_uses_supervisor_pid():
    target = replay("openrc", "status-started.txt", "proc-exe-listing.txt")
    manager = OpenRC(target)
    status = manager.status("meshagent")
    assert status.running is True
    assert status.state == "started"
    assert status.pid == 2040
    assert manager.agent_pids("meshagent") == [2041]


@pytest.mark.parametrize(
    ("recording", "state"), [("status-stopped.txt", "stopped"), ("status-crashed.txt", "crashed")]
)
def test_openrc_status_not_running(recording, state):
    status = OpenRC(replay("openrc", recording)).status("meshagent")
    assert status.running is False
    assert status.pid is None
    assert status.state == state


def test_openrc_state_from_exit_status():
    target = ReplayTarget()
    target.queue_result("rc-service meshagent status", 8, "")
    assert OpenRC(target).status("meshagent").state == "starting"


def test_openrc_status_not_found():
    status = OpenRC(replay("openrc", "status-not-found.txt")).status("nosuchservice")
    assert status.state == NOT_FOUND


def test_openrc_agent_executable_from_command():
    assert OpenRC(replay("openrc")).agent_executable("meshagent") == AGENT


def test_openrc_restart_runs_rc_service():
    target = replay("openrc", "restart.txt")
    OpenRC(target).restart("meshagent")
    assert target.commands == ["rc-service meshagent restart"]


def test_openrc_disable_restart_moves_script():
    target = replay("openrc")
    target.queue_result(
        "mkdir -p /var/tmp/updatelab-disabled && mv /etc/init.d/meshagent /var/tmp/updatelab-disabled/meshagent",
        0,
    )
    OpenRC(target).disable_restart("meshagent")
    assert target.commands[-1].endswith("mv /etc/init.d/meshagent /var/tmp/updatelab-disabled/meshagent")


# runit, recorded with runit 2.1.2 from Debian 12.


def test_runit_status_running():
    status = Runit(replay("runit", "status-running.txt")).status("meshagent")
    assert status.running is True
    assert status.pid == 12218
    assert status.state == "run"


def test_runit_status_down():
    status = Runit(replay("runit", "status-down.txt")).status("meshagent")
    assert status.running is False
    assert status.pid is None
    assert status.state == "down"


def test_runit_status_not_found():
    status = Runit(replay("runit", "status-not-found.txt")).status("nosuchsvc")
    assert status.state == NOT_FOUND


def test_runit_status_without_runsv():
    status = Runit(replay("runit", "status-no-supervisor.txt")).status("meshagent")
    assert status.running is False
    assert status.found is True
    assert status.state == "fail: runsv not running"


def test_runit_status_with_log_service():
    target = ReplayTarget()
    target.queue_result("sv status meshagent", 0, "run: meshagent: (pid 812) 40s; run: log: (pid 811) 40s\n")
    status = Runit(target).status("meshagent")
    assert status.running is True
    assert status.pid == 812


def test_runit_start_stop_restart():
    target = replay("runit", "start.txt", "stop.txt", "restart.txt")
    manager = Runit(target)
    manager.start("meshagent")
    manager.stop("meshagent")
    manager.restart("meshagent")
    assert target.commands == ["sv start meshagent", "sv stop meshagent", "sv restart meshagent"]


@pytest.mark.parametrize("operation", ["logs", "agent_executable", "disable_restart", "restore_restart"])
def test_runit_unsupported_operations_raise(operation):
    manager = Runit(ReplayTarget())
    with pytest.raises(ServiceManagerError) as raised:
        getattr(manager, operation)("meshagent")
    assert raised.value.manager == "runit"
    assert raised.value.operation == operation
    assert str(raised.value).startswith(f"runit: {operation} failed:")


def test_runit_has_no_service_files():
    assert Runit(ReplayTarget()).service_files("meshagent") == []


# Upstart, written from documentation.


def test_upstart_status_running():
    status = Upstart(replay("upstart", "status-running.txt")).status("meshagent")
    assert status.running is True
    assert status.pid == 1234
    assert status.state == "start/running"


def test_upstart_status_stopped():
    status = Upstart(replay("upstart", "status-stopped.txt")).status("meshagent")
    assert status.running is False
    assert status.pid is None
    assert status.state == "stop/waiting"


def test_upstart_status_post_start():
    status = Upstart(replay("upstart", "status-post-start.txt")).status("meshagent")
    assert status.running is False
    assert status.pid == 1240
    assert status.state == "start/post-start"


def test_upstart_status_not_found():
    assert Upstart(replay("upstart", "status-not-found.txt")).status("nosuchservice").state == NOT_FOUND


def test_upstart_restart_stopped_job_raises():
    with pytest.raises(CommandError):
        Upstart(replay("upstart", "restart-stopped.txt")).restart("meshagent")


def test_upstart_agent_executable_from_exec():
    manager = Upstart(replay("upstart"))
    assert manager.agent_executable("meshagent") == AGENT
    assert manager.service_files("meshagent") == ["/etc/init/meshagent.conf"]


def test_upstart_disable_restart_raises():
    with pytest.raises(ServiceManagerError) as raised:
        Upstart(ReplayTarget()).disable_restart("meshagent")
    assert raised.value.manager == "upstart"
    assert raised.value.operation == "disable_restart"


# procd, written from documentation.


def test_procd_status_running_reads_ubus_pid():
    target = replay("procd", "status-running.txt", "ubus-list-running.txt")
    status = Procd(target).status("meshagent")
    assert status.running is True
    assert status.pid == 2412
    assert status.state == "running"
    assert target.commands[-1] == 'ubus call service list \'{"name": "meshagent"}\''


@pytest.mark.parametrize(
    ("recording", "state"), [("status-inactive.txt", "inactive"), ("status-not-running.txt", "not running")]
)
def test_procd_status_not_running(recording, state):
    status = Procd(replay("procd", recording)).status("meshagent")
    assert status.running is False
    assert status.pid is None
    assert status.state == state


def test_procd_status_not_found():
    assert Procd(replay("procd", "status-not-found.txt")).status("nosuchservice").state == NOT_FOUND


def test_procd_service_files_include_start_script():
    files = Procd(replay("procd")).service_files("meshagent")
    assert files == ["/etc/init.d/meshagent", "/usr/local/mesh_services/meshagent/meshagent.sh"]


def test_procd_agent_executable_from_start_script():
    assert Procd(replay("procd")).agent_executable("meshagent") == AGENT


def test_procd_disable_restart_raises():
    with pytest.raises(ServiceManagerError) as raised:
        Procd(ReplayTarget()).disable_restart("meshagent")
    assert raised.value.manager == "procd"


# launchd, written from documentation.


def test_launchd_status_running():
    status = Launchd(replay("launchd", "print-running.txt")).status("meshagent")
    assert status.running is True
    assert status.pid == 512
    assert status.state == "running"


def test_launchd_status_not_running():
    status = Launchd(replay("launchd", "print-not-running.txt")).status("meshagent")
    assert status.running is False
    assert status.pid is None
    assert status.state == "not running"


def test_launchd_status_not_found():
    assert Launchd(replay("launchd", "print-not-found.txt")).status("nosuchservice").state == NOT_FOUND


def test_launchd_status_old_macos_uses_list():
    status = Launchd(replay("launchd", "print-old-macos.txt", "list-running.txt")).status("meshagent")
    assert status.running is True
    assert status.pid == 388


def test_launchd_agent_pids_from_ps():
    manager = Launchd(replay("launchd", "ps-comm.txt"))
    assert manager.agent_executable("meshagent") == AGENT
    assert manager.agent_pids("meshagent") == [512, 530]


def test_launchd_service_files():
    assert Launchd(replay("launchd")).service_files("meshagent") == ["/Library/LaunchDaemons/meshagent.plist"]


def test_launchd_disable_restart_raises():
    with pytest.raises(ServiceManagerError) as raised:
        Launchd(ReplayTarget()).disable_restart("meshagent")
    assert raised.value.manager == "launchd"


# FreeBSD rc.d, written from documentation.


def test_freebsd_status_running_is_daemon_pid():
    target = replay("freebsd", "status-running.txt", "ps-args.txt")
    manager = FreeBSD(target)
    assert manager.main_pid("meshagent") == 1021
    assert manager.agent_pids("meshagent") == [1022]


def test_freebsd_status_stopped():
    status = FreeBSD(replay("freebsd", "status-stopped.txt")).status("meshagent")
    assert status.running is False
    assert status.pid is None


def test_freebsd_status_not_found():
    assert FreeBSD(replay("freebsd", "status-not-found.txt")).status("nosuchservice").state == NOT_FOUND


def test_freebsd_agent_executable_from_daemon_args():
    manager = FreeBSD(replay("freebsd"))
    assert manager.agent_executable("meshagent") == AGENT
    assert manager.service_files("meshagent") == ["/usr/local/etc/rc.d/meshagent"]


# Windows SCM, written from documentation.


def test_windows_status_running():
    status = WindowsScm(replay("windows", "queryex-running.txt")).status("Mesh Agent")
    assert status.running is True
    assert status.pid == 4312
    assert status.state == "RUNNING"


def test_windows_status_stopped():
    status = WindowsScm(replay("windows", "queryex-stopped.txt")).status("Mesh Agent")
    assert status.running is False
    assert status.pid is None
    assert status.state == "STOPPED"


def test_windows_status_not_found():
    assert WindowsScm(replay("windows", "queryex-not-found.txt")).status("No Such Service").state == NOT_FOUND


def test_windows_agent_executable_from_qc():
    assert (
        WindowsScm(replay("windows", "qc.txt")).agent_executable("Mesh Agent")
        == r"C:\Program Files\Mesh Agent\MeshAgent.exe"
    )


def test_windows_agent_pids_ignore_case():
    target = replay("windows", "qc.txt")
    listing_command = powershell(
        "Get-CimInstance Win32_Process | ForEach-Object { '{0} {1}' -f $_.ProcessId, $_.ExecutablePath }"
    )
    target.queue_result(
        listing_command,
        0,
        "4 \r\n4312 C:\\Program Files\\Mesh Agent\\meshagent.exe\r\n5000 C:\\Windows\\System32\\svchost.exe\r\n",
    )
    assert WindowsScm(target).agent_pids("Mesh Agent") == [4312]


@pytest.mark.parametrize("operation", ["service_files", "disable_restart"])
def test_windows_unsupported_operations_raise(operation):
    with pytest.raises(ServiceManagerError) as raised:
        getattr(WindowsScm(ReplayTarget()), operation)("Mesh Agent")
    assert raised.value.manager == "windows"
    assert raised.value.operation == operation


def test_windows_restart_uses_powershell():
    target = ReplayTarget()
    command = powershell("Restart-Service -Force -Name 'Mesh Agent'")
    target.queue_result(command, 0)
    WindowsScm(target).restart("Mesh Agent")
    assert target.commands == [command]
    assert command.startswith('powershell -NoProfile -NonInteractive -Command "')


def test_powershell_rejects_double_quotes():
    with pytest.raises(ValueError):
        powershell('Write-Output "x"')


# Detection.


def proc_status_named(name: str) -> str:
    """Return the recorded /proc/1/status of the sysvinit container with its Name: field replaced."""
    text = load("sysvinit/proc-1-status.txt").output
    return re.sub(r"^Name:\t.*$", f"Name:\t{name}", text, count=1, flags=re.MULTILINE)


def linux_target(
    process_name: str, *, files: set[str] = frozenset(), folders: set[str] = frozenset()
) -> ReplayTarget:
    target = ReplayTarget(files={path: b"" for path in files}, folders=set(folders))
    target.queue_result("uname -s", 0, "Linux\n")
    target.queue_result("cat /proc/1/status", 0, proc_status_named(process_name))
    return target


def test_detect_recorded_sysvinit():
    target = replay("sysvinit", "proc-1-status.txt", "test-etc-init.txt", "test-openrc-run.txt")
    target.queue_result("uname -s", 0, "Linux\n")
    assert type(detect(target)) is SysVinit


def test_detect_recorded_systemd():
    target = replay("systemd", "proc-1-status.txt")
    target.queue_result("uname -s", 0, "Linux\n")
    assert type(detect(target)) is Systemd


@pytest.mark.parametrize(
    ("process_name", "files", "folders", "expected"),
    [
        ("systemd", set(), set(), Systemd),
        ("init", set(), set(), SysVinit),
        ("init", set(), {"/etc/init"}, Upstart),
        ("init", {"/sbin/openrc-run"}, set(), OpenRC),
        ("init", {"/sbin/openrc-run"}, {"/etc/init"}, Upstart),
        ("busybox", {"/sbin/openrc-run"}, set(), OpenRC),
        ("runit", set(), set(), Runit),
        ("runit-init", set(), set(), Runit),
        ("procd", set(), set(), Procd),
    ],
)
def test_detect_linux_pid1_variants(process_name, files, folders, expected):
    manager = detect(linux_target(process_name, files=files, folders=folders))
    assert type(manager) is expected


def test_detect_unknown_pid1_raises():
    with pytest.raises(ServiceManagerError) as raised:
        detect(linux_target("tini"))
    assert raised.value.operation == "detect"
    assert "'tini'" in str(raised.value)


def test_detect_freebsd():
    assert type(detect(replay("freebsd", "uname.txt"))) is FreeBSD


def test_detect_darwin():
    assert type(detect(replay("launchd", "uname.txt"))) is Launchd


def test_detect_windows():
    assert type(detect(replay("windows", "uname.txt", "ver.txt"))) is WindowsScm


def test_detect_windows_with_git_uname():
    target = ReplayTarget()
    target.queue_result("uname -s", 0, "MINGW64_NT-10.0-20348\n")
    target.queue_result("cmd /c ver", 0, "\r\nMicrosoft Windows [Version 10.0.20348.2340]\r\n")
    assert type(detect(target)) is WindowsScm


def test_detect_no_uname_no_windows_raises():
    target = ReplayTarget()
    target.queue_result("uname -s", 127, "sh: uname: not found\n")
    target.queue_result("cmd /c ver", 127, "sh: cmd: not found\n")
    with pytest.raises(ServiceManagerError):
        detect(target)


def test_detect_unsupported_kernel_raises():
    target = ReplayTarget()
    target.queue_result("uname -s", 0, "SunOS\n")
    with pytest.raises(ServiceManagerError) as raised:
        detect(target)
    assert "SunOS" in str(raised.value)


# Platform types and the registry of adapters.


@pytest.mark.parametrize(
    ("manager_class", "expected"),
    [
        (Systemd, 1),
        (SysVinit, 2),
        (OpenRC, 2),
        (Launchd, 3),
        (Upstart, 4),
        (FreeBSD, 5),
        (Procd, 7),
        (WindowsScm, 10),
        (Runit, 0),
    ],
)
def test_platform_type_matches_agent(manager_class, expected):
    assert platform_type(manager_class) == expected
    assert platform_type(manager_class(ReplayTarget())) == expected


def test_managers_registry_covers_adapters():
    assert set(MANAGERS) == {
        "systemd",
        "sysvinit",
        "openrc",
        "upstart",
        "runit",
        "procd",
        "launchd",
        "freebsd",
        "windows",
    }
    for name, manager_class in MANAGERS.items():
        assert issubclass(manager_class, ServiceManager)
        assert manager_class.name == name


def test_manager_for_name():
    assert type(manager_for_name("openrc", ReplayTarget())) is OpenRC
    with pytest.raises(ServiceManagerError):
        manager_for_name("s6", ReplayTarget())


def test_service_status_is_frozen():
    status = ServiceStatus(running=True, pid=1, state="run", raw="")
    with pytest.raises(dataclasses.FrozenInstanceError):
        status.pid = 2  # type: ignore[misc]
