"""The catalogue of Vagrant boxes for VM targets, and the builder of the debian12-vm box.

Each VM target is a folder ``boxes/<target>/`` with a ``box.json``. Two sources exist:

``build``
    Built here with no download outside Debian's mirrors. debootstrap creates the root
    filesystem (cached by `lab.images`), and ``mke2fs -d`` turns it into an ext4 image
    without mounting it. ``qemu-img convert`` makes the image qcow2, and the result is packed
    as a vagrant-libvirt box and added with ``vagrant box add``. The guest boots Debian's
    kernel directly (libvirt ``kernel``/``initrd``/``cmd_line``), so the image needs no
    bootloader.
``registry``
    A box that the user adds from a Vagrant registry or a local box file. The lab never
    downloads it, and names the exact ``vagrant box add`` command when it is missing.

Builds are cached: the box records a key derived from the root filesystem and the build
steps, and an unchanged key reuses the added box.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from lab import images
from lab.errors import ConfigError, ImageBuildError, PrerequisiteError

#: Environment variable that overrides the folder holding the box definitions.
BOXES_DIR_ENV = "UPDATELAB_BOXES_DIR"

SOURCES = ("build", "registry")
GUESTS = ("linux", "freebsd", "darwin", "windows")

#: Bump when the steps that turn a root filesystem into a box change, so old boxes are rebuilt.
BOX_FORMAT = 2

#: Folder of the kernels and initrds of built boxes. libvirt starts QEMU as the libvirt-qemu
#: user on Debian, which cannot enter /root, so the files live in libvirt's own boot folder.
KERNEL_DIR = Path("/var/lib/libvirt/boot")

#: Kernel command line of built boxes: the root file system is the whole virtio disk, and the
#: console on the first serial port is what the lab reads when a boot fails.
KERNEL_CMDLINE = "root=/dev/vda rw console=ttyS0 net.ifnames=0 systemd.show_status=1"

#: File inside a built box (and its unpacked folder) that records how it was built.
BUILD_INFO = "updatelab.json"

_TARGET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]*$")


@dataclasses.dataclass(frozen=True)
class BoxDefinition:
    """One VM target, read from ``boxes/<name>/box.json``."""

    name: str
    folder: Path
    description: str
    #: Box name that ``config.vm.box`` uses, such as ``updatelab/debian12-vm``.
    box: str
    #: The exact command that adds the box: ``vagrant box add …`` or ``updatelab boxes build …``.
    add: str
    source: str
    #: Vagrant guest type: ``linux``, ``freebsd``, ``darwin`` or ``windows``.
    guest: str
    service_manager: str
    #: Agent binary in the meshcentral package's ``agents`` folder that runs on this target.
    agent: str
    ssh_user: str = "root"
    memory_mib: int = 1024
    cpus: int = 1
    #: Debian suite and architecture of a built box.
    suite: str = ""
    arch: str = "amd64"
    #: Packages that debootstrap adds to its minbase variant for a built box.
    packages: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class BoxBuildResult:
    target: str
    box: str
    key: str
    cached: bool
    seconds: float


@dataclasses.dataclass(frozen=True)
class BoxStatus:
    """Whether a target's box is present, as `box_status` finds it."""

    target: str
    box: str
    present: bool
    #: Why the box cannot be used, with the command that fixes it; empty when it can.
    problem: str = ""
    #: Build key of a built box that is present.
    key: str = ""


@dataclasses.dataclass(frozen=True)
class BuiltBoxFiles:
    """Host-side files that a built box needs at boot time."""

    kernel: Path
    initrd: Path
    private_key: Path
    #: OpenSSH public host key of the image, for pinning the VM's host key.
    host_key: str


ProgressCallback = Callable[[images.BuildProgress], None]


# --- catalogue -------------------------------------------------------------------------------


