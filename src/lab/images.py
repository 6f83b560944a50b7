"""The catalogue of target images and the builder that turns a recipe into a Docker image.

Each target is a folder ``images/<target>/`` with a ``recipe.toml`` and a ``Dockerfile``.
Two kinds of recipe exist:

``debootstrap``
    Built with no container registry. debootstrap creates a minimal Debian root filesystem,
    cached as a tarball under ``~/.cache/updatelab/rootfs``. ``docker import`` turns the
    tarball into a base image, and ``docker build`` adds the recipe's Dockerfile on top of it
    with networking disabled.
``registry``
    The Dockerfile starts ``FROM`` an image in a container registry (``ubuntu:14.04``,
    ``centos:7`` and so on). These build only when the base image is already present
    locally, or when the user opts in with ``UPDATELAB_REGISTRY=1`` (or ``registry=True``)
    because a registry is reachable. The lab never probes a registry on its own.

Final images are tagged ``updatelab/<target>:latest`` and labelled with the hash of the
recipe folder, so an unchanged recipe reuses the image and a changed one rebuilds it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterable
from pathlib import Path

import docker
import docker.errors

from lab.errors import ConfigError, ImageBuildError, PrerequisiteError, ProviderError

#: Environment variable that overrides the folder holding the recipes.
IMAGES_DIR_ENV = "UPDATELAB_IMAGES_DIR"
#: Environment variable that, set to 1, allows builds that pull from a container registry.
REGISTRY_ENV = "UPDATELAB_REGISTRY"
#: Environment variable that overrides the Debian mirror found in the host's apt sources.
MIRROR_ENV = "UPDATELAB_DEBIAN_MIRROR"

IMAGE_REPOSITORY_PREFIX = "updatelab/"
BASE_REPOSITORY_PREFIX = "updatelab-base/"
LABEL_TARGET = "updatelab.target"
LABEL_RECIPE_HASH = "updatelab.recipe-hash"
LABEL_ROOTFS_KEY = "updatelab.rootfs-key"

#: Builds stop before they start when less than this much disk space is free.
MIN_FREE_BYTES = 2 * 1024**3

RECIPE_KINDS = ("debootstrap", "registry")
SERVICE_MANAGERS = ("systemd", "sysvinit", "openrc", "runit", "upstart", "procd")

#: Bump when the way a root filesystem tarball is made changes, so old cached tarballs are not reused.
ROOTFS_FORMAT = 2

_TARGET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]*$")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One target's recipe, read from ``images/<name>/recipe.toml``."""

    name: str
    folder: Path
    kind: str
    description: str
    service_manager: str
    arch: str
    #: Agent binary in the meshcentral package's ``agents`` folder that runs on this target.
    agent: str
    #: Debian suite for debootstrap recipes, such as ``bookworm``; empty for registry recipes.
    suite: str = ""
    #: Packages that debootstrap adds to its minbase variant.
    packages: tuple[str, ...] = ()
    #: Packages installed with apt-get in a chroot after debootstrap. debootstrap's resolver
    #: always takes the first alternative of a dependency, so a package such as openrc, which
    #: conflicts with that first alternative (sysv-rc), must be installed this way.
    apt_packages: tuple[str, ...] = ()
    #: Debian mirror from the recipe; empty means "take it from the host's apt sources".
    mirror: str = ""
    #: Image named in the Dockerfile's FROM line of a registry recipe.
    base_image: str = ""

    @property
    def tag(self) -> str:
        return image_tag(self.name)


@dataclasses.dataclass(frozen=True)
class BuildProgress:
    """One progress event of a build, passed to the `progress` callback."""

    target: str
    #: One of ``check``, ``debootstrap``, ``import``, ``build`` and ``done``.
    step: str
    message: str


ProgressCallback = Callable[[BuildProgress], None]


@dataclasses.dataclass(frozen=True)
class BuildResult:
    """Outcome of `build` for one target."""

    target: str
    tag: str
    image_id: str
    #: True when an image with the same recipe hash already existed and was reused.
    cached: bool
    seconds: float


