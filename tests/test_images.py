"""Tests of the image catalogue: recipe loading, validation, hashing and registry handling.

These tests need no Docker engine, except `unbuildable_reason` for a registry target, which
asks the engine whether the base image is present and is skipped when Docker is unreachable.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lab import images
from lab.errors import ConfigError, PrerequisiteError

REPO_IMAGES = Path(__file__).resolve().parents[1] / "images"

OFFLINE_TARGETS = [
    "debian12-systemd",
    "debian13-systemd",
    "debian12-sysvinit",
    "debian12-openrc",
    "debian12-runit",
    "debian12-i386-systemd",
]
REGISTRY_TARGETS = ["ubuntu1404-upstart", "centos7-systemd", "alpine-openrc", "openwrt-procd"]


@pytest.fixture
def images_copy(tmp_path, monkeypatch) -> Path:
    """A writable copy of the repository's images folder, used as the catalogue."""
    copy = tmp_path / "images"
    shutil.copytree(REPO_IMAGES, copy)
    monkeypatch.setenv(images.IMAGES_DIR_ENV, str(copy))
    return copy


def test_known_targets_lists_all_recipes():
    targets = images.known_targets()
    for name in OFFLINE_TARGETS + REGISTRY_TARGETS:
        assert name in targets
    assert targets == sorted(targets)


@pytest.mark.parametrize("name", OFFLINE_TARGETS)
def test_offline_recipe_loads(name):
    recipe = images.load_recipe(name)
    assert recipe.kind == "debootstrap"
    assert recipe.suite in ("bookworm", "trixie")
    assert "procps" in recipe.packages, "the agent installer runs ps"
    assert recipe.service_manager in images.SERVICE_MANAGERS
    assert recipe.tag == f"updatelab/{name}:latest"
    assert (recipe.folder / "Dockerfile").is_file()


@pytest.mark.parametrize("name", REGISTRY_TARGETS)
def test_registry_recipe_loads(name):
    recipe = images.load_recipe(name)
    assert recipe.kind == "registry"
    assert recipe.base_image
    dockerfile = (recipe.folder / "Dockerfile").read_text()
    assert f"FROM {recipe.base_image}" in dockerfile


def test_i386_recipe_uses_32_bit_agent():
    recipe = images.load_recipe("debian12-i386-systemd")
    assert recipe.arch == "i386"
    assert recipe.agent == "meshagent_x86"


def test_unknown_target_lists_known_names():
    with pytest.raises(ConfigError) as caught:
        images.load_recipe("no-such-target")
    message = str(caught.value)
    assert "no-such-target" in message
    for name in OFFLINE_TARGETS:
        assert name in message


def test_build_unknown_target_raises_config_error():
    with pytest.raises(ConfigError):
        images.build("no-such-target")


def test_recipe_hash_is_stable():
    assert images.recipe_hash("debian12-systemd") == images.recipe_hash("debian12-systemd")


def test_recipe_hash_changes_with_recipe(images_copy):
    before = images.recipe_hash("debian12-systemd")
    recipe_file = images_copy / "debian12-systemd" / "recipe.toml"
    recipe_file.write_text(recipe_file.read_text().replace('"procps"', '"procps", "less"'))
    assert images.recipe_hash("debian12-systemd") != before


def test_recipe_hash_changes_with_dockerfile(images_copy):
    before = images.recipe_hash("debian12-sysvinit")
    dockerfile = images_copy / "debian12-sysvinit" / "Dockerfile"
    dockerfile.write_text(dockerfile.read_text() + "\n# changed\n")
    assert images.recipe_hash("debian12-sysvinit") != before


def test_recipe_hash_changes_with_new_file(images_copy):
    before = images.recipe_hash("debian12-runit")
    (images_copy / "debian12-runit" / "extra.conf").write_text("x=1\n")
    assert images.recipe_hash("debian12-runit") != before


def test_recipe_hash_differs_between_targets():
    assert images.recipe_hash("debian12-systemd") != images.recipe_hash("debian13-systemd")


def test_invalid_kind_rejected(images_copy):
    recipe_file = images_copy / "debian12-systemd" / "recipe.toml"
    recipe_file.write_text(recipe_file.read_text().replace('kind = "debootstrap"', 'kind = "iso"'))
    with pytest.raises(ConfigError, match="invalid kind 'iso'"):
        images.load_recipe("debian12-systemd")


def test_missing_suite_rejected(images_copy):
    recipe_file = images_copy / "debian12-systemd" / "recipe.toml"
    recipe_file.write_text(recipe_file.read_text().replace('suite = "bookworm"\n', ""))
    with pytest.raises(ConfigError, match="missing required key 'suite'"):
        images.load_recipe("debian12-systemd")


