"""Docker provider: every target is a container that runs a real init system as PID 1.

Each lab run gets one Docker network, ``updatelab-<run_id>``, created with ``internal=True``
so that containers reach only each other and the host's address on that network (the
gateway). The lab server binds to the gateway address. Containers and networks carry the
labels ``updatelab=1`` and ``updatelab.run=<run_id>``, which `clean` uses to remove what a
crashed run left behind.

Containers run without ``--privileged``. Which capabilities and mounts an init system needs
is kept in `INIT_PROFILES`. For systemd the container gets a private cgroup namespace and an
empty tmpfs on /sys/fs/cgroup. systemd then mounts its own cgroup hierarchies, rooted at the
container's cgroup, so it does not write into the host's cgroup root.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import ipaddress
import logging
import os
import posixpath
import shlex
import socket
import struct
import tarfile
import time

import docker
import docker.errors
import docker.types

from lab import images
from lab.errors import PrerequisiteError, ProviderError, TargetBootError
from lab.providers.base import ExecResult, Provider, Target, check_run_id

log = logging.getLogger(__name__)

LABEL_LAB = "updatelab"
LABEL_RUN = "updatelab.run"
LABEL_TARGET = "updatelab.target"

ENSURE_DOCKER_HINT = "start Docker with `scripts/ensure-docker.sh` (as root), then retry"

#: Private /24 subnets tried for run networks, in order, starting at an offset derived from the run id.
SUBNET_POOL = ipaddress.ip_network("10.231.0.0/16")
SUBNET_PREFIX = 24

#: Seconds a command's output may stay open after its process exited (a daemon it started can
#: keep the pipe open), before `DockerTarget` stops reading.
_EXITED_GRACE = 1.0


@dataclasses.dataclass(frozen=True)
class InitProfile:
    """How to run and wait for one init system inside a container."""

    cap_add: tuple[str, ...]
    #: Mount points that get an empty tmpfs (path -> mount options).
    tmpfs: dict[str, str]
    #: Use a private cgroup namespace, so /proc/self/cgroup in the container shows its own cgroup as the root.
    private_cgroupns: bool
    #: Shell command that exits 0 once the init system finished booting.
    ready_command: str
    #: Extra arguments passed to /sbin/init.
    init_args: tuple[str, ...] = ()


_RUN_TMPFS = {"/run": "rw,nosuid,nodev,mode=755", "/run/lock": "rw,nosuid,nodev,noexec,mode=1777"}

INIT_PROFILES: dict[str, InitProfile] = {
    # systemd mounts its cgroup hierarchies into the tmpfs, which needs CAP_SYS_ADMIN.
    "systemd": InitProfile(
        cap_add=("SYS_ADMIN",),
        tmpfs={**_RUN_TMPFS, "/sys/fs/cgroup": "rw,nosuid,nodev,noexec,mode=755"},
        private_cgroupns=True,
        ready_command='state=$(systemctl is-system-running 2>/dev/null); [ "$state" = running ] || [ "$state" = degraded ]',
    ),
    # sysvinit writes the new runlevel to utmp when it enters it, and /etc/init.d/rc runs the
    # runlevel's scripts afterwards, so boot is over when the runlevel is 2 and rc has exited.
    "sysvinit": InitProfile(
        cap_add=(),
        tmpfs=dict(_RUN_TMPFS),
        private_cgroupns=True,
        ready_command="[ \"$(runlevel | cut -d' ' -f2)\" = 2 ] && ! pgrep -f '^/bin/sh /etc/init.d/rc' >/dev/null",
    ),
    # Debian's OpenRC runs under sysvinit's init, which starts `openrc default` for runlevel 2.
    "openrc": InitProfile(
        cap_add=(),
        tmpfs=dict(_RUN_TMPFS),
        private_cgroupns=True,
        ready_command="[ \"$(rc-status --runlevel 2>/dev/null)\" = default ] && ! pgrep -x openrc >/dev/null",
    ),
    # runit starts runsvdir as stage 2 once the one-time tasks of /etc/runit/1 are done.
    "runit": InitProfile(
        cap_add=(),
        tmpfs=dict(_RUN_TMPFS),
        private_cgroupns=True,
        ready_command="pgrep -x runsvdir >/dev/null",
    ),
    # NOTE: the upstart and procd profiles are untested, because their images need a registry.
    "upstart": InitProfile(
        cap_add=(),
        tmpfs=dict(_RUN_TMPFS),
        private_cgroupns=True,
        ready_command="[ \"$(runlevel | cut -d' ' -f2)\" = 2 ]",
    ),
    "procd": InitProfile(
        cap_add=(),
        tmpfs={"/tmp": "rw,nosuid,nodev", "/var": "rw,nosuid,nodev"},
        private_cgroupns=True,
        ready_command="ubus call system board >/dev/null 2>&1",
    ),
}


def connect(timeout: float = 60.0) -> docker.DockerClient:
    """Return a Docker SDK client for the engine in the environment (DOCKER_HOST or the local socket).

    Raises PrerequisiteError, with the command that starts Docker, when the engine does not respond.
    """
    try:
        client = docker.from_env(timeout=int(timeout))
        client.ping()
    except docker.errors.DockerException as error:
        raise PrerequisiteError(f"the Docker engine is not reachable ({error}); {ENSURE_DOCKER_HINT}") from error
    except OSError as error:
        raise PrerequisiteError(f"the Docker engine is not reachable ({error}); {ENSURE_DOCKER_HINT}") from error
    return client


@dataclasses.dataclass(frozen=True)
class RunNetwork:
    """The internal Docker network of one run."""

    name: str
    network_id: str
    subnet: str
    #: Host-side address of the bridge; the lab server binds here and agents connect to it.
    gateway: str


class DockerTarget(Target):
    """A running container of one lab run."""

    def __init__(self, container, name: str, server_address: str, service_manager: str, recipe: images.Recipe) -> None:
        self.container = container
        self.name = name
        self.server_address = server_address
        self.service_manager = service_manager
        self.recipe = recipe

    @property
    def container_id(self) -> str:
        return self.container.id

    def address(self) -> str:
        """Return the container's IP address on the run network."""
        self.container.reload()
        networks = self.container.attrs["NetworkSettings"]["Networks"]
        for settings in networks.values():
            if settings.get("IPAddress"):
                return settings["IPAddress"]
        raise ProviderError(f"{self.name}: container {self.container.short_id} has no IP address")

    def _run(self, command: str, *, timeout: float) -> ExecResult:
        """Run `command` with /bin/sh -c and return its combined output.

        A command still running after `timeout` seconds is killed by coreutils `timeout`
        inside the container and reported with exit status 124. Without coreutils, the lab
        stops reading 10 s later and leaves the command running. Output that a
        daemon started by the command keeps open is read for at most one more second after
        the command itself exited.
        """
        seconds = max(1, int(timeout))
        quoted = shlex.quote(command)
        # coreutils `timeout -k` sends TERM at the deadline and KILL 5 s later.
        wrapped = (
            f"if timeout -k 1 1 true 2>/dev/null; then exec timeout -k 5 {seconds} /bin/sh -c {quoted}; "
            f"else exec /bin/sh -c {quoted}; fi"
        )
        api = self.container.client.api
        try:
            exec_id = api.exec_create(self.container.id, ["/bin/sh", "-c", wrapped], stdout=True, stderr=True)["Id"]
            raw = api.exec_start(exec_id, socket=True)
        except docker.errors.APIError as error:
            raise ProviderError(f"{self.name}: cannot run {command!r}: {error.explanation or error}") from error

        started = time.monotonic()
        output, timed_out = _read_exec_output(api, exec_id, raw, deadline=time.monotonic() + seconds + 10)
        state = api.exec_inspect(exec_id)
        text = output.decode("utf-8", errors="replace")
        exit_status = state.get("ExitCode")
        killed_at_deadline = exit_status == 137 and time.monotonic() - started >= seconds
        if timed_out or state.get("Running") or exit_status == 124 or killed_at_deadline:
            # NOTE: a command that itself exits 124 is reported as timed out too.
            return ExecResult(command, 124, text + f"\n(updatelab: command timed out after {seconds} s)")
        return ExecResult(command, int(exit_status if exit_status is not None else -1), text)

    def put_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        if not posixpath.isabs(path):
            raise ValueError(f"put_file needs an absolute path, not {path!r}")
        parent, filename = posixpath.split(posixpath.normpath(path))
        self.run(["mkdir", "-p", parent])
        archive = io.BytesIO()
        with tarfile.open(fileobj=archive, mode="w") as tar:
            info = tarfile.TarInfo(filename)
            info.size = len(data)
            info.mode = mode
            info.mtime = int(time.time())
            tar.addfile(info, io.BytesIO(data))
        try:
            accepted = self.container.put_archive(parent, archive.getvalue())
        except docker.errors.APIError as error:
            raise ProviderError(f"{self.name}: cannot write {path}: {error.explanation or error}") from error
        if not accepted:
            raise ProviderError(f"{self.name}: Docker rejected writing {path}")

    def get_file(self, path: str) -> bytes:
        if not posixpath.isabs(path):
            raise ValueError(f"get_file needs an absolute path, not {path!r}")
        try:
            stream, _ = self.container.get_archive(path)
        except docker.errors.NotFound as error:
            # The archive API cannot see into tmpfs mounts, so ask the container itself.
            if self.run(["test", "-f", path], check=False).ok:
                return self._read_through_shell(path)
            raise FileNotFoundError(f"{self.name}: {path} not found") from error
        except docker.errors.APIError as error:
            raise ProviderError(f"{self.name}: cannot read {path}: {error.explanation or error}") from error
        archive = io.BytesIO(b"".join(stream))
        with tarfile.open(fileobj=archive, mode="r") as tar:
            member = tar.next()
            if member is None:
                raise FileNotFoundError(f"{self.name}: {path} not found")
            if member.isdir():
                raise IsADirectoryError(f"{self.name}: {path} is a directory")
            if member.issym() or member.islnk():
                # get_archive returns a symbolic link itself, so read its target through the shell.
                return self._read_through_shell(path)
            extracted = tar.extractfile(member)
            if extracted is None:
                raise ProviderError(f"{self.name}: {path} is not a regular file")
            return extracted.read()

    def _read_through_shell(self, path: str) -> bytes:
        return base64.b64decode(self.run(["base64", "-w", "0", path]).output)

    def logs(self, lines: int = 40) -> str:
        """Return the last `lines` lines of the container's console output."""
        return _container_log_tail(self.container, lines)