@dataclasses.dataclass(frozen=True)
class SkippedBuild:
    """A target that `build_targets` did not build, and why."""

    target: str
    reason: str


@dataclasses.dataclass(frozen=True)
class ImageInfo:
    """One updatelab image present in the Docker engine."""

    target: str
    tag: str
    image_id: str
    recipe_hash: str
    #: False when the recipe changed since the image was built, or the recipe no longer exists.
    up_to_date: bool
    created: str
    size_bytes: int


# --- catalogue -------------------------------------------------------------------------------


def images_dir() -> Path:
    """Return the folder holding one sub-folder per target.

    NOTE: the default is the ``images`` folder of a source checkout; an installed wheel does
    not contain it, so set UPDATELAB_IMAGES_DIR there.
    """
    return checkout_folder(IMAGES_DIR_ENV, "images")


def checkout_folder(environment_variable: str, name: str) -> Path:
    """Return the folder that `environment_variable` names, or else folder `name` of the source checkout."""
    override = os.environ.get(environment_variable)
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[2] / name


def folders_containing(folder: Path, file_name: str) -> list[str]:
    """Return the sorted names of the sub-folders of `folder` that contain `file_name`."""
    if not folder.is_dir():
        return []
    return sorted(entry.name for entry in folder.iterdir() if (entry / file_name).is_file())


def known_targets() -> list[str]:
    """Return the sorted names of every folder in `images_dir` that contains a recipe.toml."""
    return folders_containing(images_dir(), "recipe.toml")


def image_tag(name: str) -> str:
    return f"{IMAGE_REPOSITORY_PREFIX}{name}:latest"


def load_recipe(name: str) -> Recipe:
    """Read and validate ``images/<name>/recipe.toml``.

    Raises ConfigError for an unknown target (listing the known ones) or an invalid recipe.
    """
    known = known_targets()
    if name not in known:
        listed = ", ".join(known) if known else f"none, because {images_dir()} has no recipes"
        raise ConfigError(f"unknown target {name!r}; known targets: {listed}")
    if not _TARGET_NAME.match(name):
        raise ConfigError(f"invalid target folder name {name!r}: use lower-case letters, digits, '.' and '-'")

    folder = images_dir() / name
    path = folder / "recipe.toml"
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise ConfigError(f"{path}: cannot read recipe: {error}") from error
    if not (folder / "Dockerfile").is_file():
        raise ConfigError(f"{folder}: missing Dockerfile next to recipe.toml")

    kind = _recipe_string(path, data, "kind", required=True)
    if kind not in RECIPE_KINDS:
        raise ConfigError(f"{path}: invalid kind {kind!r}; expected one of {', '.join(RECIPE_KINDS)}")
    service_manager = _recipe_string(path, data, "service_manager", required=True)
    if service_manager not in SERVICE_MANAGERS:
        raise ConfigError(
            f"{path}: invalid service_manager {service_manager!r}; expected one of {', '.join(SERVICE_MANAGERS)}"
        )

    packages = _recipe_string_list(path, data, "packages")
    apt_packages = _recipe_string_list(path, data, "apt_packages")

    recipe = Recipe(
        name=name,
        folder=folder,
        kind=kind,
        description=_recipe_string(path, data, "description", required=True),
        service_manager=service_manager,
        arch=_recipe_string(path, data, "arch", required=True),
        agent=_recipe_string(path, data, "agent", required=True),
        suite=_recipe_string(path, data, "suite", required=kind == "debootstrap"),
        packages=packages,
        apt_packages=apt_packages,
        mirror=_recipe_string(path, data, "mirror", required=False),
        base_image=_recipe_string(path, data, "base_image", required=kind == "registry"),
    )
    unknown_keys = set(data) - {field.name for field in dataclasses.fields(Recipe)}
    if unknown_keys:
        raise ConfigError(f"{path}: unknown keys {', '.join(sorted(unknown_keys))}")
    return recipe


