"""tarstream reads what tar and tarfile write: names, sizes, data, and refuses damage."""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path

import pytest

from importer import tarstream


class _Chunky:
    """A reader that hands out at most 7 bytes a call (short reads everywhere)."""

    def __init__(self, data: bytes) -> None:
        self._f = io.BytesIO(data)

    def readinto(self, buf: memoryview) -> int:
        return self._f.readinto(buf[:7])


def _members(data: bytes) -> list[tuple[str, int, bytes]]:
    ts = tarstream.TarStream(_Chunky(data))
    out = []
    while (m := ts.next()) is not None:
        body = bytearray()
        buf = bytearray(5)
        while n := ts.readinto(memoryview(buf)):
            body += buf[:n]
        out.append((m.name, m.size, bytes(body)))
    return out


def _archive(fmt: int, files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        d = tarfile.TarInfo("disk")
        d.type = tarfile.DIRTYPE
        tar.addfile(d)
    return out.getvalue()


LONG = "disk/" + "x" * 150 + ".img"
FILES = {"etc/motd": b"hello\n", LONG: b"\x01" * 1000, "disk/empty": b"",
         "disk/ünïcode.qcow2": b"QFI\xfb" + b"\0" * 600}


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tarfile_archives(fmt: int) -> None:
    files = dict(FILES)
    if fmt == tarfile.USTAR_FORMAT:
        files.pop(LONG)  # ustar cannot hold the long name
        files.pop("disk/ünïcode.qcow2")
    got = _members(_archive(fmt, files))
    assert got == [(n, len(d), d) for n, d in files.items()] + [("disk", 0, b"")]


def test_gnu_tar_archive(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "disk").mkdir(parents=True)
    (root / "disk" / ("y" * 120 + ".img")).write_bytes(b"\x02" * 3000)
    out = subprocess.run(["tar", "--format=gnu", "-C", str(root), "-cf", "-", "disk"],
                         capture_output=True, check=True).stdout
    got = _members(out)
    assert ("disk/" + "y" * 120 + ".img", 3000, b"\x02" * 3000) in got


def test_damage_is_refused() -> None:
    data = _archive(tarfile.PAX_FORMAT, {"disk/a.img": b"\x03" * 2000})
    with pytest.raises(tarfile.ReadError, match="unexpected end of data"):
        _members(data[:1500])
    bad = bytearray(data)
    bad[148:156] = b"0000000\0"  # the first header's checksum
    with pytest.raises(tarfile.TarError):
        _members(bytes(bad))


def _pax_archive(pax: dict[str, str], data: bytes = b"\x04" * 1024) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("disk/a.img")
        info.size = len(data)
        info.pax_headers = pax
        tar.addfile(info, io.BytesIO(data))
        tail = tarfile.TarInfo("etc/next")
        tail.size = 600
        tar.addfile(tail, io.BytesIO(b"\x05" * 600))
    return out.getvalue()


def test_hostile_headers_are_refused(tmp_path: Path) -> None:
    with pytest.raises(tarfile.HeaderError, match="bad PAX size '-512'"):
        _members(_pax_archive({"size": "-512"}))
    with pytest.raises(tarfile.HeaderError, match="sparse tar member"):
        _members(_pax_archive({"GNU.sparse.major": "1", "GNU.sparse.minor": "0"}))
    # A PAX header declaring 8 GiB: refused before any memory is taken for it.
    header = bytearray(_pax_archive({"comment": "x"})[:512])
    header[124:136] = b"77777777777\0"
    header[148:156] = b" " * 8
    header[148:155] = f"{sum(header):06o}\0".encode()
    with pytest.raises(tarfile.HeaderError, match="too large"):
        _members(bytes(header) + bytes(1024))
    # GNU sparse members (tar -S) are refused, never read as a dense disk.
    sparse = tmp_path / "disk"
    sparse.mkdir()
    with (sparse / "disk.img").open("wb") as f:
        f.write(b"\x06" * 4096)
        f.seek(1 << 20)
        f.write(b"\x07" * 4096)
    out = subprocess.run(["tar", "-S", "--format=gnu", "-C", str(tmp_path), "-cf", "-",
                          "disk/disk.img"], capture_output=True, check=True).stdout
    with pytest.raises(tarfile.HeaderError, match="sparse tar member"):
        _members(out)
