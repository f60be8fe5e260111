"""Sparse uploads: a raw image's data only, as ``cdi image-upload`` sends it.

The upload server runs as a real subprocess (the fixtures of
``test_uploadserver``); bodies are made by ``importer.upload.sparse.encode``
from real files with holes and allocated runs of zeros, sent with ``requests``
in chunked coding, and the volume is compared with the file by qemu-img.
"""

# ruff: noqa: F811 - the fixtures imported from test_uploadserver are parameters here

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from importer.upload import sparse
from tests.importer.conftest import Volume
from tests.importer.test_uploadserver import (  # noqa: F401 - fixtures
    NO_CAPACITY,
    Start,
    _completed,
    _same,
    _sha256,
    img,
    start,
)
from tests.support import images

MiB = 1 << 20
TYPE = {"Content-Type": sparse.MEDIA_TYPE}
PREFIX = "Saving stream failed: "


class Cut(Exception):
    """The client drops the connection."""


def _preallocated_zeros(path: Path) -> Path:
    """A 64 MiB raw image: 12 MiB of data, holes, and 8 MiB of allocated zeros."""
    raw = images.make_raw(path, virtual_size=64 * MiB,
                          extents=[(0, 4 * MiB), (20 * MiB, 4 * MiB), (60 * MiB, 4 * MiB)],
                          seed=5)
    fd = os.open(raw, os.O_WRONLY)
    try:
        os.pwrite(fd, bytes(8 * MiB), 30 * MiB)  # allocated, all zero
        os.fsync(fd)
    finally:
        os.close(fd)
    return raw


@pytest.fixture(scope="module")
def zeros_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _preallocated_zeros(tmp_path_factory.mktemp("sparse") / "zeros.raw")


def _stream(path: Path, *, start: int = 0, cut_at: int | None = None,
            counted: list[int] | None = None,
            pause: tuple[int, Callable[[], None]] | None = None) -> Iterator[bytes]:
    """PATH's sparse stream, as bytes; raises Cut once CUT_AT bytes were handed out.

    PAUSE (n, fn): once N bytes were handed out, call FN before the next piece.
    """
    sent = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        for piece in sparse.encode(fd, path.stat().st_size, start=start):
            data = bytes(piece)
            if cut_at is not None and sent + len(data) > cut_at:
                raise Cut()
            sent += len(data)
            if counted is not None:
                counted.append(len(data))
            if pause is not None and sent >= pause[0]:
                pause[1]()
                pause = None
            yield data
    finally:
        os.close(fd)


def _post(server: object, path: str, body: object, **headers: str) -> tuple[int, str]:
    url, verify = server.url, server.verify  # type: ignore[attr-defined]
    with requests.post(url + path, data=body, headers={**TYPE, **headers}, verify=verify,
                       timeout=60) as r:
        return r.status_code, r.text


@pytest.mark.parametrize("endpoint", ["/v1beta1/upload", "/v1beta1/upload-async"])
@pytest.mark.parametrize("block", [False, True], ids=["fs", "block"])
def test_only_the_data_crosses(zeros_raw: Path, start: Start, volume: Callable[..., Volume],
                               block: bool, endpoint: str) -> None:
    vol = volume(block=block, block_size=64 * MiB)
    server = start(vol)
    counted: list[int] = []
    assert _post(server, endpoint, _stream(zeros_raw, counted=counted)) == (200, "")
    _completed(server)
    _same(zeros_raw, vol.disk)
    # 12 MiB of data, framed; neither the holes nor the 8 MiB of zeros were sent.
    assert 12 * MiB < sum(counted) < 12 * MiB + 4096
    # Nor written: the zeros are a hole on the volume.
    assert images.allocated_bytes(vol.disk) <= 12 * MiB + MiB
    assert "UPLOAD sparse stream offset=0" in server.output()