class DockerProvider(Provider):
    """Creates one container per target on the run's internal network."""

    name = "docker"

    def __init__(
        self,
        run_id: str,
        *,
        client: docker.DockerClient | None = None,
        boot_timeout: float = 120.0,
        build_missing: bool = True,
        progress: images.ProgressCallback | None = None,
    ) -> None:
        check_run_id(run_id)
        self.run_id = run_id
        self.boot_timeout = boot_timeout
        self.build_missing = build_missing
        self.progress = progress
        self._client = client
        self._network: RunNetwork | None = None
        self._targets: dict[str, DockerTarget] = {}

    @property
    def client(self) -> docker.DockerClient:
        if self._client is None:
            self._client = connect()
        return self._client

    @property
    def network_name(self) -> str:
        return f"updatelab-{self.run_id}"

    @property
    def labels(self) -> dict[str, str]:
        return {LABEL_LAB: "1", LABEL_RUN: self.run_id}

    def preflight(self) -> None:
        self._client = connect()

    def ensure_network(self) -> RunNetwork:
        """Create the run's internal network if needed and return it."""
        if self._network is None:
            self._network = _find_run_network(self.client, self.network_name) or _create_run_network(
                self.client, self.network_name, self.run_id, self.labels
            )
        return self._network

    @property
    def server_address(self) -> str:
        """Gateway address of the run network, where the lab server listens; creates the network."""
        return self.ensure_network().gateway

    def create(
        self,
        target_name: str,
        *,
        instance: str | None = None,
        tmpfs: dict[str, str] | None = None,
        cap_add: tuple[str, ...] = (),
    ) -> DockerTarget:
        """Start a container of `target_name` and wait until its init system has booted.

        `instance` names the container when one run starts several of the same target. `tmpfs`
        and `cap_add` add mounts and capabilities to the target's profile; fault scenarios use
        them for small or read-only filesystems.
        """
        recipe = images.load_recipe(target_name)
        profile = INIT_PROFILES[recipe.service_manager]
        image = self._ensure_image(recipe)
        network = self.ensure_network()
        container_name = f"updatelab-{self.run_id}-{instance or target_name}"

        _remove_container(self.client, container_name)
        log.info("starting %s from %s on %s", container_name, image, network.name)
        try:
            container = self.client.containers.run(
                image,
                command=["/sbin/init", *profile.init_args],
                name=container_name,
                hostname=target_name,
                labels={**self.labels, LABEL_TARGET: target_name},
                network=network.name,
                cap_add=sorted({*profile.cap_add, *cap_add}),
                tmpfs={**profile.tmpfs, **(tmpfs or {})},
                cgroupns="private" if profile.private_cgroupns else None,
                environment={"container": "docker"},
                # The embedded DNS server forwards unknown names to this upstream, which is the
                # container's own loopback, so a name lookup never leaves the container.
                dns=["127.0.0.1"],
                privileged=False,
                detach=True,
                tty=False,
            )
        except docker.errors.APIError as error:
            raise TargetBootError(f"{target_name}: cannot start container from {image}: {error.explanation or error}") from error

        target = DockerTarget(container, target_name, network.gateway, recipe.service_manager, recipe)
        self._targets[instance or target_name] = target
        self._wait_ready(target, profile)
        return target

    def destroy(self, target: Target) -> None:
        if isinstance(target, DockerTarget):
            _remove_container(self.client, target.container.id)
        else:
            _remove_container(self.client, f"updatelab-{self.run_id}-{target.name}")
        for key in [key for key, value in self._targets.items() if value is target]:
            del self._targets[key]

    def destroy_all(self) -> None:
        clean(self.run_id, client=self.client)
        self._targets.clear()
        self._network = None

    def _ensure_image(self, recipe: images.Recipe) -> str:
        try:
            image = self.client.images.get(recipe.tag)
        except docker.errors.ImageNotFound:
            image = None
        if image is not None and image.labels.get(images.LABEL_RECIPE_HASH) == images.recipe_hash(recipe.name):
            return recipe.tag
        if not self.build_missing:
            state = "is missing" if image is None else "is out of date"
            raise PrerequisiteError(f"image {recipe.tag} {state}; build it with `updatelab images build {recipe.name}`")
        images.build(recipe.name, progress=self.progress, client=self.client)
        return recipe.tag

    def _wait_ready(self, target: DockerTarget, profile: InitProfile) -> None:
        deadline = time.monotonic() + self.boot_timeout
        last_output = ""
        while True:
            target.container.reload()
            if target.container.status != "running":
                raise TargetBootError(
                    f"{target.name}: container {target.container.short_id} stopped while booting "
                    f"(status {target.container.status}, exit code {target.container.attrs['State'].get('ExitCode')}). "
                    f"Last console lines:\n{target.logs()}"
                )
            result = target.run(profile.ready_command, timeout=15, check=False)
            if result.ok:
                log.info("%s: %s is ready", target.name, target.service_manager)
                return
            last_output = result.output.strip()
            if time.monotonic() > deadline:
                raise TargetBootError(
                    f"{target.name}: {target.service_manager} was not ready after {self.boot_timeout:.0f} s "
                    f"(check {profile.ready_command!r} printed {last_output!r}). Last console lines:\n{target.logs()}"
                )
            time.sleep(0.5)


