"""nbdkit between qemu-img and an HTTP server: the checked header is the converted header."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from importer import errors, nbdkit, qemu_img, settings
from importer.nbdkit import Nbdkit
from tests.support import images
from tests.support.httpserver import FileServer

MiB = 1 << 20


def _evil_qcow2(tmp_path: Path, secret: Path) -> Path:
    """A qcow2 whose data lives in SECRET, a file on the importer's machine."""
    evil = tmp_path / "evil.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                    f"data_file={secret},data_file_raw=on", str(evil), str(16 * MiB)], check=True)
    secret.write_bytes(b"TOPSECRET" * (2 * MiB // 9))
    return evil


def test_header_pinned_between_info_and_convert(http_server: FileServer, tmp_path: Path) -> None:
    raw = images.make_raw(tmp_path / "clean.raw", virtual_size=16 * MiB, extents=[(0, MiB)])
    images.convert(raw, http_server.root / "disk.qcow2", "qcow2")
    evil = _evil_qcow2(tmp_path, tmp_path / "secret.raw")
    s = settings.from_env({"IMPORTER_ENDPOINT": http_server.url("disk.qcow2"),
                           "IMPORTER_RETRY_BACKOFF": "0.05"})

    nbd = Nbdkit(http_server.url("disk.qcow2"), settings=s, ca_bundle=None)
    url = nbd.start()
    try:
        nbd.pin()
        assert qemu_img.info(url, fmt="qcow2").data_file is None
        nbd.unpin()
        # The server now sends an image that reads a local file.
        os.replace(evil, http_server.root / "disk.qcow2")
        out = tmp_path / "out.raw"
        try:
            qemu_img.convert(url, out, src_format="qcow2")
        except errors.QemuImgError:
            pass  # garbage metadata may fail the conversion: fine, nothing leaked
        if out.exists():
            assert b"TOPSECRET" not in out.read_bytes()
    finally:
        nbd.stop()

    # Without the pinned header the swap would have worked: the test means something.
    fresh = Nbdkit(http_server.url("disk.qcow2"), settings=s, ca_bundle=None)
    url = fresh.start()
    try:
        assert qemu_img.info(url, fmt="qcow2").data_file == str(tmp_path / "secret.raw")
    finally:
        fresh.stop()


def test_start_failure_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    s = settings.from_env({"IMPORTER_ENDPOINT": "http://127.0.0.1:1/x"})
    monkeypatch.setattr(nbdkit, "NBDKIT", "false")  # exits at once, like a broken nbdkit
    nbd = Nbdkit("http://127.0.0.1:1/x", settings=s, ca_bundle=None)
    with pytest.raises(errors.SourceError, match="nbdkit did not start"):
        nbd.start()
    assert not nbd.socket.parent.exists(), "its directory is cleaned up"
