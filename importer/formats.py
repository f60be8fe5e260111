"""What an image stream is, found by its magic bytes, and how to unwrap it.

A download may be a disk image inside one or more compression layers
(``disk.qcow2.xz``, ``disk.raw.gz``).  ``detect`` peeks at the first bytes of a
stream, pushes a streaming decompressor for each compression layer it finds,
and stops at the first format qemu-img must convert or at raw (anything
unrecognised, ISO images and tar files included: CDI imports those byte for
byte).  Decompressors read from the layer below with ``readinto`` and hand out
at most as many bytes as asked for, so memory stays bounded by the buffers.
"""

from __future__ import annotations

import bz2
import dataclasses
import lzma
import sys
from collections.abc import Callable
from typing import Any, Protocol, cast

from isal import isal_zlib

if sys.version_info >= (3, 14):
    from compression import zstd
else:
    from backports import zstd

from importer import errors, units

HEADER_SIZE = 512
_ISAL_ERROR = cast("type[Exception]", isal_zlib.IsalError)

# name -> (offset, magic)
_MAGIC: dict[str, tuple[int, bytes]] = {
    "gz": (0, b"\x1f\x8b"),
    "zst": (0, b"\x28\xb5\x2f\xfd"),
    "xz": (0, b"\xfd7zXZ\x00"),
    "bz2": (0, b"BZh"),
    "qcow2": (0, b"QFI\xfb"),
    "vmdk": (0, b"KDMV"),
    "vdi": (0x40, b"\x7f\x10\xda\xbe"),
    "vpc": (0, b"conectix"),
    "vhdx": (0, b"vhdxfile"),
}
COMPRESSIONS = ("gz", "zst", "xz", "bz2")
CONVERTIBLE = ("qcow2", "vmdk", "vdi", "vpc", "vhdx")


class Reader(Protocol):
    def readinto(self, buf: memoryview) -> int: ...


def _match(header: bytes) -> str | None:
    for name, (offset, magic) in _MAGIC.items():
        if header[offset : offset + len(magic)] == magic:
            if name == "bz2" and not _is_bz2(header):
                continue
            return name
    return None


def _is_bz2(header: bytes) -> bool:
    # "BZh" + block size digit + block magic (pi in BCD): rules out text files
    # that merely start with "BZh".
    return len(header) >= 10 and header[3:4] in b"123456789" and header[4:10] == b"\x31AY&SY"


class Peekable:
    """A reader that lets ``detect`` look at the first bytes without losing them."""

    def __init__(self, src: Reader) -> None:
        self._src = src
        self._head = b""
        self._pos = 0

    def peek(self, size: int = HEADER_SIZE) -> bytes:
        if self._pos:
            raise RuntimeError("peek after read")
        buf = bytearray(size)
        view = memoryview(buf)
        have = len(self._head)
        view[:have] = self._head
        while have < size:
            n = self._src.readinto(view[have:])
            if n == 0:
                break
            have += n
        self._head = bytes(buf[:have])
        return self._head

    def readinto(self, buf: memoryview) -> int:
        if self._pos < len(self._head):
            n = min(len(buf), len(self._head) - self._pos)
            buf[:n] = self._head[self._pos : self._pos + n]
            self._pos += n
            return n
        return self._src.readinto(buf)


@dataclasses.dataclass
class Detected:
    """The result of ``detect``: the layers found and a reader of the innermost one."""

    layers: list[str]  # e.g. ["xz", "qcow2"]; the last is the image format ("raw" if none)
    reader: Peekable
    header: bytes

    @property
    def format(self) -> str:
        return self.layers[-1]

    @property
    def compressed(self) -> bool:
        return len(self.layers) > 1

    @property
    def needs_conversion(self) -> bool:
        return self.format in CONVERTIBLE


def kind_of(header: bytes) -> str:
    """The outermost layer HEADER (an image's first bytes) announces: a compression, a
    format qemu-img converts, or "raw"."""
    return _match(header) or "raw"


def detect(src: Reader) -> Detected:
    """Unwrap compression layers until an image format or raw is found."""
    reader = Peekable(src)
    layers: list[str] = []
    while True:
        header = reader.peek()
        kind = _match(header)
        if kind is None:
            layers.append("raw")
            return Detected(layers, reader, header)
        if kind in layers:
            raise errors.CorruptStream(format=kind, reason="nested twice in the same stream")
        layers.append(kind)
        if kind not in COMPRESSIONS:
            return Detected(layers, reader, header)
        reader = Peekable(decompressor(kind, reader))


def decompressor(kind: str, src: Reader) -> Reader:
    factory: Callable[[], Any] = {
        "gz": lambda: isal_zlib.decompressobj(31),
        "xz": lambda: lzma.LZMADecompressor(format=lzma.FORMAT_XZ),
        "bz2": bz2.BZ2Decompressor,
        "zst": lambda: zstd.ZstdDecompressor(),
    }[kind]
    return _Decompressing(kind, src, factory)


class _Decompressing:
    """Streams through a zlib/lzma/bz2/zstd decompressor object, multi-member aware."""

    def __init__(self, kind: str, src: Reader, factory: Callable[[], Any]) -> None:
        self._kind = kind
        self._src = src
        self._factory = factory
        self._d = factory()
        self._zlib_like = hasattr(self._d, "unconsumed_tail")
        self._inbuf = bytearray(units.MiB)
        self._input = b""  # compressed bytes read but not yet given to the decompressor
        self._src_eof = False
        self._done = False

    def _read_input(self) -> bytes:
        if self._input:
            data, self._input = self._input, b""
            return data
        if self._src_eof:
            return b""
        n = self._src.readinto(memoryview(self._inbuf))
        if n == 0:
            self._src_eof = True
            return b""
        return bytes(self._inbuf[:n])

    def readinto(self, buf: memoryview) -> int:
        while not self._done:
            d = self._d
            if d.eof:
                rest = d.unused_data + self._read_input()
                if not rest or not _match_kind(self._kind, rest):
                    # End of the last member; trailing padding or garbage is ignored,
                    # as gzip(1) and xz(1) do.
                    self._done = True
                    break
                self._d = self._factory()
                self._input = rest
                continue
            if self._zlib_like:
                data = d.unconsumed_tail or self._read_input()
            else:
                data = self._read_input() if d.needs_input else b""
            try:
                out = d.decompress(data, len(buf))
            except (OSError, EOFError, lzma.LZMAError, zstd.ZstdError, _ISAL_ERROR) as e:
                raise errors.CorruptStream(format=self._kind, reason=str(e)) from e
            if out:
                n = len(out)
                buf[:n] = out
                return n
            starved = not d.unconsumed_tail if self._zlib_like else d.needs_input
            if not data and not d.eof and starved and self._src_eof:
                raise errors.CorruptStream(format=self._kind, reason="unexpected end of stream")
        return 0


def _match_kind(kind: str, data: bytes) -> bool:
    magic = _MAGIC[kind][1]
    return data[: len(magic)] == magic
