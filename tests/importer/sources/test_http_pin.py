"""An HTTP import pinned to one version of the file (``If-Match``/``If-Unmodified-Since`` in
the extra headers, as a DataImportCron's import is): the pinned version imports, through
nbdkit too; a file that changed fails with a message that says so, never imports the
other version, and never mixes the two."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from importer import qemu_img
from tests.importer.conftest import Importer, Volume
from tests.support import images
from tests.support.httpserver import FileServer, etag_for

MiB = 1 << 20
SIZE = str(128 * MiB)


def _raw(server: FileServer, name: str = "disk.raw", seed: int = 1) -> Path:
    return images.make_raw(server.root / name, virtual_size=images.STANDARD_VIRTUAL_SIZE,
                           extents=images.STANDARD_EXTENTS, seed=seed)


def test_the_pinned_version_imports(http_server: FileServer, volume: Callable[..., Volume],
                                    import_in_process: Importer) -> None:
    raw = _raw(http_server)
    images.convert(raw, http_server.root / "disk.qcow2", "qcow2")
    for name in ("disk.raw", "disk.qcow2"):  # streamed; through nbdkit (no scratch)
        etag = etag_for(os.stat(http_server.root / name))
        vol = volume(scratch=name == "disk.raw")
        result = import_in_process(vol, IMPORTER_ENDPOINT=http_server.url(name),
                                   IMPORTER_IMAGE_SIZE=SIZE,
                                   IMPORTER_EXTRA_HEADER_0=f"If-Match: {etag}")
        assert result.code == 0, result.message
        assert qemu_img.compare(str(raw), str(vol.disk))
        sent = http_server.requests_for(name)
        assert sent and all(r.headers.get("if-match") == etag for r in sent)
        if name == "disk.qcow2":
            assert {r.status for r in sent} == {200, 206}, "nbdkit read ranges"


def test_a_changed_file_fails_the_pinned_import(http_server: FileServer,
                                                volume: Callable[..., Volume],
                                                import_subprocess: Importer) -> None:
    _raw(http_server)
    url = http_server.url("disk.raw")
    vol = volume()
    result = import_subprocess(vol, IMPORTER_ENDPOINT=url, IMPORTER_IMAGE_SIZE=SIZE,
                               IMPORTER_EXTRA_HEADER_0='If-Match: "polled-earlier"')
    assert result.code == 1
    assert result.message == (
        f"Unable to connect to http data source: {url} is no longer the version this import "
        'is pinned to (If-Match: "polled-earlier"): the server answered 412 Precondition '
        "Failed")
    assert not vol.disk.exists()


def test_a_change_during_the_transfer_is_never_mixed_in(
        http_server: FileServer, volume: Callable[..., Volume], import_in_process: Importer,
        tmp_path: Path) -> None:
    raw = _raw(http_server)
    etag = etag_for(os.stat(raw))
    newer = images.make_raw(tmp_path / "newer.raw", virtual_size=images.STANDARD_VIRTUAL_SIZE,
                            extents=[(0, 2 * MiB)], seed=7)
    http_server.configure("disk.raw", cut_after=3 * MiB, change_after_first_get=newer)
    url = http_server.url("disk.raw")
    vol = volume()
    result = import_in_process(vol, IMPORTER_ENDPOINT=url, IMPORTER_IMAGE_SIZE=SIZE,
                               IMPORTER_EXTRA_HEADER_0=f"If-Match: {etag}")
    assert result.code == 1
    assert result.message == (
        f"Unable to process data: transfer of {url} failed after 1 attempts at byte 0: "
        f"{url} is no longer the version this import is pinned to (If-Match: {etag}): "
        "the server answered 412 Precondition Failed")
    # The cut GET, the resume refused (412), the fresh start refused (412).
    assert [r.status for r in http_server.requests_for("disk.raw", "GET")] == [200, 412, 412]