def test_the_probe_offers_the_sparse_stream(start: Start) -> None:
    server = start()
    with requests.head(server.url + "/v1beta1/upload-async", timeout=10) as r:
        assert r.status_code == 200
        assert r.headers["Accept-Post"] == f"application/octet-stream, {sparse.MEDIA_TYPE}"


def test_checksum_covers_the_zeros(zeros_raw: Path, start: Start) -> None:
    server = start()
    checksum = f"sha256:{_sha256(zeros_raw)}"
    assert _post(server, "/v1beta1/upload", _stream(zeros_raw), **{"X-Checksum": checksum}) \
        == (200, "")
    _completed(server)
    _same(zeros_raw, server.vol.disk)


def test_checksum_mismatch_keeps_nothing(zeros_raw: Path, start: Start) -> None:
    server = start()
    wrong = "0" * 64
    status, text = _post(server, "/v1beta1/upload", _stream(zeros_raw),
                         **{"X-Checksum": f"sha256:{wrong}"})
    assert (status, text) == (400, PREFIX + "checksum validation failed: checksum mismatch: "
                              f"expected sha256:{wrong}, calculated sha256:{_sha256(zeros_raw)}")
    assert not server.vol.disk.exists()
    assert server.proc.poll() is None, "the server waits for another attempt"


def test_a_qcow2_image_is_refused(img: dict[str, Path], start: Start) -> None:
    server = start()
    status, text = _post(server, "/v1beta1/upload", _stream(img["qcow2"]))
    assert (status, text) == (400, PREFIX + "a sparse stream carries a raw image, but this one "
                              "starts with a qcow2 header: upload the file as it is, not as a "
                              "sparse stream")
    assert not server.vol.disk.exists()
    # The same file as it is is taken.
    assert server.upload("/v1beta1/upload", img["qcow2"]) == (200, "")
    _completed(server)
    _same(img["raw"], server.vol.disk)


@pytest.mark.parametrize(("body", "reason"), [
    (b"NOTCLONE" + sparse.encode_head(MiB)[8:] + sparse.encode_end(MiB),
     "bad magic b'NOTCLONE', expected b'CDICLONE'"),
    (sparse.encode_head(MiB) + sparse.FRAME.pack(0, 4) + b"abcd",
     "the stream ended after frame 1 (offset 4), before its end frame"),
    (sparse.encode_head(MiB) + sparse.FRAME.pack(MiB - 2, 4) + b"abcd" + sparse.encode_end(MiB),
     f"frame 1 [{MiB - 2}, {MiB + 2}) ends beyond the image size {MiB}"),
    (sparse.encode_head(MiB) + sparse.encode_end(MiB) + b"x", "data after the end frame"),
], ids=["magic", "no-end", "beyond", "trailing"])
def test_malformed_streams(start: Start, body: bytes, reason: str) -> None:
    server = start()
    assert _post(server, "/v1beta1/upload", body) == (
        400, PREFIX + f"malformed sparse stream: {reason}")
    assert not server.vol.disk.exists()


def test_only_the_image_endpoints_take_it(zeros_raw: Path, start: Start) -> None:
    server = start()
    for endpoint in ("/v1beta1/upload-form", "/v1beta1/upload-archive"):
        assert _post(server, endpoint, b"x") == (
            400, f"a {sparse.MEDIA_TYPE} body goes to /v1beta1/upload or "
                 "/v1beta1/upload-async (it carries a raw disk image)")


def test_too_large(start: Start, volume: Callable[..., Volume], tmp_path: Path) -> None:
    big = images.make_raw(tmp_path / "big.raw", virtual_size=512 * MiB,
                          extents=[(0, MiB)], seed=2)
    server = start(volume(block=True, block_size=64 * MiB))
    status, text = _post(server, "/v1beta1/upload", _stream(big))
    assert status == 400
    assert text.startswith(NO_CAPACITY), text


