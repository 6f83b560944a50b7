"""Unit tests of the VM provider's logic that need no VM: box definitions, box files, the
acceleration decision, Vagrant settings, SSH config parsing and cleanup by name."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
from pathlib import Path

import pytest

from lab import boxes
from lab.engine import vm_run
from lab.errors import ConfigError, PrerequisiteError
from lab.providers import accel, libvirt_util
from lab.providers import vagrant as vagrant_provider

REPO = Path(__file__).resolve().parents[1]


# Box definitions.


def test_every_box_definition_loads():
    names = boxes.known_targets()
    assert {"debian12-vm", "freebsd13-rcd", "macos-launchd", "windows-scm", "ubuntu14.04-upstart"} <= set(names)
    for name in names:
        definition = boxes.load_definition(name)
        assert definition.add.startswith(("vagrant box add", "updatelab boxes build"))
        assert definition.service_manager in ("systemd", "freebsd", "launchd", "windows", "upstart")


def test_box_add_commands_name_the_box():
    for name in boxes.known_targets():
        definition = boxes.load_definition(name)
        if definition.source == "registry":
            assert "--provider libvirt" in definition.add
            assert definition.box in definition.add


def test_unknown_box_target_lists_known():
    with pytest.raises(ConfigError, match="known VM targets: .*debian12-vm"):
        boxes.load_definition("nosuchvm")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"source": "ftp"}, "invalid source"),
        ({"guest": "plan9"}, "invalid guest"),
        ({"memory_mib": 0}, "positive whole number"),
        ({"packages": "sshd"}, "list of package names"),
        ({"colour": "blue"}, "unknown keys colour"),
        ({"box": ""}, "missing or empty string 'box'"),
        ({"suite": ""}, "needs a Debian 'suite'"),
    ],
)
def test_invalid_box_definition_rejected(change, message):
    data = json.loads((REPO / "boxes/debian12-vm/box.json").read_text())
    data.update(change)
    with pytest.raises(ConfigError, match=message):
        boxes.parse_definition("debian12-vm", REPO / "boxes/debian12-vm", data, Path("box.json"))


def test_missing_box_names_add_command(tmp_path, monkeypatch):
    monkeypatch.setenv("VAGRANT_HOME", str(tmp_path))
    status = boxes.box_status(boxes.load_definition("freebsd13-rcd"))
    assert status.present is False
    assert "box generic/freebsd13 for freebsd13-rcd is not added" in status.problem
    assert "`vagrant box add --provider libvirt generic/freebsd13`" in status.problem
    with pytest.raises(PrerequisiteError, match="updatelab boxes build debian12-vm"):
        boxes.require_box(boxes.load_definition("debian12-vm"))


def test_added_box_without_build_info_needs_rebuild(tmp_path, monkeypatch):
    monkeypatch.setenv("VAGRANT_HOME", str(tmp_path))
    folder = tmp_path / "boxes" / "updatelab-VAGRANTSLASH-debian12-vm" / "0" / "libvirt"
    folder.mkdir(parents=True)
    (folder / "metadata.json").write_text(json.dumps(boxes.box_metadata(4)))
    status = boxes.box_status(boxes.load_definition("debian12-vm"))
    assert status.present is False
    assert "--rebuild" in status.problem


def test_added_box_dir_picks_newest_version(tmp_path, monkeypatch):
    monkeypatch.setenv("VAGRANT_HOME", str(tmp_path))
    for version in ("0", "1.2.0", "1.10.0"):
        folder = tmp_path / "boxes" / "generic-VAGRANTSLASH-freebsd13" / version / "libvirt"
        folder.mkdir(parents=True)
        (folder / "metadata.json").write_text("{}")
    assert boxes.added_box_dir("generic/freebsd13").parent.name == "1.10.0"


# Box files.


def test_box_metadata_is_libvirt_qcow2():
    assert boxes.box_metadata(3) == {"provider": "libvirt", "format": "qcow2", "virtual_size": 3}


def test_box_vagrantfile_boots_kernel_directly():
    definition = boxes.load_definition("debian12-vm")
    files = boxes.built_box_files(definition, "abc")
    text = boxes.box_vagrantfile(definition, files)
    assert f'libvirt.kernel = "{boxes.KERNEL_DIR}/updatelab-debian12-vm-abc-vmlinuz"' in text
    assert 'libvirt.cmd_line = "root=/dev/vda rw console=ttyS0' in text
    assert 'config.ssh.username = "root"' in text
    assert 'config.ssh.sudo_command = "%c"' in text


def test_build_key_changes_with_rootfs():
    definition = boxes.load_definition("debian12-vm")
    assert boxes.build_key(definition, "a") != boxes.build_key(definition, "b")
    assert boxes.build_key(definition, "a") == boxes.build_key(definition, "a")


def test_pool_volume_prefix_matches_vagrant_libvirt():
    assert boxes.pool_volume_prefix("updatelab/debian12-vm") == "updatelab-VAGRANTSLASH-debian12-vm_vagrant_box_image_"


def _fake_rootfs(root: Path) -> None:
    for path in ("etc/ssh", "lib/systemd/system", "var/lib/dbus", "root"):
        (root / path).mkdir(parents=True)
    (root / "lib/systemd/system/systemd-networkd.service").write_text("")
    (root / "lib/systemd/system/ssh.service").write_text("")
    (root / "etc/ssh/ssh_host_ed25519_key.pub").write_text("ssh-ed25519 AAAAC3Nza host\n")
    (root / "etc/machine-id").write_text("0123456789abcdef\n")
    (root / "var/lib/dbus/machine-id").write_text("0123456789abcdef\n")


def test_configure_rootfs_writes_boot_files(tmp_path):
    _fake_rootfs(tmp_path)
    host_key = boxes.configure_rootfs(tmp_path, "debian12-vm", "ssh-ed25519 AAAAkey lab\n", "root")
    assert host_key == "ssh-ed25519 AAAAC3Nza host"
    assert (tmp_path / "etc/fstab").read_text().startswith("/dev/vda / ext4")
    assert (tmp_path / "root/.ssh/authorized_keys").read_text() == "ssh-ed25519 AAAAkey lab\n"
    assert oct((tmp_path / "root/.ssh/authorized_keys").stat().st_mode & 0o777) == "0o600"
    assert (tmp_path / "etc/machine-id").read_text() == ""
    assert not (tmp_path / "var/lib/dbus/machine-id").exists()
    network = (tmp_path / "etc/systemd/network/10-dhcp.network").read_text()
    assert "DHCP=ipv4" in network
    assert "UseDNS=no" in network
    wants = tmp_path / "etc/systemd/system/multi-user.target.wants"
    assert os.readlink(wants / "ssh.service") == "/lib/systemd/system/ssh.service"
    assert os.readlink(wants / "systemd-networkd.service") == "/lib/systemd/system/systemd-networkd.service"


def test_configure_rootfs_without_sshd_fails(tmp_path):
    _fake_rootfs(tmp_path)
    (tmp_path / "lib/systemd/system/ssh.service").unlink()
    with pytest.raises(boxes.ImageBuildError, match="ssh.service is missing"):
        boxes.configure_rootfs(tmp_path, "debian12-vm", "key", "root")


def test_build_rejects_registry_box():
    with pytest.raises(ConfigError, match="vagrant box add --provider libvirt generic/freebsd13"):
        boxes.build("freebsd13-rcd")


# Acceleration decision.


def _probe(domain_type, booted, seconds=1.0, tail=""):
    return accel.ProbeResult(domain_type, booted, seconds, tail)


def test_accel_prefers_booting_kvm():
    decision = accel.decide([_probe("kvm", True, 0.4)], kvm_present=True)
    assert decision.domain_type == "kvm"
    assert "0.4 s" in decision.reason


def test_accel_falls_back_to_tcg_when_kvm_silent():
    decision = accel.decide([_probe("kvm", False, 20.0, ""), _probe("qemu", True, 3.5)], kvm_present=True)
    assert decision.domain_type == "qemu"
    assert "KVM guest printed nothing on its serial console in 20 s" in decision.reason
    assert "TCG guest printed its kernel banner in 3.5 s" in decision.reason


def test_accel_reports_kvm_start_failure():
    kvm = _probe("kvm", False, 0.1, "QEMU stopped before the kernel printed anything:\nfailed to set MSR 0x10a")
    decision = accel.decide([kvm, _probe("qemu", True)], kvm_present=True)
    assert decision.domain_type == "qemu"
    assert "KVM failed to start a guest (failed to set MSR 0x10a)" in decision.reason


def test_accel_without_kvm_device_uses_tcg():
    decision = accel.decide([_probe("qemu", True)], kvm_present=False)
    assert decision.domain_type == "qemu"
    assert decision.reason.startswith("/dev/kvm is missing or not writable")


def test_accel_nothing_boots_shows_consoles():
    with pytest.raises(PrerequisiteError) as raised:
        accel.decide([_probe("kvm", False, 20, "SeaBIOS"), _probe("qemu", False, 20, "")], kvm_present=True)
    assert "--- kvm probe console ---\nSeaBIOS" in str(raised.value)
    assert "--- qemu probe console ---\n(empty)" in str(raised.value)


def test_accel_env_override_skips_probe(monkeypatch):
    monkeypatch.setenv(accel.ACCEL_ENV, "kvm")
    monkeypatch.setattr(accel, "probe", lambda *args, **kwargs: pytest.fail("probe ran"))
    assert accel.choose(Path("/nonexistent")).domain_type == "kvm"
    monkeypatch.setenv(accel.ACCEL_ENV, "xen")
    with pytest.raises(PrerequisiteError, match="use kvm or qemu"):
        accel.choose(Path("/nonexistent"))


def test_accel_decision_cached(tmp_path, monkeypatch):
    monkeypatch.delenv(accel.ACCEL_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"kernel")
    calls = []

    def fake_probe(domain_type, path, timeout):
        calls.append(domain_type)
        return _probe(domain_type, domain_type == "qemu", 2.0)

    monkeypatch.setattr(accel, "probe", fake_probe)
    monkeypatch.setattr(accel, "kvm_device_usable", lambda: True)
    first = accel.choose(kernel)
    second = accel.choose(kernel)
    assert first.domain_type == second.domain_type == "qemu"
    assert calls == ["kvm", "qemu"]
    assert second.cached is True


def test_probe_xml_boots_kernel_without_disk():
    text = accel.probe_xml("updatelab-probe-1-ab", "kvm", Path("/boot/k"), Path("/tmp/c.log"))
    assert "<domain type='kvm'>" in text
    assert "<kernel>/boot/k</kernel>" in text
    assert "<on_reboot>destroy</on_reboot>" in text
    assert "<disk" not in text
    assert "<interface" not in text


# Vagrant settings and SSH.


def test_pick_subnet_skips_used():
    first = vagrant_provider.pick_subnet("run-a", [])
    assert first.subnet_of(vagrant_provider.SUBNET_POOL)
    second = vagrant_provider.pick_subnet("run-a", [str(first)])
    assert second != first


def test_pick_subnet_pool_exhausted():
    with pytest.raises(vagrant_provider.ProviderError, match="no free /24 subnet"):
        vagrant_provider.pick_subnet("run-a", ["10.233.0.0/16"])


def test_machine_settings_isolate_each_run(tmp_path):
    definition = boxes.load_definition("debian12-vm")
    settings = vagrant_provider.machine_settings(
        definition, machine="debian12-vm-native", run_id="20260101-000000-abcdef", domain_type="qemu",
        subnet=ipaddress.ip_network("10.233.7.0/24"), console_log=tmp_path / "console.log", boot_timeout=300,
    )
    assert settings["domain_prefix"] == "updatelab-20260101-000000-abcdef-"
    assert settings["network_name"] == "updatelab-20260101-000000-abcdef"
    assert settings["network_address"] == "10.233.7.1/24"
    assert settings["domain_type"] == "qemu"
    assert settings["box"] == "updatelab/debian12-vm"


def test_generated_vagrantfile_loads_top_level(tmp_path):
    text = vagrant_provider.generated_vagrantfile(tmp_path / "vm.json", REPO / "Vagrantfile")
    assert f'ENV["UPDATELAB_VM_SETTINGS"] = "{tmp_path}/vm.json"' in text
    assert f'load "{REPO}/Vagrantfile"' in text


def test_top_level_vagrantfile_keeps_network_isolated():
    text = (REPO / "Vagrantfile").read_text()
    assert 'libvirt.management_network_mode = "none"' in text
    assert "synced_folder \".\", \"/vagrant\", disabled: true" in text
    assert "box_check_update = false" in text


def test_parse_ssh_config_first_host():
    output = (
        "Host debian12-vm-native\n  HostName 10.233.9.101\n  User root\n  Port 22\n"
        '  IdentityFile "/root/.cache/updatelab/boxes/debian12-vm/id_ed25519"\n  IdentitiesOnly yes\n'
        "Host other\n  HostName 10.0.0.9\n"
    )
    parsed = vagrant_provider.parse_ssh_config(output)
    assert parsed["hostname"] == "10.233.9.101"
    assert parsed["user"] == "root"
    assert parsed["port"] == "22"
    assert parsed["identityfile"] == "/root/.cache/updatelab/boxes/debian12-vm/id_ed25519"


def test_root_command_wraps_timeout_and_sudo(tmp_path):
    target = vagrant_provider.VagrantTarget("t", "m", tmp_path, "linux", None, "root")
    command = target._root_command("echo 'a b'", 30)
    assert "exec timeout -k 5 30 /bin/sh -c 'echo '\"'\"'a b'\"'\"''" in command
    assert not command.startswith("sudo")
    target.ssh_user = "vagrant"
    assert target._root_command("id", 5).startswith("sudo -n /bin/sh -c ")


def test_console_tail_drops_blank_lines(tmp_path):
    log = tmp_path / "console.log"
    log.write_text("one\r\n\r\n\r\ntwo\r\nthree\r\n")
    assert vagrant_provider.console_tail(log, 2) == "two\nthree"
    assert "unavailable" in vagrant_provider.console_tail(tmp_path / "missing.log")


# Preflight of the tools.


def test_check_tools_without_vagrant(monkeypatch):
    monkeypatch.setattr(vagrant_provider.shutil, "which", lambda name: None)
    with pytest.raises(PrerequisiteError, match="Vagrant is not installed; run `sh scripts/ensure-vagrant.sh`"):
        vagrant_provider.check_tools()


def test_check_tools_without_plugin(monkeypatch):
    monkeypatch.setattr(vagrant_provider.shutil, "which", lambda name: "/usr/bin/" + name)
    outputs = {"--version": "Vagrant 2.3.4\n", "plugin": "No plugins installed.\n"}
    monkeypatch.setattr(vagrant_provider, "_tool_output", lambda command: outputs[command[1]])
    with pytest.raises(PrerequisiteError, match="vagrant-libvirt plugin is missing"):
        vagrant_provider.check_tools()


def test_virsh_without_libvirtd(monkeypatch):
    monkeypatch.setattr(libvirt_util.shutil, "which", lambda name: "/usr/bin/virsh")

    def fake_run(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, "", "error: failed to connect to the hypervisor\nerror: no socket\n")

    monkeypatch.setattr(libvirt_util.subprocess, "run", fake_run)
    with pytest.raises(PrerequisiteError, match="libvirtd is not reachable at qemu:///system .*scripts/ensure-vagrant.sh"):
        libvirt_util.virsh("version")


def test_virsh_missing(monkeypatch):
    monkeypatch.setattr(libvirt_util.shutil, "which", lambda name: None)
    with pytest.raises(PrerequisiteError, match="virsh .* is missing"):
        libvirt_util.virsh("version")


# Cleanup by name.


class FakeLibvirt:
    def __init__(self, domains=(), networks=(), volumes=()):
        self.domains = list(domains)
        self.networks = list(networks)
        self.volumes = list(volumes)
        self.removed = []

    def install(self, monkeypatch):
        monkeypatch.setattr(libvirt_util, "domains_with_prefix", lambda p: [d for d in self.domains if d.startswith(p)])
        monkeypatch.setattr(libvirt_util, "networks_with_prefix", lambda p: [n for n in self.networks if n.startswith(p)])
        monkeypatch.setattr(libvirt_util, "volumes_with_prefix", lambda p: [v for v in self.volumes if v[1].startswith(p)])
        monkeypatch.setattr(libvirt_util, "remove_domain", lambda name: (self.domains.remove(name), self.removed.append(name)))
        monkeypatch.setattr(libvirt_util, "remove_network", lambda name: (self.networks.remove(name), self.removed.append(name)))
        monkeypatch.setattr(
            libvirt_util, "delete_volume", lambda pool, name: (self.volumes.remove((pool, name)), self.removed.append(name))
        )


def test_clean_removes_only_the_run(tmp_path, monkeypatch):
    run, other = "20260101-000000-aaaaaa", "20260101-000000-bbbbbb"
    fake = FakeLibvirt(
        domains=[f"updatelab-{run}-debian12-vm-native", f"updatelab-{other}-debian12-vm-native", "someone-else"],
        networks=[f"updatelab-{run}", f"updatelab-{other}", "default"],
        volumes=[("default", f"updatelab-{run}-debian12-vm-native.img"), ("default", "updatelab-VAGRANTSLASH-debian12-vm_vagrant_box_image_0_box.img")],
    )
    fake.install(monkeypatch)
    work_root = tmp_path / f"{run}.vagrant"
    (work_root / "debian12-vm-native").mkdir(parents=True)
    removed = vagrant_provider.clean(run, work_root)
    assert f"domain updatelab-{run}-debian12-vm-native" in removed
    assert f"network updatelab-{run}" in removed
    assert f"volume default/updatelab-{run}-debian12-vm-native.img" in removed
    assert fake.domains == [f"updatelab-{other}-debian12-vm-native", "someone-else"]
    assert fake.networks == [f"updatelab-{other}", "default"]
    assert fake.volumes == [("default", "updatelab-VAGRANTSLASH-debian12-vm_vagrant_box_image_0_box.img")]
    assert not work_root.exists()
    assert vagrant_provider.clean(run, work_root) == []


def test_recovery_skips_live_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    live, dead = "20260101-000000-aaaaaa", "20260101-000000-bbbbbb"
    state = vm_run.state_root()
    state.mkdir(parents=True)
    (state / f"{live}.json").write_text(json.dumps({"run_id": live, "pid": os.getpid()}))
    (state / f"{dead}.json").write_text(json.dumps({"run_id": dead, "pid": 2**22 + 7}))
    fake = FakeLibvirt(
        domains=[f"updatelab-{live}-debian12-vm-native", f"updatelab-{dead}-debian12-vm-recovery", f"{accel.PROBE_PREFIX}{2**22 + 9}-aa"],
        networks=[f"updatelab-{live}", f"updatelab-{dead}"],
    )
    fake.install(monkeypatch)
    removed = vm_run.clean_vm_runs()
    assert f"domain updatelab-{dead}-debian12-vm-recovery" in removed
    assert f"network updatelab-{dead}" in removed
    assert f"domain {accel.PROBE_PREFIX}{2**22 + 9}-aa" in removed
    assert fake.domains == [f"updatelab-{live}-debian12-vm-native"]
    assert fake.networks == [f"updatelab-{live}"]
    assert json.loads((state / f"{dead}.json").read_text())["vm_status"] == "cleaned"


def test_processes_in_finds_child_cwd(tmp_path):
    process = subprocess.Popen(["sleep", "30"], cwd=tmp_path)
    try:
        assert process.pid in vagrant_provider.processes_in(tmp_path)
        assert process.pid not in vagrant_provider.processes_in(tmp_path / "other")
    finally:
        process.kill()
        process.wait()


def test_run_rejects_undeployable_guest(monkeypatch):
    import argparse

    from rich.console import Console

    args = argparse.Namespace(targets="windows-scm", expectations=None)
    with pytest.raises(ConfigError, match="windows guest is not implemented yet"):
        vm_run.run_vm_matrix(args, {}, [], None, Console())


def test_ssh_unreachable_shows_console(tmp_path):
    console_log = tmp_path / "console.log"
    console_log.write_text("[    1.0] Kernel panic - not syncing: VFS: Unable to mount root fs\r\n")
    provider = vagrant_provider.VagrantProvider("20260101-000000-aaaaaa", tmp_path, ssh_timeout=1)
    ssh = {"hostname": "127.0.0.1", "port": "1", "user": "root", "identityfile": str(tmp_path / "missing-key")}
    with pytest.raises(vagrant_provider.TargetBootError) as raised:
        provider._connect_ssh("debian12-vm-native", ssh, "", console_log)
    message = str(raised.value)
    assert "SSH to 127.0.0.1:1 as root" in message
    assert "failed for 1 s" in message
    assert "Kernel panic - not syncing" in message


def _libvirtd_stopped(monkeypatch):
    monkeypatch.setattr(libvirt_util.shutil, "which", lambda name: "/usr/bin/virsh")

    def fake_run(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, "", "error: failed to connect to the hypervisor\n")

    monkeypatch.setattr(libvirt_util.subprocess, "run", fake_run)


def test_clean_without_libvirtd_skips_vms(tmp_path, monkeypatch):
    from rich.console import Console

    from lab.cli_boxes import clean_vms

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    _libvirtd_stopped(monkeypatch)
    console = Console(record=True, width=200)
    clean_vms("20260101-000000-aaaaaa", console)
    clean_vms(None, console)
    assert console.export_text().count("VM objects were not checked, because no VM run is recorded here and libvirtd is not reachable") == 2


def test_clean_without_libvirtd_fails_vm_run(tmp_path, monkeypatch):
    from rich.console import Console

    from lab.cli_boxes import clean_vms

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    run_id = "20260101-000000-bbbbbb"
    vm_run.work_root(run_id).mkdir(parents=True)
    _libvirtd_stopped(monkeypatch)
    for requested in (run_id, None):
        with pytest.raises(PrerequisiteError, match="libvirtd is not reachable"):
            clean_vms(requested, Console(record=True))
        assert vm_run.work_root(run_id).is_dir()