def boxes_dir() -> Path:
    """Return the folder holding one sub-folder per VM target.

    NOTE: the default is the ``boxes`` folder of a source checkout; an installed wheel does
    not contain it, so set UPDATELAB_BOXES_DIR there.
    """
    return images.checkout_folder(BOXES_DIR_ENV, "boxes")


def known_targets() -> list[str]:
    """Return the sorted names of every folder in `boxes_dir` that contains a box.json."""
    return images.folders_containing(boxes_dir(), "box.json")


def load_definition(name: str) -> BoxDefinition:
    """Read and validate ``boxes/<name>/box.json``.

    Raises ConfigError for an unknown target (listing the known ones) or an invalid file.
    """
    known = known_targets()
    if name not in known:
        listed = ", ".join(known) if known else f"none, because {boxes_dir()} has no box.json files"
        raise ConfigError(f"unknown VM target {name!r}; known VM targets: {listed}")
    if not _TARGET_NAME.match(name):
        raise ConfigError(f"invalid VM target folder name {name!r}: use lower-case letters, digits, '.' and '-'")
    folder = boxes_dir() / name
    path = folder / "box.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"{path}: cannot read box definition: {error}") from error
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return parse_definition(name, folder, data, path)


def parse_definition(name: str, folder: Path, data: dict, path: Path) -> BoxDefinition:
    """Validate the JSON object of a box definition and return it; `path` is used in messages."""
    fields = {field.name: field for field in dataclasses.fields(BoxDefinition)}
    unknown = set(data) - set(fields) - {"name", "folder"}
    if unknown:
        raise ConfigError(f"{path}: unknown keys {', '.join(sorted(unknown))}")
    values: dict = {"name": name, "folder": folder}
    for key in ("description", "box", "add", "source", "guest", "service_manager", "agent"):
        value = data.get(key)
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{path}: missing or empty string {key!r}")
        values[key] = value

    for key in ("ssh_user", "suite", "arch"):
        if key in data:
            if not isinstance(data[key], str):
                raise ConfigError(f"{path}: {key!r} must be a string")
            values[key] = data[key]
    for key in ("memory_mib", "cpus"):
        if key in data:
            if not isinstance(data[key], int) or isinstance(data[key], bool) or data[key] < 1:
                raise ConfigError(f"{path}: {key!r} must be a positive whole number")
            values[key] = data[key]

    if "packages" in data:
        packages = data["packages"]
        if not isinstance(packages, list) or not all(isinstance(item, str) and item for item in packages):
            raise ConfigError(f"{path}: 'packages' must be a list of package names")
        values["packages"] = tuple(packages)

    if values["source"] not in SOURCES:
        raise ConfigError(f"{path}: invalid source {values['source']!r}; expected one of {', '.join(SOURCES)}")
    if values["guest"] not in GUESTS:
        raise ConfigError(f"{path}: invalid guest {values['guest']!r}; expected one of {', '.join(GUESTS)}")
    if values["source"] == "build" and not values.get("suite"):
        raise ConfigError(f"{path}: a box with source 'build' needs a Debian 'suite'")
    return BoxDefinition(**values)


# --- where things live -----------------------------------------------------------------------


def cache_dir() -> Path:
    """Return the folder of built box files and keys (``$XDG_CACHE_HOME/updatelab/boxes``)."""
    return images.rootfs_cache_dir().parent / "boxes"


def vagrant_home() -> Path:
    return Path(os.environ.get("VAGRANT_HOME") or Path.home() / ".vagrant.d")


def added_box_dir(box: str, provider: str = "libvirt") -> Path | None:
    """Return the unpacked folder of the newest added version of `box`, or None when it is not added."""
    root = vagrant_home() / "boxes" / box.replace("/", "-VAGRANTSLASH-")
    if not root.is_dir():
        return None
    versions = [entry for entry in root.iterdir() if (entry / provider / "metadata.json").is_file()]
    if not versions:
        return None
    return max(versions, key=lambda entry: _version_key(entry.name)) / provider