def test_unknown_key_rejected(images_copy):
    recipe_file = images_copy / "debian12-systemd" / "recipe.toml"
    recipe_file.write_text(recipe_file.read_text() + 'colour = "blue"\n')
    with pytest.raises(ConfigError, match="unknown keys colour"):
        images.load_recipe("debian12-systemd")


def test_missing_dockerfile_rejected(images_copy):
    (images_copy / "debian12-systemd" / "Dockerfile").unlink()
    with pytest.raises(ConfigError, match="missing Dockerfile"):
        images.load_recipe("debian12-systemd")


def test_invalid_toml_rejected(images_copy):
    (images_copy / "debian12-systemd" / "recipe.toml").write_text("kind = [\n")
    with pytest.raises(ConfigError, match="cannot read recipe"):
        images.load_recipe("debian12-systemd")


def test_mirror_from_deb822_sources(tmp_path):
    sources = tmp_path / "sources.list.d"
    sources.mkdir()
    (sources / "debian.sources").write_text(
        "Types: deb\n"
        "URIs: http://mirror.example.test/debian\n"
        "Suites: bookworm bookworm-updates\n"
        "Components: main\n"
        "\n"
        "Types: deb\n"
        "URIs: http://mirror.example.test/debian-security\n"
        "Suites: bookworm-security\n"
    )
    assert images._mirror_from_apt_sources(tmp_path) == "http://mirror.example.test/debian"


def test_mirror_skips_security_and_source_entries(tmp_path):
    (tmp_path / "sources.list").write_text(
        "deb-src http://src.example.test/debian bookworm main\n"
        "deb http://security.example.test/debian-security bookworm-security main\n"
        "deb [arch=amd64] http://mirror.example.test/debian/ bookworm main\n"
    )
    assert images._mirror_from_apt_sources(tmp_path) == "http://mirror.example.test/debian"


def test_mirror_missing_returns_none(tmp_path):
    assert images._mirror_from_apt_sources(tmp_path) is None


def test_mirror_environment_override(monkeypatch):
    monkeypatch.setenv(images.MIRROR_ENV, "http://override.example.test/debian/")
    assert images.debian_mirror(images.load_recipe("debian12-systemd")) == "http://override.example.test/debian"


def test_registry_opt_in_parsing(monkeypatch):
    monkeypatch.delenv(images.REGISTRY_ENV, raising=False)
    assert images.registry_enabled() is False
    monkeypatch.setenv(images.REGISTRY_ENV, "1")
    assert images.registry_enabled() is True
    monkeypatch.setenv(images.REGISTRY_ENV, "0")
    assert images.registry_enabled() is False


def test_debootstrap_targets_always_buildable():
    # Decided from the recipe alone: no Docker client is created for a debootstrap recipe.
    assert images.unbuildable_reason("debian12-systemd", registry=False, client=object()) is None


def test_registry_target_buildable_with_opt_in():
    assert images.unbuildable_reason("centos7-systemd", registry=True, client=object()) is None


def _docker_client_or_skip():
    try:
        from lab.providers.docker import connect

        return connect(timeout=10)
    except PrerequisiteError as error:
        pytest.skip(f"Docker engine not reachable: {error}")


@pytest.mark.parametrize("name", REGISTRY_TARGETS)
def test_registry_target_not_buildable_offline(name, monkeypatch):
    monkeypatch.delenv(images.REGISTRY_ENV, raising=False)
    client = _docker_client_or_skip()
    base_image = images.load_recipe(name).base_image
    if any(base_image in image.tags for image in client.images.list()):
        pytest.skip(f"{base_image} is present locally, so {name} is buildable here")

    reason = images.unbuildable_reason(name, client=client)
    assert reason is not None
    assert "cannot be built here" in reason
    assert base_image in reason
    assert images.REGISTRY_ENV in reason

    with pytest.raises(PrerequisiteError, match="cannot be built here"):
        images.build(name, client=client)


def test_build_targets_skips_registry_targets(monkeypatch):
    monkeypatch.delenv(images.REGISTRY_ENV, raising=False)
    client = _docker_client_or_skip()
    events = []
    outcomes = images.build_targets(["alpine-openrc"], progress=events.append, client=client)
    if isinstance(outcomes[0], images.BuildResult):
        pytest.skip("alpine:3.19 is present locally, so the target was built")
    assert outcomes == [images.SkippedBuild("alpine-openrc", outcomes[0].reason)]
    assert events[-1].message.startswith("skipped:")
