"""The qemu-img wrapper, with the real qemu-img."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from importer import errors, qemu_img
from tests.support import images

MiB = 1 << 20


def test_info(tmp_path: Path) -> None:
    raw = images.make_raw(tmp_path / "d.raw", virtual_size=8 * MiB, extents=[(0, MiB)])
    img = images.convert(raw, tmp_path / "d.qcow2", "qcow2")
    info = qemu_img.info(str(img), fmt="qcow2")
    assert (info.format, info.virtual_size, info.backing_file, info.data_file) == (
        "qcow2", 8 * MiB, None, None)


def test_info_with_the_wrong_format_fails(tmp_path: Path) -> None:
    raw = images.make_raw(tmp_path / "d.raw", virtual_size=8 * MiB, extents=[(0, MiB)])
    with pytest.raises(errors.InvalidImage, match="Image is not in qcow2 format"):
        qemu_img.info(str(raw), fmt="qcow2")


def test_validate() -> None:
    ok = qemu_img.ImageInfo("qcow2", 10, 10, None, None)
    qemu_img.validate(ok, url="u", available=10)
    with pytest.raises(errors.ImageTooLarge):
        qemu_img.validate(ok, url="u", available=9)
    with pytest.raises(errors.UnsupportedFormat, match="Invalid format qed for image u"):
        qemu_img.validate(qemu_img.ImageInfo("qed", 1, 1, None, None), url="u", available=9)
    with pytest.raises(errors.InvalidDataFile):
        qemu_img.validate(qemu_img.ImageInfo("qcow2", 1, 1, None, "x.raw"), url="u", available=9)


def test_source_spec_never_opens_backing(tmp_path: Path) -> None:
    overlay, base = images.qcow2_with_backing(tmp_path)
    spec = qemu_img.source_spec(str(overlay), "qcow2")
    assert json.loads(spec.removeprefix("json:"))["backing"] is None
    out = tmp_path / "out.raw"
    os.chmod(base, 0)  # would fail if opened... root ignores modes, so also rename it
    base.rename(tmp_path / "moved-away")
    qemu_img.convert(str(overlay), out, src_format="qcow2")
    # Only the overlay's own clusters: the base's data is not there.
    assert images.allocated_bytes(out) <= 2 * MiB


def test_convert_reports_progress_and_removes_output_on_failure(tmp_path: Path) -> None:
    raw = images.make_raw(tmp_path / "d.raw", virtual_size=64 * MiB, extents=[(0, 8 * MiB)])
    img = images.convert(raw, tmp_path / "d.qcow2", "qcow2")
    seen: list[float] = []
    out = tmp_path / "out.raw"
    qemu_img.convert(str(img), out, src_format="qcow2", progress=seen.append)
    assert seen and seen[-1] == 100.0 and seen == sorted(seen)
    assert qemu_img.compare(str(raw), str(out))

    bad = tmp_path / "bad.raw"
    with pytest.raises(errors.QemuImgError) as e:
        qemu_img.convert(str(raw), bad, src_format="qcow2")
    assert e.value.rc == 1 and "Image is not in qcow2 format" in e.value.stderr
    assert not bad.exists()


def test_convert_preallocates(tmp_path: Path) -> None:
    raw = images.make_raw(tmp_path / "d.raw", virtual_size=16 * MiB, extents=[(0, MiB)])
    out = tmp_path / "out.raw"
    qemu_img.convert(str(raw), out, src_format="raw", preallocation=True)
    assert images.allocated_bytes(out) >= 16 * MiB


def test_convert_into_existing_block_target(tmp_path: Path) -> None:
    raw = images.make_raw(tmp_path / "d.raw", virtual_size=8 * MiB, extents=[(0, MiB)])
    dev = tmp_path / "dev"
    with dev.open("wb") as f:
        f.truncate(32 * MiB)
    for prealloc in (False, True):
        qemu_img.convert(str(raw), dev, src_format="raw", target_exists=True,
                         preallocation=prealloc)
        assert dev.stat().st_size == 32 * MiB
        assert qemu_img.compare(str(raw), str(dev))


def test_resize_only_grows(tmp_path: Path) -> None:
    img = tmp_path / "d.raw"
    qemu_img.create(img, 8 * MiB)
    qemu_img.resize(img, 4 * MiB)
    assert img.stat().st_size == 8 * MiB
    qemu_img.resize(img, 16 * MiB, preallocation=True)
    assert img.stat().st_size == 16 * MiB
    assert images.allocated_bytes(img) >= 8 * MiB


def test_compare(tmp_path: Path) -> None:
    a = images.make_raw(tmp_path / "a.raw", virtual_size=4 * MiB, extents=[(0, MiB)], seed=1)
    b = images.make_raw(tmp_path / "b.raw", virtual_size=4 * MiB, extents=[(0, MiB)], seed=2)
    assert qemu_img.compare(str(a), str(a))
    assert not qemu_img.compare(str(a), str(b))