def clean(run_id: str | None = None, *, client: docker.DockerClient | None = None) -> list[str]:
    """Remove every labelled container and network of `run_id`, or of all runs when it is None.

    Returns descriptions of what was removed, such as ``container updatelab-r1-debian12-systemd``.
    Calling it again, or when nothing is left, returns an empty list.
    """
    client = client or connect()
    selector = run_label_filter(run_id)
    removed = []
    for container in client.containers.list(all=True, filters={"label": selector}):
        if _remove_container(client, container.id):
            removed.append(f"container {container.name}")
    for network in client.networks.list(filters={"label": selector}):
        try:
            network.remove()
        except docker.errors.NotFound:
            continue
        except docker.errors.APIError as error:
            raise ProviderError(f"cannot remove network {network.name}: {error.explanation or error}") from error
        removed.append(f"network {network.name}")
    if removed:
        log.info("removed %s", ", ".join(removed))
    return removed


def run_label_filter(run_id: str | None) -> str:
    """Return the Docker label filter that `clean` uses for `run_id` (None: every run)."""
    # Containers inherit image labels, so `updatelab.target` alone does not mark a lab
    # container; every container and network this provider creates has `updatelab.run`.
    return f"{LABEL_RUN}={run_id}" if run_id is not None else LABEL_RUN