def _recipe_string(path: Path, data: dict, key: str, *, required: bool) -> str:
    value = data.get(key, "")
    if not isinstance(value, str):
        raise ConfigError(f"{path}: {key!r} must be a string, not {type(value).__name__}")
    if required and not value:
        raise ConfigError(f"{path}: missing required key {key!r}")
    return value


def _recipe_string_list(path: Path, data: dict, key: str) -> tuple[str, ...]:
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise ConfigError(f"{path}: {key!r} must be a list of package names")
    return tuple(value)


def recipe_hash(name: str) -> str:
    """Return the SHA-256 of every file in the recipe folder: relative paths and contents."""
    folder = load_recipe(name).folder
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        relative = path.relative_to(folder).as_posix().encode()
        digest.update(len(relative).to_bytes(4, "big") + relative)
        content = path.read_bytes()
        digest.update(len(content).to_bytes(8, "big") + content)
    return digest.hexdigest()


def registry_enabled() -> bool:
    """Return whether the user allowed pulls from a container registry (UPDATELAB_REGISTRY=1)."""
    return os.environ.get(REGISTRY_ENV, "").strip().lower() in ("1", "true", "yes")


def unbuildable_reason(name: str, *, registry: bool | None = None, client: docker.DockerClient | None = None) -> str | None:
    """Return why `name` cannot be built here, or None when it can.

    Only registry recipes can be unbuildable: their base image must be present locally, or
    `registry` (default: `registry_enabled()`) must allow pulling it. No network probe is made.
    """
    recipe = load_recipe(name)
    if recipe.kind != "registry":
        return None
    if registry is None:
        registry = registry_enabled()
    if registry:
        return None
    client = client or _connect()
    try:
        client.images.get(recipe.base_image)
    except docker.errors.ImageNotFound:
        return (
            f"{name} needs the base image {recipe.base_image} from a container registry, which is not "
            f"present locally; no registry is assumed reachable, so it cannot be built here. "
            f"Load the image with `docker load`, or set {REGISTRY_ENV}=1 where a registry is reachable."
        )
    return None


# --- building --------------------------------------------------------------------------------


def build(
    name: str,
    progress: ProgressCallback | None = None,
    rebuild: bool = False,
    *,
    registry: bool | None = None,
    client: docker.DockerClient | None = None,
) -> BuildResult:
    """Build the image of target `name`, or reuse it when its recipe hash is unchanged.

    `rebuild` forces a new debootstrap run and image build even when cached ones exist.
    Raises ConfigError for an unknown target, PrerequisiteError when the target cannot be
    built here (see `unbuildable_reason`) or disk space is short, and ImageBuildError with
    the failing step and the tail of its log when a step fails.
    """
    started = time.monotonic()
    report = _progress_reporter(name, progress)
    recipe = load_recipe(name)
    client = client or _connect()
    expected_hash = recipe_hash(name)

    existing = _find_image(client, recipe.tag)
    if not rebuild:
        if existing is not None and existing.labels.get(LABEL_RECIPE_HASH) == expected_hash:
            report("done", f"reusing {recipe.tag} (recipe unchanged)")
            return BuildResult(name, recipe.tag, existing.id, True, time.monotonic() - started)

    reason = unbuildable_reason(name, registry=registry, client=client)
    if reason is not None:
        raise PrerequisiteError(reason)
    report("check", "checking free disk space")
    _check_free_space(client)

    build_args: dict[str, str] = {}
    if recipe.kind == "debootstrap":
        base_tag = _ensure_base_image(client, recipe, rebuild=rebuild, report=report)
        build_args["BASE"] = base_tag
        # The base image already contains every package, so the final layer needs no network.
        network_mode = "none"
    else:
        network_mode = None

    image_id = _docker_build(client, recipe, expected_hash, build_args, network_mode, rebuild, report)
    _remove_superseded_images(client, recipe, keep={image_id, build_args.get("BASE", "")}, previous=existing)
    seconds = time.monotonic() - started
    report("done", f"built {recipe.tag} in {seconds:.0f} s")
    return BuildResult(name, recipe.tag, image_id, False, seconds)


