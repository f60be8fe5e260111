"""Tar members read straight from a stream: headers parsed, data handed out unbuffered.

``tarfile``'s stream mode copies every byte of a member several times through
its own buffer and allocates a new ``bytes`` per read; for a containerdisk
layer that is most of the import's CPU.  Here only the 512-byte headers go
through ``tarfile.TarInfo.frombuf`` (checksums, ustar/GNU/PAX fields); a
member's data is read with ``readinto`` from the underlying reader into the
caller's buffer, limited to the member's size.  PAX extended headers (``x``,
``g``: path and size) and GNU long names (``L``) are applied to the member that
follows, as tar does.
"""

from __future__ import annotations

import re
import tarfile
from typing import Protocol

BLOCK = 512
MAX_SPECIAL = 1 << 20  # largest PAX or long-name header accepted (Go's archive/tar: 1 MiB)
MAX_GLOBAL = 1 << 20  # largest total of global PAX records kept


class Reader(Protocol):
    def readinto(self, buf: memoryview) -> int: ...


def _padded(size: int) -> int:
    return (size + BLOCK - 1) // BLOCK * BLOCK


class TarStream:
    """Members of the tar archive in READER, one after the other."""

    def __init__(self, reader: Reader) -> None:
        self._r = reader
        self._left = 0  # data bytes of the current member not yet read
        self._pad = 0  # padding after the current member's data
        self._global: dict[str, str] = {}
        self._scratch = bytearray(64 * 1024)

    def _read_exact(self, n: int) -> bytes | None:
        """N bytes, or None at a clean end of stream before the first byte."""
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self._r.readinto(view[got:])
            if k == 0:
                if got == 0:
                    return None
                raise tarfile.ReadError(f"unexpected end of data: {got} of {n} bytes")
            got += k
        return bytes(buf)

    def _skip(self, n: int) -> None:
        view = memoryview(self._scratch)
        while n > 0:
            k = self._r.readinto(view[: min(n, len(view))])
            if k == 0:
                raise tarfile.ReadError("unexpected end of data")
            n -= k

    def next(self) -> tarfile.TarInfo | None:
        """The next member's header (data positioned at its start), None at the end."""
        self._skip(self._left + self._pad)
        self._left = self._pad = 0
        pax: dict[str, str] = {}
        long_name: str | None = None
        while True:
            header = self._read_exact(BLOCK)
            if header is None or header == bytes(BLOCK):
                return None  # end of archive (the second zero block is not required)
            info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
            special = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.GNUTYPE_LONGNAME,
                       tarfile.GNUTYPE_LONGLINK)
            if info.type in special and info.size > MAX_SPECIAL:
                raise tarfile.HeaderError(f"a {info.size}-byte extended header is too large "
                                          f"(at most {MAX_SPECIAL})")
            if info.type == tarfile.GNUTYPE_SPARSE:
                raise tarfile.HeaderError(f"sparse tar member {info.name} is not supported")
            if info.type in (tarfile.XHDTYPE, tarfile.XGLTYPE):
                records = self._read_exact(_padded(info.size)) or b""
                parsed = _pax_records(records[: info.size])
                (self._global if info.type == tarfile.XGLTYPE else pax).update(parsed)
                if sum(len(k) + len(v) for k, v in self._global.items()) > MAX_GLOBAL:
                    raise tarfile.HeaderError("global extended headers are too large")
                continue
            if info.type == tarfile.GNUTYPE_LONGNAME:
                data = self._read_exact(_padded(info.size)) or b""
                long_name = data[: info.size].rstrip(b"\0").decode("utf-8", "surrogateescape")
                continue
            if info.type == tarfile.GNUTYPE_LONGLINK:
                self._skip(_padded(info.size))
                continue
            fields = {**self._global, **pax}
            if any(k.startswith("GNU.sparse.") for k in fields):
                raise tarfile.HeaderError(f"sparse tar member {info.name} is not supported")
            if "path" in fields:
                info.name = fields["path"]
            elif long_name is not None:
                info.name = long_name
            if "size" in fields:
                if not re.fullmatch(r"[0-9]{1,20}", fields["size"]):
                    raise tarfile.HeaderError(f"bad PAX size {fields['size']!r}")
                info.size = int(fields["size"])
            size = info.size if info.type in tarfile.REGULAR_TYPES else 0
            self._left, self._pad = size, _padded(size) - size
            return info

    def readinto(self, buf: memoryview) -> int:
        """Data of the current member; 0 at its end."""
        if self._left == 0:
            return 0
        n = self._r.readinto(buf[: min(len(buf), self._left)])
        if n == 0:
            raise tarfile.ReadError(f"unexpected end of data: {self._left} bytes missing")
        self._left -= n
        return n

    def close(self) -> None:
        """Nothing to release: the underlying reader belongs to the caller."""


def _pax_records(data: bytes) -> dict[str, str]:
    """``<length> <key>=<value>\\n`` records (POSIX pax extended header)."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        try:
            length = int(data[pos:space])
        except ValueError as e:
            raise tarfile.HeaderError("bad PAX record length") from e
        if length <= 0 or pos + length > len(data):
            raise tarfile.HeaderError("bad PAX record length")
        record = data[space + 1: pos + length - 1]  # without the trailing newline
        key, sep, value = record.partition(b"=")
        if sep:
            out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8",
                                                                       "surrogateescape")
        pos += length
    return out