def _remove_container(client: docker.DockerClient, name_or_id: str) -> bool:
    """Force-remove a container; return False when it did not exist."""
    try:
        client.api.remove_container(name_or_id, force=True, v=True)
    except docker.errors.NotFound:
        return False
    except docker.errors.APIError as error:
        if error.status_code == 409 and "already in progress" in str(error):
            return True
        raise ProviderError(f"cannot remove container {name_or_id}: {error.explanation or error}") from error
    return True


def _find_run_network(client: docker.DockerClient, name: str) -> RunNetwork | None:
    for network in client.networks.list(names=[name]):
        if network.name != name:
            continue
        network.reload()
        configs = network.attrs.get("IPAM", {}).get("Config") or []
        if not network.attrs.get("Internal") or not configs:
            raise ProviderError(f"network {name} exists but is not an internal network made by updatelab; run `updatelab clean`")
        return RunNetwork(name, network.id, configs[0]["Subnet"], configs[0]["Gateway"])
    return None


def _create_run_network(client: docker.DockerClient, name: str, run_id: str, labels: dict[str, str]) -> RunNetwork:
    """Create an internal bridge network on the first free subnet of SUBNET_POOL."""
    subnets = list(SUBNET_POOL.subnets(new_prefix=SUBNET_PREFIX))
    start = int.from_bytes(hashlib.sha256(run_id.encode()).digest()[:2], "big") % len(subnets)
    subnets_in_use = _subnets_in_use(client)
    for offset in range(len(subnets)):
        subnet = subnets[(start + offset) % len(subnets)]
        if any(subnet.overlaps(used) for used in subnets_in_use):
            continue
        gateway = str(next(subnet.hosts()))
        ipam = docker.types.IPAMConfig(pool_configs=[docker.types.IPAMPool(subnet=str(subnet), gateway=gateway)])
        try:
            network = client.networks.create(
                name, driver="bridge", internal=True, ipam=ipam, labels=dict(labels), check_duplicate=True
            )
        except docker.errors.APIError as error:
            if "overlap" in str(error).lower():
                continue  # another run took this subnet after `subnets_in_use` was read
            raise ProviderError(f"cannot create network {name} on {subnet}: {error.explanation or error}") from error
        log.info("created internal network %s on %s, gateway %s", name, subnet, gateway)
        return RunNetwork(name, network.id, str(subnet), gateway)
    raise ProviderError(f"no free /{SUBNET_PREFIX} subnet left in {SUBNET_POOL} for network {name}; run `updatelab clean`")