def build_targets(
    names: Iterable[str] | None = None,
    progress: ProgressCallback | None = None,
    rebuild: bool = False,
    *,
    registry: bool | None = None,
    client: docker.DockerClient | None = None,
) -> list[BuildResult | SkippedBuild]:
    """Build several targets (default: all known), skipping those that cannot be built here.

    Unknown names raise ConfigError before anything is built; build failures are raised.
    """
    selected = list(names) if names is not None else known_targets()
    for name in selected:
        load_recipe(name)
    client = client or _connect()
    outcomes: list[BuildResult | SkippedBuild] = []
    for name in selected:
        reason = unbuildable_reason(name, registry=registry, client=client)
        if reason is not None:
            _progress_reporter(name, progress)("done", f"skipped: {reason}")
            outcomes.append(SkippedBuild(name, reason))
            continue
        outcomes.append(build(name, progress, rebuild, registry=registry, client=client))
    return outcomes


def list_images(client: docker.DockerClient | None = None) -> list[ImageInfo]:
    """Return the final updatelab images present in Docker, sorted by target name."""
    client = client or _connect()
    known = set(known_targets())
    infos = []
    for image in client.images.list(filters={"label": LABEL_TARGET}):
        target = image.labels.get(LABEL_TARGET, "")
        tag = image_tag(target)
        if tag not in image.tags:
            continue  # a base image or an untagged, superseded build
        current_hash = recipe_hash(target) if target in known else None
        built_hash = image.labels.get(LABEL_RECIPE_HASH, "")
        infos.append(
            ImageInfo(
                target=target,
                tag=tag,
                image_id=image.id,
                recipe_hash=built_hash,
                up_to_date=current_hash == built_hash,
                created=image.attrs.get("Created", ""),
                size_bytes=int(image.attrs.get("Size", 0)),
            )
        )
    return sorted(infos, key=lambda info: info.target)


def remove(name: str, client: docker.DockerClient | None = None) -> list[str]:
    """Remove the final and base images of target `name`; return the removed tags.

    Removing a target with no images returns an empty list. The cached rootfs tarball stays.
    Raises ProviderError when a container still uses the image.
    """
    client = client or _connect()
    removed = []
    images = client.images.list(filters={"label": f"{LABEL_TARGET}={name}"})
    # Final images first: they are children of the base images.
    images.sort(key=lambda image: 0 if image_tag(name) in image.tags else 1)
    for image in images:
        names = image.tags or [image.id]
        try:
            client.images.remove(image.id, force=False)
        except docker.errors.ImageNotFound:
            continue
        except docker.errors.APIError as error:
            raise ProviderError(
                f"cannot remove image {', '.join(names)}: {error.explanation or error}; "
                f"remove the containers that use it first (`updatelab clean`)"
            ) from error
        removed.extend(names)
    return removed


