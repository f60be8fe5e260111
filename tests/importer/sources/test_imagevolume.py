"""Registry node pull: the disk read from a containerdisk mounted as a directory.

On Kubernetes the kubelet mounts the image (an OCI image volume) and the importer
reads ``disk/`` from it; here the mount is a directory laid out as a containerdisk
is (``disk/<file>``, mode 0440), with disks made by the real qemu-img, and the
imported volume is compared with ``qemu-img compare``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from importer import containerdisk, qemu_img
from tests.importer.conftest import Importer, Result, Volume
from tests.support import images

MiB = 1 << 20
VIRTUAL = 8 * MiB
SIZE = str(64 * MiB)
ENDPOINT = "docker://quay.example.com/vms/fedora:41"


@dataclasses.dataclass(frozen=True)
class Disks:
    raw: Path
    qcow2: Path
    raw_gz: Path
    qcow2_gz: Path


@pytest.fixture(scope="module")
def disks(tmp_path_factory: pytest.TempPathFactory) -> Disks:
    d = tmp_path_factory.mktemp("disks")
    raw = images.make_raw(d / "disk.raw", virtual_size=VIRTUAL,
                          extents=[(0, MiB), (5 * MiB, MiB), (VIRTUAL - 64 * 1024, 64 * 1024)])
    qcow2 = images.convert(raw, d / "disk.qcow2", "qcow2")
    return Disks(raw, qcow2, images.compress(raw, "gz"), images.compress(qcow2, "gz"))


def mounted(root: Path, *disks: tuple[str, Path]) -> Path:
    """ROOT laid out as the image volume of a containerdisk holding DISKS (name, file)."""
    (root / "disk").mkdir(parents=True)
    for name, disk in disks:
        path = root / "disk" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(disk, path)
        path.chmod(containerdisk.DISK_MODE)
    return root


def pull(run: Importer, vol: Volume, image_dir: Path, **env: str) -> Result:
    env.setdefault("IMPORTER_IMAGE_SIZE", SIZE)
    return run(vol, IMPORTER_SOURCE="registry", IMPORTER_ENDPOINT=ENDPOINT,
               IMPORTER_PULL_METHOD="node", IMPORTER_IMAGE_DIR=str(image_dir), **env)


def _ok(result: Result) -> None:
    assert result.code == 0, result.message
    assert result.json == {"message": "Import Complete", "scratchSpaceRequired": False,
                           "preallocationApplied": False}  # no labels: no image env to read


@pytest.mark.parametrize("block", [False, True], ids=["filesystem", "block"])
@pytest.mark.parametrize("kind", ["raw", "qcow2", "raw_gz"])
def test_a_disk_is_imported_without_scratch_space(
        disks: Disks, volume: Callable[..., Volume], import_in_process: Importer,
        tmp_path: Path, kind: str, block: bool) -> None:
    """Raw and compressed raw stream onto the volume; qcow2 is converted where it lies
    (the file is local and does not change), so none of them needs scratch space."""
    source: Path = getattr(disks, kind)
    root = mounted(tmp_path / "containerdisk", (source.name, source))
    vol = volume(block=block, block_size=32 * MiB, scratch=False)
    _ok(pull(import_in_process, vol, root))
    assert qemu_img.compare(str(disks.raw), str(vol.disk))
    assert vol.disk.stat().st_size == (32 * MiB if block else 64 * MiB)
    assert (root / "disk" / source.name).read_bytes() == source.read_bytes(), "read only"


def test_a_compressed_qcow2_goes_through_scratch_space(
        disks: Disks, volume: Callable[..., Volume], import_in_process: Importer,
        tmp_path: Path) -> None:
    root = mounted(tmp_path / "containerdisk", ("fedora.qcow2.gz", disks.qcow2_gz))
    vol = volume(scratch=False)
    result = pull(import_in_process, vol, root)
    assert (result.code, result.json) == (0, {"scratchSpaceRequired": True,
                                              "message": "scratch space required and none found"})
    vol = volume()
    _ok(pull(import_in_process, vol, root))
    assert qemu_img.compare(str(disks.raw), str(vol.disk))
    assert list(vol.scratch_dir.iterdir()) == [], "scratch image removed"


def test_the_worker_process_reads_the_image_volume(
        disks: Disks, volume: Callable[..., Volume], import_subprocess: Importer,
        tmp_path: Path) -> None:
    """`cdi-importer` as the pod runs it: exit code and termination log."""
    root = mounted(tmp_path / "containerdisk", ("disk.img", disks.qcow2))
    vol = volume(scratch=False)
    result = pull(import_subprocess, vol, root)
    assert result.code == 0, result.message
    assert json.loads(result.message)["message"] == "Import Complete"
    assert qemu_img.compare(str(disks.raw), str(vol.disk))


def test_whiteouts_links_and_other_directories_are_not_disks(
        disks: Disks, volume: Callable[..., Volume], import_in_process: Importer,
        tmp_path: Path) -> None:
    """The pod-pull rule for a disk (a regular file under disk/, not a whiteout); files
    outside disk/ do not count."""
    root = mounted(tmp_path / "containerdisk", ("nested/disk.qcow2", disks.qcow2),
                   (".wh.old.img", disks.raw))
    os.symlink("nested/disk.qcow2", root / "disk" / "link.img")
    (root / "etc").mkdir()
    (root / "etc" / "os-release").write_text("ID=fedora\n")
    vol = volume()
    _ok(pull(import_in_process, vol, root))
    assert qemu_img.compare(str(disks.raw), str(vol.disk))


def _failed(result: Result, message: str) -> None:
    assert (result.code, result.message) == (1, message)
    assert not result.volume.disk.exists()


@pytest.mark.parametrize("layout", ["empty", "no-disk-dir", "whiteout-and-link"])
def test_an_image_without_a_disk_is_refused(
        disks: Disks, volume: Callable[..., Volume], import_in_process: Importer,
        tmp_path: Path, layout: str) -> None:
    root = tmp_path / "containerdisk"
    if layout == "no-disk-dir":
        (root / "usr").mkdir(parents=True)
    else:
        mounted(root)
    if layout == "whiteout-and-link":
        shutil.copyfile(disks.raw, root / "disk" / ".wh.disk.img")
        os.symlink(disks.raw, root / "disk" / "disk.img")
    _failed(pull(import_in_process, volume(), root),
            "Unable to process data: Failed to find VM disk image file in the container image: "
            f"no regular file under {root}/disk")


def test_an_image_with_two_disks_is_refused(
        disks: Disks, volume: Callable[..., Volume], import_in_process: Importer,
        tmp_path: Path) -> None:
    """A merged file system has no first layer to prefer: which disk is meant is unclear
    (CDI's image server, too, wants exactly one file)."""
    root = mounted(tmp_path / "containerdisk", ("b.qcow2", disks.qcow2), ("a.img", disks.raw))
    _failed(pull(import_in_process, volume(), root),
            f"Unable to process data: Invalid container image: {root}/disk holds 2 files "
            "(a.img, b.qcow2); a containerdisk holds exactly one disk image file")


def test_an_unmounted_image_volume_is_named(volume: Callable[..., Volume],
                                            import_in_process: Importer, tmp_path: Path) -> None:
    missing = tmp_path / "containerdisk"
    _failed(pull(import_in_process, volume(), missing),
            f"Unable to process data: the image volume is not mounted at {missing}: the node "
            "did not mount the image (pullMethod node needs Kubernetes image volumes)")


def test_a_bootc_image_is_refused(disks: Disks, volume: Callable[..., Volume],
                                  import_in_process: Importer, tmp_path: Path) -> None:
    root = mounted(tmp_path / "containerdisk", ("disk.img", disks.raw))
    (root / "ostree").mkdir()
    _failed(pull(import_in_process, volume(), root),
            "Unable to process data: bootc image detected: this image contains an ostree-based "
            "bootable OS (containers.bootc=1 or ostree.bootable=1) and cannot be imported as a "
            "regular container disk; bootc-to-disk conversion is not yet implemented")


def test_archive_content_is_refused(disks: Disks, volume: Callable[..., Volume],
                                    import_in_process: Importer, tmp_path: Path) -> None:
    root = mounted(tmp_path / "containerdisk", ("disk.img", disks.raw))
    _failed(pull(import_in_process, volume(), root, IMPORTER_CONTENTTYPE="archive"),
            "IMPORTER_CONTENTTYPE: Unsupported content type archive when importing from registry")