def _version_key(text: str) -> tuple:
    return tuple(int(part) if part.isdigit() else -1 for part in re.split(r"[.-]", text))


def pool_volume_prefix(box: str) -> str:
    """Return the name prefix of the libvirt volumes that vagrant-libvirt uploads for `box`."""
    # vagrant-libvirt 0.11 names the uploaded image <box with / as -VAGRANTSLASH->_vagrant_box_image_<version>_<file>.
    return box.replace("/", "-VAGRANTSLASH-") + "_vagrant_box_image_"


def built_box_files(definition: BoxDefinition, key: str) -> BuiltBoxFiles:
    folder = cache_dir() / definition.name
    host_key_path = folder / f"{key}.host_key.pub"
    return BuiltBoxFiles(
        kernel=KERNEL_DIR / f"updatelab-{definition.name}-{key}-vmlinuz",
        initrd=KERNEL_DIR / f"updatelab-{definition.name}-{key}-initrd.img",
        private_key=folder / "id_ed25519",
        host_key=host_key_path.read_text().strip() if host_key_path.is_file() else "",
    )


def box_status(definition: BoxDefinition) -> BoxStatus:
    """Return whether the target's box is added and usable, and if not, how to fix it."""
    folder = added_box_dir(definition.box)
    if folder is None:
        return BoxStatus(
            definition.name, definition.box, False,
            f"box {definition.box} for {definition.name} is not added; add it with `{definition.add}`",
        )
    if definition.source != "build":
        return BoxStatus(definition.name, definition.box, True)
    info_path = folder / BUILD_INFO
    try:
        info = json.loads(info_path.read_text())
    except (OSError, json.JSONDecodeError):
        return BoxStatus(
            definition.name, definition.box, False,
            f"box {definition.box} was not built by updatelab ({info_path} is missing); rebuild it with `{definition.add} --rebuild`",
        )
    key = str(info.get("key", ""))
    files = built_box_files(definition, key)
    missing = [str(path) for path in (files.kernel, files.initrd, files.private_key) if not path.is_file()]
    if missing:
        return BoxStatus(
            definition.name, definition.box, False,
            f"box {definition.box} is added but {', '.join(missing)} is missing; rebuild it with `{definition.add} --rebuild`",
            key,
        )
    return BoxStatus(definition.name, definition.box, True, "", key)


def require_box(definition: BoxDefinition) -> BoxStatus:
    """Return the box status, or raise PrerequisiteError naming the missing box and the command that adds it."""
    status = box_status(definition)
    if not status.present:
        raise PrerequisiteError(status.problem)
    return status


def box_metadata(virtual_size_gib: int) -> dict:
    """Return the metadata.json of a vagrant-libvirt box whose box.img is a qcow2 image."""
    return {"provider": "libvirt", "format": "qcow2", "virtual_size": virtual_size_gib}


def box_vagrantfile(definition: BoxDefinition, files: BuiltBoxFiles) -> str:
    """Return the Vagrantfile packed into a built box: direct kernel boot and the lab's SSH key."""
    return (
        "# Settings of the updatelab box " + definition.box + ", written by `updatelab boxes build`.\n"
        'Vagrant.configure("2") do |config|\n'
        f'  config.ssh.username = "{definition.ssh_user}"\n'
        f'  config.ssh.private_key_path = "{files.private_key}"\n'
        "  config.ssh.insert_key = false\n"
        + ('  config.ssh.sudo_command = "%c"\n' if definition.ssh_user == "root" else "")
        + 
        "  config.vm.provider :libvirt do |libvirt|\n"
        f'    libvirt.kernel = "{files.kernel}"\n'
        f'    libvirt.initrd = "{files.initrd}"\n'
        f'    libvirt.cmd_line = "{KERNEL_CMDLINE}"\n'
        '    libvirt.disk_bus = "virtio"\n'
        "  end\n"
        "end\n"
    )