@pytest.mark.parametrize("block", [False, True], ids=["fs", "block"])
def test_resume_after_cut(tmp_path: Path, start: Start, volume: Callable[..., Volume],
                          block: bool) -> None:
    raw = images.make_raw(tmp_path / "resume.raw", virtual_size=96 * MiB,
                          extents=[(i * 12 * MiB, 8 * MiB) for i in range(8)], seed=9)
    vol = volume(block=block, block_size=96 * MiB)
    server = start(vol)
    with pytest.raises((Cut, requests.ConnectionError)):
        _post(server, "/v1beta1/upload", _stream(raw, cut_at=40 * MiB))
    offset = server.settled_offset()
    assert offset > 0
    checksum = {"X-Checksum": f"sha256:{_sha256(raw)}"}
    assert _post(server, f"/v1beta1/upload?offset={offset}", _stream(raw, start=offset),
                 **checksum) == (200, "")
    _completed(server)
    _same(raw, vol.disk)
    assert images.allocated_bytes(vol.disk) <= 64 * MiB + MiB


def test_a_continuation_must_not_go_back(tmp_path: Path, start: Start) -> None:
    raw = images.make_raw(tmp_path / "resume.raw", virtual_size=96 * MiB,
                          extents=[(i * 12 * MiB, 8 * MiB) for i in range(8)], seed=9)
    server = start()
    with pytest.raises((Cut, requests.ConnectionError)):
        _post(server, "/v1beta1/upload", _stream(raw, cut_at=40 * MiB))
    offset = server.settled_offset()
    assert offset > 0
    status, text = _post(server, f"/v1beta1/upload?offset={offset}", _stream(raw))
    assert (status, text) == (400, PREFIX + "malformed sparse stream: frame 1 at offset 0 is "
                              f"before offset {offset}, where this request continues the upload")
    # Refused: the partial upload is dropped, and a new one from byte 0 is taken.
    assert server.offset() == {"offset": 0, "complete": False, "inProgress": False}
    assert _post(server, "/v1beta1/upload", _stream(raw)) == (200, "")
    _completed(server)
    _same(raw, server.vol.disk)


def test_resume_after_the_server_is_killed(tmp_path: Path, start: Start,
                                           volume: Callable[..., Volume]) -> None:
    """The durable offset of a sparse upload survives kill -9 of the upload server."""
    raw = images.make_raw(tmp_path / "resume.raw", virtual_size=96 * MiB,
                          extents=[(i * 12 * MiB, 8 * MiB) for i in range(8)], seed=4)
    vol = volume()
    server = start(vol)
    go = threading.Event()

    def wait_for_a_checkpoint_then_hold() -> None:
        time.sleep(1.2)  # the next write checkpoints (about once a second)

    def hold() -> None:
        go.wait(30)

    def sender() -> None:
        pieces = _stream(raw, pause=(24 * MiB, wait_for_a_checkpoint_then_hold))
        held = _held(pieces, 32 * MiB, hold)
        try:
            _post(server, "/v1beta1/upload", held)
        except requests.ConnectionError:
            pass

    t = threading.Thread(target=sender, daemon=True)
    t.start()
    deadline = time.monotonic() + 20
    while server.offset()["offset"] == 0:
        assert time.monotonic() < deadline, server.output()
        time.sleep(0.05)
    server.proc.send_signal(signal.SIGKILL)
    assert server.wait() == -signal.SIGKILL
    go.set()
    t.join(30)
    again = start(vol)
    offset = again.offset()["offset"]
    assert 24 * MiB <= offset < 96 * MiB
    checksum = {"X-Checksum": f"sha256:{_sha256(raw)}"}
    assert _post(again, f"/v1beta1/upload?offset={offset}", _stream(raw, start=offset),
                 **checksum) == (200, "")
    _completed(again)
    _same(raw, vol.disk)


def _held(pieces: Iterator[bytes], at: int, fn: Callable[[], None]) -> Iterator[bytes]:
    """PIECES, calling FN once AT bytes went by (the client stalls there)."""
    sent = 0
    called = False
    for piece in pieces:
        if not called and sent >= at:
            fn()
            called = True
        sent += len(piece)
        yield piece