def _subnets_in_use(client: docker.DockerClient) -> list[ipaddress.IPv4Network]:
    """Return subnets of existing Docker networks and of the host's IPv4 routes."""
    used: list[ipaddress.IPv4Network] = []
    for network in client.networks.list():
        for config in network.attrs.get("IPAM", {}).get("Config") or []:
            try:
                subnet = ipaddress.ip_network(config.get("Subnet", ""), strict=False)
            except ValueError:
                continue
            if subnet.version == 4:
                used.append(subnet)
    used.extend(_host_routes())
    return used


def _host_routes() -> list[ipaddress.IPv4Network]:
    """Return the host's non-default IPv4 routes from /proc/net/route (empty where it is unreadable)."""
    routes = []
    try:
        with open("/proc/net/route", encoding="ascii") as table:
            next(table, None)
            for line in table:
                fields = line.split()
                if len(fields) < 8:
                    continue
                destination = socket.inet_ntoa(struct.pack("<I", int(fields[1], 16)))
                mask = socket.inet_ntoa(struct.pack("<I", int(fields[7], 16)))
                if mask == "0.0.0.0":
                    continue  # the default route covers everything and blocks nothing
                routes.append(ipaddress.ip_network(f"{destination}/{mask}", strict=False))
    except OSError:
        pass
    return routes


def _read_exec_output(api, exec_id: str, raw, *, deadline: float) -> tuple[bytes, bool]:
    """Read a multiplexed exec stream until it closes, the process has exited and gone quiet, or `deadline`.

    Returns the output and whether the deadline passed.
    """
    sock = getattr(raw, "_sock", raw)
    buffer = bytearray()
    output = bytearray()
    exited_at: float | None = None
    try:
        while True:
            now = time.monotonic()
            if now > deadline:
                return bytes(output), True
            sock.settimeout(0.5)
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, socket.timeout):
                chunk = None
            if chunk == b"":
                break
            if chunk:
                buffer.extend(chunk)
                _drain_frames(buffer, output)
                continue
            if exited_at is None:
                if not api.exec_inspect(exec_id).get("Running"):
                    exited_at = time.monotonic()
            elif time.monotonic() - exited_at > _EXITED_GRACE:
                break
    finally:
        try:
            raw.close()
        except OSError:
            pass
    _drain_frames(buffer, output)
    return bytes(output), False


def _drain_frames(buffer: bytearray, output: bytearray) -> None:
    """Move complete frames of Docker's stdout/stderr stream format from `buffer` to `output`."""
    while len(buffer) >= 8:
        length = struct.unpack(">I", bytes(buffer[4:8]))[0]
        if len(buffer) < 8 + length:
            return
        output.extend(buffer[8 : 8 + length])
        del buffer[: 8 + length]


def _container_log_tail(container, lines: int) -> str:
    try:
        return container.logs(tail=lines).decode("utf-8", errors="replace").rstrip()
    except docker.errors.APIError as error:
        return f"(console output unavailable: {error})"



def new_run_id() -> str:
    """Return a short random run id, such as ``r3f9a1c``."""
    return "r" + os.urandom(3).hex()