# --- build -----------------------------------------------------------------------------------


def _rootfs_recipe(definition: BoxDefinition) -> images.Recipe:
    """Return the debootstrap recipe of a built box, for `lab.images`' root filesystem cache."""
    return images.Recipe(
        name=definition.name,
        folder=definition.folder,
        kind="debootstrap",
        description=definition.description,
        service_manager=definition.service_manager,
        arch=definition.arch,
        agent=definition.agent,
        suite=definition.suite,
        packages=definition.packages,
    )


def build_key(definition: BoxDefinition, rootfs_key: str) -> str:
    """Return the cache key of a built box: the root filesystem key plus the box build steps."""
    text = "\n".join([f"box-format={BOX_FORMAT}", rootfs_key, KERNEL_CMDLINE, definition.ssh_user])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def build(name: str, progress: ProgressCallback | None = None, rebuild: bool = False) -> BoxBuildResult:
    """Build the box of target `name` and add it to Vagrant, or reuse it when its key is unchanged.

    Raises ConfigError for an unknown target or one that is not built here, PrerequisiteError
    for a missing tool, and ImageBuildError naming the failing step and its output.
    """
    started = time.monotonic()
    definition = load_definition(name)
    if definition.source != "build":
        raise ConfigError(f"{name} is not built here; add its box with `{definition.add}`")

    def report(step: str, message: str) -> None:
        if progress is not None:
            progress(images.BuildProgress(name, step, message))

    _check_build_tools()
    recipe = _rootfs_recipe(definition)
    mirror = images.debian_mirror(recipe)
    rootfs_key = images._rootfs_key(recipe, mirror)
    key = build_key(definition, rootfs_key)

    status = box_status(definition)
    if status.present and status.key == key and not rebuild:
        report("done", f"reusing box {definition.box} (key {key})")
        return BoxBuildResult(name, definition.box, key, True, time.monotonic() - started)

    tarball = images.rootfs_cache_dir() / f"{recipe.suite}-{recipe.arch}-{rootfs_key}.tar"
    if rebuild or not tarball.is_file():
        images._debootstrap(recipe, mirror, tarball, report)
    else:
        report("debootstrap", f"reusing cached root filesystem {tarball}")

    folder = cache_dir() / name
    folder.mkdir(parents=True, exist_ok=True)
    private_key = _ensure_ssh_key(folder / "id_ed25519", report)
    box_file = folder / f"{name}-{key}.box"
    with tempfile.TemporaryDirectory(prefix=f"box-{name}-", dir=folder) as workdir:
        work = Path(workdir)
        root = work / "root"
        root.mkdir()
        report("unpack", f"unpacking {tarball.name}")
        _run_step(name, "unpack", ["tar", "--numeric-owner", "-xpf", str(tarball), "-C", str(root)])
        report("configure", "writing fstab, network, SSH key and hostname")
        host_key = configure_rootfs(root, definition.name, private_key.with_suffix(".pub").read_text(), definition.ssh_user)
        (folder / f"{key}.host_key.pub").write_text(host_key + "\n")
        kernel, initrd = _take_kernel(root, name)

        raw = work / "root.ext4"
        size_gib = _image_size_gib(root)
        report("mke2fs", f"creating a {size_gib} GiB ext4 image from the root filesystem")
        _run_step(name, "mke2fs", ["mke2fs", "-q", "-F", "-t", "ext4", "-L", "updatelab-root", "-d", str(root), str(raw), f"{size_gib}G"])
        report("qemu-img", "converting the image to qcow2")
        _run_step(name, "qemu-img", ["qemu-img", "convert", "-O", "qcow2", str(raw), str(work / "box.img")])
        raw.unlink()

        files = built_box_files(definition, key)
        KERNEL_DIR.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(kernel, files.kernel)
        shutil.copyfile(initrd, files.initrd)
        (work / "metadata.json").write_text(json.dumps(box_metadata(size_gib)) + "\n")
        (work / "Vagrantfile").write_text(box_vagrantfile(definition, files))
        (work / BUILD_INFO).write_text(json.dumps({"target": name, "key": key, "rootfs_key": rootfs_key, "built": int(time.time())}) + "\n")
        report("pack", f"packing {box_file.name}")
        partial = box_file.with_suffix(".box.partial")
        with tarfile.open(partial, "w") as archive:
            for member in ("metadata.json", "Vagrantfile", BUILD_INFO, "box.img"):
                archive.add(work / member, arcname=member)
        partial.replace(box_file)

    _remove_pool_volumes(definition.box, report)
    report("add", f"vagrant box add --force --name {definition.box} {box_file}")
    _run_step(name, "vagrant box add", ["vagrant", "box", "add", "--force", "--name", definition.box, str(box_file)], env=vagrant_environment())
    for old in folder.glob(f"{name}-*.box"):
        if old != box_file:
            old.unlink()
    seconds = time.monotonic() - started
    report("done", f"built box {definition.box} in {seconds:.0f} s")
    return BoxBuildResult(name, definition.box, key, False, seconds)


