"""Magic detection and streaming decompression."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import random
from pathlib import Path

import pytest
from backports import zstd

from importer import errors, formats
from tests.support import images

MiB = 1 << 20


class BytesReader:
    """A Reader over bytes that returns at most ``step`` bytes per call."""

    def __init__(self, data: bytes, step: int = 7919) -> None:
        self._f = io.BytesIO(data)
        self._step = step

    def readinto(self, buf: memoryview) -> int:
        return self._f.readinto(buf[: self._step])


def read_all(reader: formats.Reader) -> bytes:
    out = bytearray()
    buf = bytearray(65536)
    with memoryview(buf) as view:
        while n := reader.readinto(view):
            out += view[:n]
    return bytes(out)


PAYLOAD = random.Random(1).randbytes(300_000) + bytes(2 * MiB) + b"end"
COMPRESS = {
    "gz": gzip.compress,
    "xz": lzma.compress,
    "bz2": bz2.compress,
    "zst": zstd.compress,
}


@pytest.mark.parametrize("algo", sorted(COMPRESS))
def test_decompress_streams(algo: str) -> None:
    d = formats.detect(BytesReader(COMPRESS[algo](PAYLOAD)))
    assert d.layers == [algo, "raw"]
    assert read_all(d.reader) == PAYLOAD


@pytest.mark.parametrize("algo", ["gz", "xz", "bz2", "zst"])
def test_concatenated_members(algo: str) -> None:
    data = COMPRESS[algo](PAYLOAD[:1000]) + COMPRESS[algo](PAYLOAD[1000:])
    assert read_all(formats.detect(BytesReader(data)).reader) == PAYLOAD


@pytest.mark.parametrize("algo", ["gz", "xz", "bz2", "zst"])
def test_truncated_stream_is_an_error(algo: str) -> None:
    data = COMPRESS[algo](PAYLOAD)
    with pytest.raises(errors.CorruptStream) as e:
        read_all(formats.detect(BytesReader(data[: len(data) // 2])).reader)
    assert str(e.value).startswith(f"the {algo} stream is damaged")


def test_garbage_inside_gzip_is_an_error() -> None:
    data = bytearray(gzip.compress(PAYLOAD))
    data[100:200] = bytes(100)
    with pytest.raises(errors.CorruptStream):
        read_all(formats.detect(BytesReader(bytes(data))).reader)


@pytest.mark.parametrize("fmt", images.FORMATS)
def test_image_formats(tmp_path: Path, fmt: str) -> None:
    raw = images.make_raw(tmp_path / "d.raw", virtual_size=4 * MiB, extents=[(0, MiB)])
    img = images.convert(raw, tmp_path / f"d.{fmt}", fmt)
    xz = images.compress(img, "xz")
    d = formats.detect(BytesReader(xz.read_bytes(), step=1 << 20))
    assert d.layers == ["xz", fmt]
    assert d.needs_conversion and d.compressed
    assert d.format == fmt


def test_raw_iso_and_tar_are_raw(tmp_path: Path) -> None:
    iso = images.make_iso_like(tmp_path / "x.iso", MiB)
    tar = images.make_tar(tmp_path / "x.tar", {"a": b"a" * 1000})
    for path in (iso, tar):
        data = path.read_bytes()
        d = formats.detect(BytesReader(data))
        assert d.layers == ["raw"] and not d.needs_conversion
        assert read_all(d.reader) == data, "the peeked header is not lost"


def test_short_stream_is_raw() -> None:
    d = formats.detect(BytesReader(b"tiny"))
    assert d.layers == ["raw"]
    assert read_all(d.reader) == b"tiny"


def test_text_starting_with_bzh_is_not_bzip2() -> None:
    d = formats.detect(BytesReader(b"BZh is how this text starts" + bytes(600)))
    assert d.layers == ["raw"]


def test_same_layer_twice_refused() -> None:
    data = gzip.compress(gzip.compress(PAYLOAD))
    with pytest.raises(errors.CorruptStream, match="nested twice"):
        formats.detect(BytesReader(data))