def rootfs_cache_dir() -> Path:
    """Return the folder of cached root filesystem tarballs (``$XDG_CACHE_HOME/updatelab/rootfs``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "updatelab" / "rootfs"


def debian_mirror(recipe: Recipe | None = None) -> str:
    """Return the Debian mirror for debootstrap.

    The order is: UPDATELAB_DEBIAN_MIRROR, the recipe's `mirror`, then the first non-security
    ``deb`` source in the host's /etc/apt/sources.list.d/*.sources and /etc/apt/sources.list.
    """
    override = os.environ.get(MIRROR_ENV)
    if override:
        return override.rstrip("/")
    if recipe is not None and recipe.mirror:
        return recipe.mirror.rstrip("/")
    mirror = _mirror_from_apt_sources(Path("/etc/apt"))
    if mirror is None:
        raise ConfigError(
            "no Debian mirror found in /etc/apt/sources.list.d/*.sources or /etc/apt/sources.list; "
            f"set {MIRROR_ENV} or the recipe's 'mirror' key"
        )
    return mirror


def _mirror_from_apt_sources(apt_dir: Path) -> str | None:
    uris: list[str] = []
    sources_dir = apt_dir / "sources.list.d"
    for path in sorted(sources_dir.glob("*.sources")) if sources_dir.is_dir() else []:
        for stanza in re.split(r"\n\s*\n", path.read_text(encoding="utf-8", errors="replace")):
            fields = _parse_deb822_stanza(stanza)
            if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes") == "no":
                continue
            uris.extend(fields.get("uris", "").split())
    one_line_files = [apt_dir / "sources.list"]
    if sources_dir.is_dir():
        one_line_files += sorted(sources_dir.glob("*.list"))
    for path in one_line_files:
        if not path.is_file():
            continue
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
            if len(words) >= 3 and words[0] == "deb":
                uris.append(words[1])
    for uri in uris:
        if "security" not in uri and uri.startswith(("http://", "https://")):
            return uri.rstrip("/")
    return None


def _parse_deb822_stanza(stanza: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    key = None
    for line in stanza.splitlines():
        if not line or line.startswith("#"):
            continue
        if line[0].isspace() and key is not None:
            fields[key] += " " + line.strip()
        elif ":" in line:
            key, value = line.split(":", 1)
            key = key.strip().lower()
            fields[key] = value.strip()
    return fields


def _progress_reporter(name: str, progress: ProgressCallback | None) -> Callable[[str, str], None]:
    def report(step: str, message: str) -> None:
        if progress is not None:
            progress(BuildProgress(name, step, message))

    return report


def _connect() -> docker.DockerClient:
    from lab.providers.docker import connect

    return connect()


def _find_image(client: docker.DockerClient, reference: str):
    try:
        return client.images.get(reference)
    except docker.errors.ImageNotFound:
        return None


def _check_free_space(client: docker.DockerClient) -> None:
    """Raise PrerequisiteError when Docker's data root or the rootfs cache has under 2 GiB free."""
    paths = [rootfs_cache_dir()]
    docker_root = client.info().get("DockerRootDir")
    if docker_root:
        paths.append(Path(docker_root))
    for path in paths:
        existing = path
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        try:
            free = shutil.disk_usage(existing).free
        except OSError:
            # NOTE: a remote Docker engine's data root is not visible here, so it is not checked.
            continue
        if free < MIN_FREE_BYTES:
            raise PrerequisiteError(
                f"only {free / 1024**3:.1f} GiB free at {existing} ({path}); building images needs at "
                f"least {MIN_FREE_BYTES / 1024**3:.0f} GiB. Free space there, for example with "
                f"`docker image prune` or by deleting {rootfs_cache_dir()}"
            )


def _remove_superseded_images(client: docker.DockerClient, recipe: Recipe, keep: set[str], previous) -> None:
    """Remove the replaced final image and base images of older rootfs keys; keep any still in use."""
    candidates = []
    if previous is not None and previous.id not in keep:
        candidates.append(previous.id)
    for image in client.images.list(name=f"{BASE_REPOSITORY_PREFIX}{recipe.name}"):
        if not keep.intersection(image.tags):
            candidates.append(image.id)
    for image_id in candidates:
        try:
            client.images.remove(image_id, force=False, noprune=False)
        except docker.errors.APIError:
            # Still used by a container or by another tag: leave it for `docker image prune`.
            continue