def vagrant_environment() -> dict[str, str]:
    """Return the environment for Vagrant commands: no update or version checks over the network."""
    environment = dict(os.environ)
    environment["VAGRANT_CHECKPOINT_DISABLE"] = "1"
    environment["VAGRANT_BOX_UPDATE_CHECK_DISABLE"] = "1"
    environment.setdefault("VAGRANT_DEFAULT_PROVIDER", "libvirt")
    return environment


def configure_rootfs(root: Path, hostname: str, public_key: str, ssh_user: str) -> str:
    """Prepare an unpacked Debian root filesystem to boot as a VM, and return its SSH host key.

    Writes fstab, the hostname, a systemd-networkd DHCP configuration, enables sshd and
    networkd, installs `public_key` for `ssh_user`, and empties /etc/machine-id so every VM
    gets its own (and so its own DHCP client id).
    """
    (root / "etc/fstab").write_text("/dev/vda / ext4 rw,errors=remount-ro 0 1\n")
    (root / "etc/hostname").write_text(hostname + "\n")
    (root / "etc/hosts").write_text(f"127.0.0.1 localhost\n127.0.1.1 {hostname}\n")
    network = root / "etc/systemd/network"
    network.mkdir(parents=True, exist_ok=True)
    # The guest takes only an address from DHCP. It needs no DNS or default route, because the
    # agent reaches the server at 127.0.0.1 through the SSH reverse forward.
    (network / "10-dhcp.network").write_text(
        "[Match]\nName=eth*\n\n[Network]\nDHCP=ipv4\nLinkLocalAddressing=no\n\n"
        "[DHCPv4]\nUseDNS=no\nUseRoutes=no\nUseNTP=no\n"
    )
    wants = root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    for unit, path in (
        ("systemd-networkd.service", "lib/systemd/system/systemd-networkd.service"),
        ("ssh.service", "lib/systemd/system/ssh.service"),
    ):
        link = wants / unit
        if not (root / path).is_file():
            raise ImageBuildError(f"{hostname}: step 'configure' failed: {path} is missing from the root filesystem")
        if not link.is_symlink():
            link.symlink_to("/" + path)
    (root / "etc/machine-id").write_text("")
    (root / "var/lib/dbus/machine-id").unlink(missing_ok=True)

    if ssh_user != "root":
        raise ImageBuildError(f"{hostname}: step 'configure' failed: built boxes log in as root, not {ssh_user!r}")
    ssh_dir = root / "root" / ".ssh"
    ssh_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    authorized = ssh_dir / "authorized_keys"
    authorized.write_text(public_key.strip() + "\n")
    authorized.chmod(0o600)

    host_keys = sorted((root / "etc/ssh").glob("ssh_host_ed25519_key.pub"))
    if not host_keys:
        raise ImageBuildError(f"{hostname}: step 'configure' failed: openssh-server left no ed25519 host key in /etc/ssh")
    return host_keys[0].read_text().strip()


