"""Tests of the Docker provider against the real Docker engine and real init systems.

Every test here is skipped when the Docker engine cannot be reached. Images are built on first
use (debootstrap needs root and the Debian mirror) and reused afterwards. The agent installer
tests also need the MeshAgent builds: they take the cached meshcentral package (updatelab agents
fetch), or UPDATELAB_AGENT, set to an ``agents`` folder or to one agent binary whose file name
matches a recipe's ``agent`` key.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest

from lab import images
from lab.errors import CommandError, PrerequisiteError
from lab.providers import docker as docker_provider
from lab.providers.docker import LABEL_LAB, LABEL_RUN, DockerProvider, clean

pytestmark = pytest.mark.docker

BOOT_TARGETS = ["debian12-systemd", "debian12-sysvinit"]


@pytest.fixture(scope="module")
def client():
    try:
        return docker_provider.connect(timeout=30)
    except PrerequisiteError as error:
        pytest.skip(f"Docker engine not reachable: {error}")


@pytest.fixture
def provider(client):
    run_id = "test" + secrets.token_hex(3)
    lab_provider = DockerProvider(run_id, client=client, boot_timeout=120)
    yield lab_provider
    lab_provider.destroy_all()


def _labelled(client, run_id: str) -> tuple[list, list]:
    selector = {"label": f"{LABEL_RUN}={run_id}"}
    return client.containers.list(all=True, filters=selector), client.networks.list(filters=selector)


@pytest.mark.parametrize("target_name", BOOT_TARGETS)
def test_target_boots_and_runs_commands(provider, target_name):
    target = provider.create(target_name)

    assert target.name == target_name
    assert target.run("hostname").output.strip() == target_name
    init = target.run("cat /proc/1/comm").output.strip()
    assert init == ("systemd" if target.service_manager == "systemd" else "init")
    assert target.run("ps -e").ok, "procps must be installed for the agent installer"

    with pytest.raises(CommandError) as caught:
        target.run("echo failing; exit 3")
    assert caught.value.exit_status == 3
    assert "failing" in caught.value.output

    result = target.run("sleep 30", timeout=2, check=False)
    assert result.exit_status == 124
    assert "timed out" in result.output


@pytest.mark.parametrize("target_name", BOOT_TARGETS)
def test_target_file_round_trip(provider, target_name):
    target = provider.create(target_name)
    payload = bytes(range(256)) * 64

    target.put_file("/root/new/folder/data.bin", payload, mode=0o600)

    assert target.get_file("/root/new/folder/data.bin") == payload
    assert target.run("stat -c %a /root/new/folder/data.bin").output.strip() == "600"
    assert target.file_exists("/root/new/folder/data.bin")
    with pytest.raises(FileNotFoundError):
        target.get_file("/root/missing.txt")
    with pytest.raises(IsADirectoryError):
        target.get_file("/root/new")


def test_network_is_internal_and_labelled(provider, client):
    target = provider.create("debian12-sysvinit")
    network = client.networks.get(provider.network_name)

    assert network.attrs["Internal"] is True
    assert network.attrs["Labels"][LABEL_RUN] == provider.run_id
    assert network.attrs["Labels"][LABEL_LAB] == "1"
    assert network.attrs["IPAM"]["Config"][0]["Gateway"] == target.server_address
    assert target.server_address == provider.server_address
    assert target.address() != target.server_address

    attrs = client.api.inspect_container(target.container_id)
    assert attrs["Config"]["Labels"][LABEL_RUN] == provider.run_id
    assert attrs["Config"]["Labels"][LABEL_LAB] == "1"
    assert attrs["HostConfig"]["Privileged"] is False
    assert list(attrs["NetworkSettings"]["Networks"]) == [provider.network_name]


def test_systemd_container_has_minimal_privileges(provider, client):
    target = provider.create("debian12-systemd")
    host_config = client.api.inspect_container(target.container_id)["HostConfig"]

    assert host_config["Privileged"] is False
    assert [cap.removeprefix("CAP_") for cap in host_config["CapAdd"]] == ["SYS_ADMIN"]
    assert host_config["CgroupnsMode"] == "private"
    assert "/sys/fs/cgroup" in host_config["Tmpfs"]
    # PID 1 is in init.scope under the namespace root, not under the host's docker/<id> cgroup.
    assert "0::/init.scope" in target.run("cat /proc/1/cgroup").output


def test_destroy_leaves_nothing_labelled(client):
    run_id = "test" + secrets.token_hex(3)
    lab_provider = DockerProvider(run_id, client=client)
    target = lab_provider.create("debian12-sysvinit")

    lab_provider.destroy(target)
    lab_provider.destroy(target)
    containers, _ = _labelled(client, run_id)
    assert containers == []

    lab_provider.destroy_all()
    lab_provider.destroy_all()
    containers, networks = _labelled(client, run_id)
    assert containers == []
    assert networks == []


def test_clean_removes_crashed_run(client):
    # A crashed run leaves a labelled network and container behind without a provider object.
    run_id = "crash" + secrets.token_hex(3)
    labels = {LABEL_LAB: "1", LABEL_RUN: run_id}
    images.build("debian12-sysvinit", client=client)
    network = client.networks.create(f"updatelab-{run_id}", driver="bridge", internal=True, labels=labels)
    container = client.containers.run(
        "updatelab/debian12-sysvinit:latest",
        command=["sleep", "600"],
        name=f"updatelab-{run_id}-leftover",
        labels=labels,
        network=network.name,
        detach=True,
    )

    removed = clean(run_id, client=client)

    assert f"container {container.name}" in removed
    assert f"network {network.name}" in removed
    containers, networks = _labelled(client, run_id)
    assert containers == []
    assert networks == []
    assert clean(run_id, client=client) == []


def test_clean_ignores_containers_without_run_label(client):
    # Containers inherit image labels, so a container made from a lab image by hand must survive.
    images.build("debian12-sysvinit", client=client)
    container = client.containers.run(
        "updatelab/debian12-sysvinit:latest",
        command=["sleep", "600"],
        name="updatelab-unrelated-" + secrets.token_hex(3),
        network_mode="none",
        detach=True,
    )
    try:
        # clean(None) itself is not called: it would also remove other runs on this engine.
        selected = client.containers.list(all=True, filters={"label": docker_provider.run_label_filter(None)})
        assert container.id not in [candidate.id for candidate in selected]
        assert LABEL_RUN not in container.labels
    finally:
        container.remove(force=True)


# --- the real agent installer ----------------------------------------------------------------

#: What the agent's `-fullinstall` does in each container, as observed with the agents of
#: meshcentral 1.1.55. `running` is whether an agent process is still alive 5 s later.
INSTALL_EXPECTATIONS = {
    "debian12-systemd": {"files": ["/lib/systemd/system/labagent.service"], "running": True},
    "debian13-systemd": {"files": ["/lib/systemd/system/labagent.service"], "running": True},
    "debian12-i386-systemd": {"files": ["/lib/systemd/system/labagent.service"], "running": True},
    "debian12-sysvinit": {"files": ["/etc/init.d/labagent"], "running": True},
    # The installer writes an openrc-run script and adds it to the default runlevel, and
    # `rc-service labagent status` reports "started", but neither supervise-daemon nor the
    # agent survives the installer's exit. `rc-service labagent restart` starts it correctly.
    "debian12-openrc": {"files": ["/etc/init.d/labagent"], "running": False},
    # The installer has no runit support. It falls back to its own daemon wrapper in
    # /usr/local/mesh_daemons, which spawns the missing file /usr/local/mesh_daemons/labagent/labagent
    # in a restart loop, so no agent process stays up.
    "debian12-runit": {"files": ["/usr/local/mesh_daemons/labagent.service", "/usr/local/mesh_daemons/daemon"], "running": False},
}

STATUS_COMMANDS = {
    "systemd": "systemctl is-active labagent",
    "sysvinit": "service labagent status",
    "openrc": "rc-service labagent status",
    "runit": "sv status labagent",
}


def _agent_binary(recipe: images.Recipe) -> Path:
    configured = os.environ.get("UPDATELAB_AGENT")
    if not configured:
        from lab import agents

        package = agents.cached_package()
        if package is None:
            pytest.skip("no agent builds: run 'updatelab agents fetch' or set UPDATELAB_AGENT")
        configured = str(package.path)
    path = Path(configured)
    if path.is_dir():
        path = path / recipe.agent
    if path.name != recipe.agent or not path.is_file():
        pytest.skip(f"{recipe.name} needs the agent build {recipe.agent}, not found at {path}")
    return path


def _agent_pids(target) -> list[int]:
    # The real agent runs from the installed copy; the daemon wrapper of the runit fallback
    # runs from /usr/local/mesh_daemons and is counted separately.
    output = target.run("ps -eo pid,args", check=False).output
    pids = []
    for line in output.splitlines():
        fields = line.split(None, 1)
        if len(fields) == 2 and fields[1].startswith("/usr/local/mesh_services/labagent/meshagent --"):
            pids.append(int(fields[0]))
    return pids


@pytest.mark.agent
@pytest.mark.parametrize("target_name", sorted(INSTALL_EXPECTATIONS))
def test_agent_installer_in_container(provider, target_name, capsys):
    recipe = images.load_recipe(target_name)
    binary = _agent_binary(recipe)
    expected = INSTALL_EXPECTATIONS[target_name]
    target = provider.create(target_name)

    target.put_file("/root/meshagent", binary.read_bytes(), mode=0o755)
    zeros = "0" * 96
    msh = (
        f"MeshServer=wss://{target.server_address}:1/agent.ashx\n"
        f"MeshID=0x{zeros}\n"
        f"ServerID={zeros}\n"
        "meshServiceName=labagent\n"
        "logUpdate=1\n"
    )
    target.put_file("/root/meshagent.msh", msh.encode())
    install = target.run(
        "cd /root && /root/meshagent -fullinstall --copy-msh=1 --meshServiceName=labagent --logUpdate=1",
        timeout=120,
        check=False,
    )
    target.run("sleep 5")
    status = target.run(STATUS_COMMANDS[recipe.service_manager], check=False)
    pids = _agent_pids(target)
    with capsys.disabled():
        print(f"\n[{target_name}] installer exit {install.exit_status}:\n{install.output.strip()}")
        print(f"[{target_name}] {STATUS_COMMANDS[recipe.service_manager]} -> exit {status.exit_status}: {status.output.strip()}")
        print(f"[{target_name}] agent pids: {pids}")

    assert install.exit_status == 0
    assert "Installing service [DONE]" in install.output
    for path in expected["files"]:
        assert target.file_exists(path), f"installer did not write {path}"
    assert bool(pids) == expected["running"], f"agent running: {bool(pids)}, expected {expected['running']}"
    if recipe.service_manager == "systemd":
        assert status.output.strip() == "active"
        main_pid = int(target.run("systemctl show -p MainPID --value labagent").output)
        assert main_pid in pids
    if recipe.service_manager == "sysvinit":
        assert "start/running" in status.output
