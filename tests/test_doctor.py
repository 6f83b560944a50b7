"""Tests of lab.doctor: the image and box rows of ``updatelab doctor``."""

from __future__ import annotations

from lab import boxes, doctor, images
from lab.boxes import BoxStatus
from lab.errors import PrerequisiteError
from lab.images import ImageInfo


def test_image_check_names_missing_images(monkeypatch):
    present = [
        ImageInfo("debian12-systemd", "updatelab/debian12-systemd:latest", "sha256:1", "r1", True, "2026-12-01", 1),
        ImageInfo("debian13-systemd", "updatelab/debian13-systemd:latest", "sha256:2", "r2", False, "2026-12-01", 1),
    ]
    monkeypatch.setattr(images, "list_images", lambda: present)
    check = doctor._image_check()
    offline = [name for name in images.known_targets() if images.load_recipe(name).kind != "registry"]

    assert not check.ok
    assert not check.required
    assert check.detail.startswith(f"1 of {len(offline)} offline images built; missing ")
    assert "debian12-sysvinit" in check.detail
    assert "debian13-systemd" in check.detail  # built from an older recipe
    assert "debian12-systemd," not in check.detail
    assert "alpine-openrc" not in check.detail


def test_image_check_reports_docker_error(monkeypatch):
    def docker_stopped():
        raise PrerequisiteError("the Docker daemon is not running")

    monkeypatch.setattr(images, "list_images", docker_stopped)
    check = doctor._image_check()
    assert not check.ok
    assert check.detail == "cannot list: the Docker daemon is not running"


def test_box_check_without_debian_box(monkeypatch):
    statuses = [BoxStatus("debian12-vm", "updatelab/debian12-vm", False), BoxStatus("freebsd13-rcd", "generic/freebsd13", True)]
    monkeypatch.setattr(boxes, "list_boxes", lambda: statuses)
    check = doctor._box_check()

    assert not check.ok
    assert check.detail == "present: freebsd13-rcd; build debian12-vm with: updatelab boxes build debian12-vm"


def test_box_check_with_debian_box(monkeypatch):
    monkeypatch.setattr(boxes, "list_boxes", lambda: [BoxStatus("debian12-vm", "updatelab/debian12-vm", True)])
    check = doctor._box_check()

    assert check.ok
    assert check.detail == "present: debian12-vm"