def _take_kernel(root: Path, name: str) -> tuple[Path, Path]:
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    initrds = sorted((root / "boot").glob("initrd.img-*"))
    if not kernels or not initrds:
        raise ImageBuildError(
            f"{name}: step 'kernel' failed: /boot has no vmlinuz-* and initrd.img-* "
            "(is linux-image-amd64 in the box's packages?)"
        )
    return kernels[-1], initrds[-1]


def _image_size_gib(root: Path) -> int:
    """Return the disk size for `root`: its content plus 1.5 GiB free, rounded up to whole GiB."""
    used = 0
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            used += path.stat().st_size
    return max(2, -(-(used + 1536 * 1024**2) // 1024**3))


def _ensure_ssh_key(path: Path, report: Callable[[str, str], None]) -> Path:
    if not path.is_file():
        report("ssh-key", f"generating the box's SSH key {path}")
        _run_step("ssh-key", "ssh-keygen", ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "updatelab-box", "-f", str(path)])
    return path


def _check_build_tools() -> None:
    missing = [tool for tool in ("mke2fs", "qemu-img", "vagrant", "debootstrap", "ssh-keygen") if _which(tool) is None]
    if missing:
        raise PrerequisiteError(f"missing {', '.join(missing)}; install them with `sh scripts/ensure-vagrant.sh` (as root)")
    if os.geteuid() != 0:
        raise PrerequisiteError("building a box runs debootstrap and writes to /var/lib/libvirt/boot; rerun as root")


def _which(tool: str) -> str | None:
    return shutil.which(tool) or next((f"{d}/{tool}" for d in ("/usr/sbin", "/sbin") if os.access(f"{d}/{tool}", os.X_OK)), None)


def _run_step(name: str, step: str, command: list[str], env: dict[str, str] | None = None) -> None:
    # Vagrant writes a .vagrant folder into its working directory, so run everything from the cache.
    cache_dir().mkdir(parents=True, exist_ok=True)
    result = subprocess.run(command, capture_output=True, text=True, errors="replace", env=env, cwd=cache_dir())
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).rstrip().splitlines()[-20:])
        raise ImageBuildError(f"{name}: step {step!r} failed with exit status {result.returncode}: {' '.join(command)}\n{tail}")


def _remove_pool_volumes(box: str, report: Callable[[str, str], None]) -> None:
    """Delete the images of `box` that vagrant-libvirt uploaded to a storage pool before.

    vagrant-libvirt reuses an uploaded image whose name matches, and a rebuilt box keeps its
    name and version, so a stale image would otherwise boot instead of the new one.
    """
    from lab.providers import libvirt_util

    for pool, volume in libvirt_util.volumes_with_prefix(pool_volume_prefix(box)):
        report("add", f"removing the old uploaded image {pool}/{volume}")
        libvirt_util.delete_volume(pool, volume)


def list_boxes() -> list[BoxStatus]:
    """Return the status of every VM target's box."""
    return [box_status(load_definition(name)) for name in known_targets()]


def remove(name: str) -> list[str]:
    """Remove the box of `name` from Vagrant and its uploaded images from libvirt; return what was removed."""
    from lab.providers import libvirt_util

    definition = load_definition(name)
    removed = []
    if added_box_dir(definition.box) is not None:
        _run_step(name, "vagrant box remove", ["vagrant", "box", "remove", "--force", "--all", definition.box], env=vagrant_environment())
        removed.append(f"box {definition.box}")
    for pool, volume in libvirt_util.volumes_with_prefix(pool_volume_prefix(definition.box)):
        libvirt_util.delete_volume(pool, volume)
        removed.append(f"volume {pool}/{volume}")
    return removed