def _rootfs_key(recipe: Recipe, mirror: str) -> str:
    text = "\n".join(
        [f"format={ROOTFS_FORMAT}", recipe.suite, recipe.arch, "minbase", mirror, *sorted(recipe.packages), "apt", *recipe.apt_packages]
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _ensure_base_image(
    client: docker.DockerClient, recipe: Recipe, *, rebuild: bool, report: Callable[[str, str], None]
) -> str:
    """Return the tag of the imported debootstrap base image, creating the tarball and image if needed."""
    mirror = debian_mirror(recipe)
    key = _rootfs_key(recipe, mirror)
    base_tag = f"{BASE_REPOSITORY_PREFIX}{recipe.name}:{key}"
    if not rebuild and _find_image(client, base_tag) is not None:
        report("import", f"reusing base image {base_tag}")
        return base_tag

    tarball = rootfs_cache_dir() / f"{recipe.suite}-{recipe.arch}-{key}.tar"
    if rebuild or not tarball.is_file():
        _debootstrap(recipe, mirror, tarball, report)
    else:
        report("debootstrap", f"reusing cached root filesystem {tarball}")

    report("import", f"importing {tarball.name} as {base_tag}")
    repository, tag = base_tag.rsplit(":", 1)
    # Images carry no `updatelab` or `updatelab.run` label: containers inherit image labels,
    # and `clean` removes every container that has them.
    changes = [
        f"LABEL {LABEL_TARGET}={recipe.name}",
        f"LABEL {LABEL_ROOTFS_KEY}={key}",
    ]
    try:
        client.api.import_image_from_file(str(tarball), repository=repository, tag=tag, changes=changes)
    except docker.errors.APIError as error:
        raise ImageBuildError(f"{recipe.name}: step 'import' failed: docker import of {tarball}: {error}") from error
    if _find_image(client, base_tag) is None:
        raise ImageBuildError(f"{recipe.name}: step 'import' failed: {base_tag} is missing after docker import of {tarball}")
    return base_tag


def _debootstrap(recipe: Recipe, mirror: str, tarball: Path, report: Callable[[str, str], None]) -> None:
    """Run debootstrap into a temporary folder and pack the result into `tarball`."""
    debootstrap = shutil.which("debootstrap") or ("/usr/sbin/debootstrap" if Path("/usr/sbin/debootstrap").exists() else None)
    if debootstrap is None:
        raise PrerequisiteError("debootstrap is missing; install it with scripts/ensure-docker.sh or `apt-get install debootstrap`")
    if os.geteuid() != 0:
        raise PrerequisiteError(f"debootstrap must run as root to build {recipe.name}; rerun the build as root")

    tarball.parent.mkdir(parents=True, exist_ok=True)
    # Downloaded .deb files are kept per suite and architecture, so a recipe that only adds a
    # package downloads just that package again.
    deb_cache = tarball.parent.parent / "debs" / f"{recipe.suite}-{recipe.arch}"
    deb_cache.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix=f"rootfs-{recipe.name}-", dir=tarball.parent) as workdir:
        root = Path(workdir) / "root"
        command = [
            debootstrap,
            "--variant=minbase",
            f"--arch={recipe.arch}",
            f"--cache-dir={deb_cache}",
        ]
        if recipe.packages:
            command.append("--include=" + ",".join(recipe.packages))
        command += [recipe.suite, str(root), mirror]
        report("debootstrap", f"debootstrap {recipe.suite}/{recipe.arch} from {mirror}")
        output = _run_streaming(command, lambda line: report("debootstrap", line))
        if output.returncode != 0:
            detail = _tail(output.text)
            log = root / "debootstrap" / "debootstrap.log"
            if log.is_file():
                detail += f"\n--- {log} ---\n" + _tail(log.read_text(errors="replace"))
            raise ImageBuildError(
                f"{recipe.name}: step 'debootstrap' failed with exit status {output.returncode}: "
                f"{' '.join(command)}\n{detail}"
            )

        if recipe.apt_packages:
            _apt_install_in_chroot(recipe, root, deb_cache, report)

        # Package lists and downloaded archives only make the image bigger.
        for leftover in ("var/lib/apt/lists", "var/cache/apt", "var/cache/apt/archives"):
            for entry in (root / leftover).glob("*"):
                if entry.is_file():
                    entry.unlink()

        report("debootstrap", f"packing root filesystem into {tarball}")
        partial = tarball.with_suffix(".tar.partial")
        packed = subprocess.run(
            ["tar", "--numeric-owner", "--xattrs", "-C", str(root), "-cf", str(partial), "."],
            capture_output=True,
            text=True,
        )
        if packed.returncode != 0:
            partial.unlink(missing_ok=True)
            raise ImageBuildError(f"{recipe.name}: step 'pack rootfs' failed: tar exited {packed.returncode}\n{_tail(packed.stderr)}")
        partial.replace(tarball)


