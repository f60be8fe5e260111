"""Archive content (tar extracted onto the volume) and blank disks."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.importer.conftest import Importer, Volume
from tests.support import images
from tests.support.httpserver import FileServer

MiB = 1 << 20


@pytest.mark.parametrize("algo", ["", "gz", "xz", "zst"])
def test_archive_extracted(http_server: FileServer, volume: Callable[..., Volume],
                           import_in_process: Importer, algo: str) -> None:
    members = {"disk.img": b"\x01" * (2 * MiB), "dir/readme.txt": b"hello\n"}
    tar = images.make_tar(http_server.root / "bundle.tar", members)
    name = images.compress(tar, algo).name if algo else tar.name
    vol = volume()
    result = import_in_process(vol, IMPORTER_ENDPOINT=http_server.url(name),
                               IMPORTER_CONTENTTYPE="archive", IMPORTER_IMAGE_SIZE="64Mi")
    assert result.code == 0, result.message
    assert result.json["message"] == "Import Complete"
    for member, data in members.items():
        assert (vol.data_dir / member).read_bytes() == data


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink_escape", "hardlink_escape",
                                  "device"])
def test_hostile_archive_refused(http_server: FileServer, volume: Callable[..., Volume],
                                 import_in_process: Importer, tmp_path: Path, kind: str) -> None:
    tar = images.hostile_tar(http_server.root / f"{kind}.tar", kind,
                             extra={"good.txt": b"fine\n"})
    vol = volume()
    result = import_in_process(vol, IMPORTER_ENDPOINT=http_server.url(tar.name),
                               IMPORTER_CONTENTTYPE="archive", IMPORTER_IMAGE_SIZE="64Mi")
    assert result.code == 1
    assert result.message.startswith("Unable to process data: archive member ")
    assert " refused: " in result.message
    assert list(vol.data_dir.iterdir()) == [], "nothing of a refused archive stays"
    assert not (tmp_path / "evil").exists() and not Path("/etc/evil").exists()


def test_corrupt_archive(http_server: FileServer, volume: Callable[..., Volume],
                         import_in_process: Importer) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("big.bin")
        info.size = 4 * MiB
        tar.addfile(info, io.BytesIO(b"\x02" * info.size))
    http_server.put_file("cut.tar", buf.getvalue()[: 2 * MiB])
    vol = volume()
    result = import_in_process(vol, IMPORTER_ENDPOINT=http_server.url("cut.tar"),
                               IMPORTER_CONTENTTYPE="archive", IMPORTER_IMAGE_SIZE="64Mi")
    assert result.code == 1
    assert result.message.startswith("Unable to process data: the tar stream is damaged")
    assert list(vol.data_dir.iterdir()) == []


def test_archive_on_block_refused(http_server: FileServer, volume: Callable[..., Volume],
                                  import_in_process: Importer) -> None:
    images.make_tar(http_server.root / "bundle.tar", {"a": b"a"})
    vol = volume(block=True)
    result = import_in_process(vol, IMPORTER_ENDPOINT=http_server.url("bundle.tar"),
                               IMPORTER_CONTENTTYPE="archive")
    assert (result.code, result.message) == (
        1, "Unable to process data: content type archive needs a Filesystem volume, "
           "not a Block volume")


@pytest.mark.parametrize("prealloc", [False, True])
def test_blank_filesystem(volume: Callable[..., Volume], import_in_process: Importer,
                          prealloc: bool) -> None:
    vol = volume()
    result = import_in_process(vol, IMPORTER_SOURCE="none", IMPORTER_IMAGE_SIZE="100Mi",
                               FILESYSTEM_OVERHEAD="0.06", PREALLOCATION=str(prealloc).lower())
    assert result.code == 0, result.message
    assert result.json == {"message": "Import Complete", "scratchSpaceRequired": False,
                           "preallocationApplied": prealloc}
    # usable = RoundDown(ceil(100 MiB / 1.06), 1 MiB) = 94 MiB
    assert vol.disk.stat().st_size == 94 * MiB
    assert vol.disk.stat().st_mode & 0o777 == 0o660
    allocated = images.allocated_bytes(vol.disk)
    if prealloc:
        assert allocated >= 94 * MiB
    else:
        assert allocated < MiB
    assert vol.disk.read_bytes() == bytes(94 * MiB)


@pytest.mark.parametrize("prealloc", [False, True])
def test_blank_block(volume: Callable[..., Volume], import_in_process: Importer,
                     prealloc: bool) -> None:
    vol = volume(block=True, block_size=32 * MiB)
    with vol.block_path.open("r+b") as f:  # old data on a reused device
        f.write(b"\xff" * (4 * MiB))
    result = import_in_process(vol, IMPORTER_SOURCE="none", PREALLOCATION=str(prealloc).lower())
    assert result.code == 0, result.message
    assert vol.disk.stat().st_size == 32 * MiB
    assert vol.disk.read_bytes() == bytes(32 * MiB)
    allocated = images.allocated_bytes(vol.disk)
    assert allocated >= 32 * MiB if prealloc else allocated == 0


def test_blank_archive_refused(volume: Callable[..., Volume], import_subprocess: Importer) -> None:
    vol = volume()
    result = import_subprocess(vol, IMPORTER_SOURCE="none", IMPORTER_CONTENTTYPE="archive",
                               IMPORTER_IMAGE_SIZE="10Mi")
    assert (result.code, result.message) == (
        1, "Unable to create blank image: Cannot create empty disk with content type archive")