def _apt_install_in_chroot(recipe: Recipe, root: Path, deb_cache: Path, report: Callable[[str, str], None]) -> None:
    """Install `recipe.apt_packages` with apt-get inside the debootstrapped `root`."""
    # policy-rc.d exiting with status 101 makes maintainer scripts skip starting services in the chroot.
    policy = root / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    archives = root / "var/cache/apt/archives"
    shell = (
        "apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -q -y --no-install-recommends "
        + " ".join(recipe.apt_packages)
    )
    command = ["chroot", str(root), "/bin/sh", "-c", shell]
    report("debootstrap", f"apt-get install {' '.join(recipe.apt_packages)} in the chroot")
    try:
        # Reuse debootstrap's download cache, so a rebuild downloads only what changed.
        for deb in deb_cache.glob("*.deb"):
            target = archives / deb.name
            if not target.exists():
                shutil.copy2(deb, target)
        output = _run_streaming(command, lambda line: report("debootstrap", line))
        for deb in archives.glob("*.deb"):
            if not (deb_cache / deb.name).exists():
                shutil.copy2(deb, deb_cache / deb.name)
    finally:
        policy.unlink(missing_ok=True)
    if output.returncode != 0:
        raise ImageBuildError(
            f"{recipe.name}: step 'apt-get install' failed with exit status {output.returncode}: {shell}\n{_tail(output.text)}"
        )


@dataclasses.dataclass
class _CommandOutput:
    returncode: int
    text: str


def _run_streaming(command: list[str], on_line: Callable[[str], None]) -> _CommandOutput:
    lines: list[str] = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace") as process:
        assert process.stdout is not None
        for line in process.stdout:
            line = line.rstrip("\n")
            lines.append(line)
            on_line(line)
    return _CommandOutput(process.returncode, "\n".join(lines))


def _docker_build(
    client: docker.DockerClient,
    recipe: Recipe,
    expected_hash: str,
    build_args: dict[str, str],
    network_mode: str | None,
    rebuild: bool,
    report: Callable[[str, str], None],
) -> str:
    """Run ``docker build`` on the recipe folder and return the new image id."""
    labels = {LABEL_TARGET: recipe.name, LABEL_RECIPE_HASH: expected_hash}
    log: list[str] = []
    step = "build"
    image_id = None
    report("build", f"docker build {recipe.folder}")
    try:
        stream = client.api.build(
            path=str(recipe.folder),
            tag=recipe.tag,
            buildargs=build_args,
            labels=labels,
            network_mode=network_mode,
            rm=True,
            forcerm=True,
            nocache=rebuild,
            pull=False,
            decode=True,
        )
        for chunk in stream:
            if "stream" in chunk:
                for line in chunk["stream"].splitlines():
                    if not line.strip():
                        continue
                    log.append(line)
                    if line.startswith("Step "):
                        step = line
                    report("build", line)
            if "error" in chunk:
                log.append(chunk["error"])
                raise ImageBuildError(
                    f"{recipe.name}: docker build failed at {step!r}: {chunk['error'].strip()}\n{_tail(chr(10).join(log))}"
                )
            if "aux" in chunk and "ID" in chunk["aux"]:
                image_id = chunk["aux"]["ID"]
    except docker.errors.APIError as error:
        raise ImageBuildError(f"{recipe.name}: docker build failed at {step!r}: {error}\n{_tail(chr(10).join(log))}") from error

    image = _find_image(client, recipe.tag)
    if image is None or (image_id is not None and image.id != image_id):
        raise ImageBuildError(f"{recipe.name}: docker build finished but {recipe.tag} is missing\n{_tail(chr(10).join(log))}")
    return image.id


def _tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


if __name__ == "__main__":  # pragma: no cover - a manual entry point until the CLI wraps it
    for result in build_targets(sys.argv[1:] or None, progress=lambda event: print(f"[{event.target}] {event.step}: {event.message}", flush=True)):
        print(result)
