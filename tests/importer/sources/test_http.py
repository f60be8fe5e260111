"""HTTP(S) source behaviour against a real server: auth, TLS, errors, resume, checksums."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from importer import qemu_img
from tests.importer.conftest import Importer, Volume
from tests.support import images
from tests.support.httpserver import FileServer
from tests.support.proxy import ForwardProxy
from tests.support.tls import TLSFiles

MiB = 1 << 20
SIZE = str(128 * MiB)


@pytest.fixture
def raw_image(http_server: FileServer) -> Path:
    """64 MiB virtual, 7 MiB of data, served as disk.raw."""
    return images.make_raw(http_server.root / "disk.raw", virtual_size=images.STANDARD_VIRTUAL_SIZE,
                           extents=images.STANDARD_EXTENTS)


def _ok(result: object) -> None:
    code = getattr(result, "code")  # noqa: B009
    message = getattr(result, "message")  # noqa: B009
    assert code == 0, message
    assert '"message": "Import Complete"' in message


@pytest.mark.parametrize("name", ["disk.raw", "disk.qcow2"])  # streamed; through nbdkit
def test_basic_auth_right(http_server: FileServer, raw_image: Path, volume: Callable[..., Volume],
                          import_in_process: Importer, name: str) -> None:
    images.convert(raw_image, http_server.root / "disk.qcow2", "qcow2")
    http_server.configure(name, auth=("alice", "s3cret"))
    vol = volume(scratch=False)
    result = import_in_process(vol, IMPORTER_ENDPOINT=http_server.url(name),
                               IMPORTER_IMAGE_SIZE=SIZE, IMPORTER_ACCESS_KEY_ID="alice",
                               IMPORTER_SECRET_KEY="s3cret")
    _ok(result)
    assert qemu_img.compare(str(raw_image), str(vol.disk))
    assert {r.status for r in http_server.requests_for(name)} == {200, 206} if \
        name == "disk.qcow2" else {200}


def test_basic_auth_wrong(http_server: FileServer, raw_image: Path, volume: Callable[..., Volume],
                          import_subprocess: Importer) -> None:
    http_server.configure("disk.raw", auth=("alice", "s3cret"))
    vol = volume()
    result = import_subprocess(vol, IMPORTER_ENDPOINT=http_server.url("disk.raw"),
                               IMPORTER_IMAGE_SIZE=SIZE, IMPORTER_ACCESS_KEY_ID="alice",
                               IMPORTER_SECRET_KEY="wrong")
    assert result.code == 1
    assert result.message == ("Unable to connect to http data source: expected status code 200, "
                              "got 401. Status: 401 Unauthorized")
    assert not vol.disk.exists()


def test_not_found(http_server: FileServer, volume: Callable[..., Volume],
                   import_subprocess: Importer) -> None:
    vol = volume()
    result = import_subprocess(vol, IMPORTER_ENDPOINT=http_server.url("missing.img"),
                               IMPORTER_IMAGE_SIZE=SIZE)
    assert result.code == 1
    assert result.message == ("Unable to connect to http data source: expected status code 200, "
                              "got 404. Status: 404 Not Found")
    assert not vol.disk.exists()


def test_redirect_and_no_head(http_server: FileServer, raw_image: Path,
                              volume: Callable[..., Volume], import_in_process: Importer) -> None:
    http_server.configure("old/disk.raw", redirect_to="/disk.raw", no_head=True)
    http_server.configure("disk.raw", no_head=True)
    vol = volume()
    _ok(import_in_process(vol, IMPORTER_ENDPOINT=http_server.url("old/disk.raw"),
                          IMPORTER_IMAGE_SIZE=SIZE))
    assert qemu_img.compare(str(raw_image), str(vol.disk))
    assert [r.status for r in http_server.requests_for("old/disk.raw")] == [302]
    assert [r.status for r in http_server.requests_for("disk.raw")] == [200]


@pytest.mark.parametrize("mode", ["ca", "insecure"])
def test_tls(https_server: FileServer, tls_files: TLSFiles, volume: Callable[..., Volume],
             import_in_process: Importer, mode: str) -> None:
    raw = images.make_raw(https_server.root / "disk.raw", virtual_size=8 * MiB,
                          extents=[(0, MiB)])
    images.convert(raw, https_server.root / "disk.qcow2", "qcow2")
    env = {"IMPORTER_CERT_DIR": str(tls_files.ca_dir)} if mode == "ca" else {"INSECURE_TLS": "true"}
    for name in ("disk.raw", "disk.qcow2"):  # streamed, and through nbdkit
        vol = volume()
        _ok(import_in_process(vol, IMPORTER_ENDPOINT=https_server.url(name),
                              IMPORTER_IMAGE_SIZE=SIZE, **env))
        assert qemu_img.compare(str(raw), str(vol.disk))


def test_tls_unknown_ca(https_server: FileServer, volume: Callable[..., Volume],
                        import_subprocess: Importer) -> None:
    images.make_raw(https_server.root / "disk.raw", virtual_size=8 * MiB, extents=[(0, MiB)])
    vol = volume()
    result = import_subprocess(vol, IMPORTER_ENDPOINT=https_server.url("disk.raw"),
                               IMPORTER_IMAGE_SIZE=SIZE)
    assert result.code == 1
    assert result.message == (
        f"Unable to connect to http data source: GET {https_server.url('disk.raw')}: "
        "TLS certificate verification failed: unable to get local issuer certificate"
    )


def test_resume_after_cut(http_server: FileServer, raw_image: Path,
                          volume: Callable[..., Volume], import_in_process: Importer) -> None:
    http_server.configure("disk.raw", cut_after=11 * MiB, cut_times=2)
    vol = volume()
    _ok(import_in_process(vol, IMPORTER_ENDPOINT=http_server.url("disk.raw"),
                          IMPORTER_IMAGE_SIZE=SIZE))
    assert qemu_img.compare(str(raw_image), str(vol.disk))
    gets = http_server.requests_for("disk.raw", "GET")
    assert [r.headers.get("range") for r in gets] == [None, f"bytes={11 * MiB}-",
                                                      f"bytes={22 * MiB}-"]
    assert [r.status for r in gets] == [200, 206, 206]
    assert all(r.headers.get("if-range") for r in gets[1:])


def test_resume_after_stall(http_server: FileServer, raw_image: Path,
                            volume: Callable[..., Volume], import_in_process: Importer) -> None:
    http_server.configure("disk.raw", stall_after=5 * MiB, stall_seconds=30)
    vol = volume()
    started = time.monotonic()
    _ok(import_in_process(vol, IMPORTER_ENDPOINT=http_server.url("disk.raw"),
                          IMPORTER_IMAGE_SIZE=SIZE, IMPORTER_STALL_TIMEOUT="1"))
    assert time.monotonic() - started < 20
    assert qemu_img.compare(str(raw_image), str(vol.disk))
    gets = http_server.requests_for("disk.raw", "GET")
    assert len(gets) == 2 and gets[0].headers.get("range") is None
    # Bytes of a read that timed out are not counted, so the resume point may
    # be before the stall; never after it.
    resumed_at = int(gets[1].headers["range"].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= 5 * MiB


def test_no_range_restarts_from_zero(http_server: FileServer, raw_image: Path,
                                     volume: Callable[..., Volume],
                                     import_in_process: Importer) -> None:
    gz = images.compress(raw_image, "gz")
    http_server.configure(gz.name, cut_after=20_000, no_range=True)
    vol = volume()
    _ok(import_in_process(vol, IMPORTER_ENDPOINT=http_server.url(gz.name),
                          IMPORTER_IMAGE_SIZE=SIZE))
    assert qemu_img.compare(str(raw_image), str(vol.disk))
    gets = http_server.requests_for(gz.name, "GET")
    assert [r.headers.get("range") for r in gets] == [None, None]


def test_changed_file_restarts_from_zero(http_server: FileServer, raw_image: Path,
                                         volume: Callable[..., Volume],
                                         import_in_process: Importer, tmp_path: Path) -> None:
    newer = images.make_raw(tmp_path / "newer.raw", virtual_size=images.STANDARD_VIRTUAL_SIZE,
                            extents=[(0, 2 * MiB), (30 * MiB, MiB)], seed=7)
    http_server.configure("disk.raw", cut_after=3 * MiB, change_after_first_get=newer)
    vol = volume()
    _ok(import_in_process(vol, IMPORTER_ENDPOINT=http_server.url("disk.raw"),
                          IMPORTER_IMAGE_SIZE=SIZE))
    assert qemu_img.compare(str(newer), str(vol.disk)), "the new file, not a mix of both"
    statuses = [r.status for r in http_server.requests_for("disk.raw", "GET")]
    assert statuses == [200, 200, 200], "cut, If-Range refused (200), fresh start"


def test_retries_exhausted(http_server: FileServer, raw_image: Path,
                           volume: Callable[..., Volume], import_subprocess: Importer) -> None:
    http_server.configure("disk.raw", cut_after=0, cut_times=100)
    vol = volume()
    result = import_subprocess(vol, IMPORTER_ENDPOINT=http_server.url("disk.raw"),
                               IMPORTER_IMAGE_SIZE=SIZE, IMPORTER_RETRIES="2")
    assert result.code == 1
    assert result.message == (
        f"Unable to process data: transfer of {http_server.url('disk.raw')} failed after "
        "3 attempts at byte 0: the server closed the connection before the end"
    )
    assert not vol.disk.exists(), "half-written data is removed"


@pytest.mark.parametrize("algo", ["md5", "sha1", "sha256", "sha512"])
def test_checksum_match(http_server: FileServer, raw_image: Path, volume: Callable[..., Volume],
                        import_in_process: Importer, algo: str) -> None:
    gz = images.compress(raw_image, "gz")
    digest = hashlib.new(algo, gz.read_bytes()).hexdigest()
    vol = volume()
    _ok(import_in_process(vol, IMPORTER_ENDPOINT=http_server.url(gz.name),
                          IMPORTER_IMAGE_SIZE=SIZE, IMPORTER_CHECKSUM=f"{algo.upper()}:{digest}"))
    assert qemu_img.compare(str(raw_image), str(vol.disk))


@pytest.mark.parametrize("name", ["disk.raw", "disk.qcow2"])
def test_checksum_mismatch(http_server: FileServer, raw_image: Path,
                           volume: Callable[..., Volume], import_subprocess: Importer,
                           name: str) -> None:
    if name == "disk.qcow2":
        images.convert(raw_image, http_server.root / name, "qcow2")
    served = http_server.root / name
    actual = hashlib.sha256(served.read_bytes()).hexdigest()
    wrong = "0" * 64
    vol = volume()
    result = import_subprocess(vol, IMPORTER_ENDPOINT=http_server.url(name),
                               IMPORTER_IMAGE_SIZE=SIZE, IMPORTER_CHECKSUM=f"sha256:{wrong}")
    assert result.code == 0, "CDI's contract: the controller, not a pod restart, handles this"
    assert result.json == {"message": (
        "Unable to process data: checksum validation failed: checksum mismatch: "
        f"expected sha256:{wrong}, calculated sha256:{actual}")}
    assert not vol.disk.exists(), "the written data is removed"
    assert list(vol.scratch_dir.iterdir()) == []


def test_checksum_mismatch_block(http_server: FileServer, raw_image: Path,
                                 volume: Callable[..., Volume],
                                 import_in_process: Importer) -> None:
    vol = volume(block=True, block_size=64 * MiB)
    result = import_in_process(vol, IMPORTER_ENDPOINT=http_server.url("disk.raw"),
                               IMPORTER_CHECKSUM="md5:" + "f" * 32)
    assert result.code == 0
    assert "checksum mismatch" in result.json["message"]  # type: ignore[operator]
    assert images.allocated_bytes(vol.disk) == 0, "nothing of the bad image is left"
    assert vol.disk.stat().st_size == 64 * MiB


@pytest.mark.parametrize("compressed", [False, True], ids=["nbdkit", "scratch"])
def test_backing_file_rejected(http_server: FileServer, volume: Callable[..., Volume],
                               import_in_process: Importer, compressed: bool) -> None:
    overlay, base = images.qcow2_with_backing(http_server.root)
    name = images.compress(overlay, "gz").name if compressed else overlay.name
    vol = volume()
    result = import_in_process(vol, IMPORTER_ENDPOINT=http_server.url(name),
                               IMPORTER_IMAGE_SIZE=SIZE)
    assert result.code == 1
    assert result.message.startswith("Unable to process data: Image ")
    assert result.message.endswith(f"is invalid because it has invalid backing file {base.name}")
    assert http_server.requests_for(base.name) == [], "the backing file is never fetched"
    assert not vol.disk.exists()


def test_backing_url_never_opened(http_server: FileServer, volume: Callable[..., Volume],
                                  import_in_process: Importer) -> None:
    images.make_raw(http_server.root / "base.raw", virtual_size=images.STANDARD_VIRTUAL_SIZE,
                    extents=[(0, MiB)])
    overlay = images.qcow2_with_backing_url(http_server.root, http_server.url("base.raw"))
    vol = volume()
    result = import_in_process(vol, IMPORTER_ENDPOINT=http_server.url(overlay.name),
                               IMPORTER_IMAGE_SIZE=SIZE)
    assert result.code == 1
    assert result.message.endswith(
        f"is invalid because it has invalid backing file {http_server.url('base.raw')}")
    assert http_server.requests_for("base.raw") == []


def test_huge_l1_table(http_server: FileServer, volume: Callable[..., Volume],
                       import_in_process: Importer) -> None:
    bad = images.qcow2_huge_l1(http_server.root / "bad.qcow2")
    vol = volume()
    started = time.monotonic()
    result = import_in_process(vol, IMPORTER_ENDPOINT=http_server.url(bad.name),
                               IMPORTER_IMAGE_SIZE=SIZE)
    assert time.monotonic() - started < 30
    assert result.code == 1
    assert result.message.startswith("Unable to process data: image ")
    assert result.message.endswith(images.HUGE_L1_ERROR)
    assert not vol.disk.exists()


@pytest.mark.parametrize("name,expected", [
    ("disk.raw", "Unable to process data: virtual image size 67108864 is larger than the "
                 "reported available storage 33554432. A larger PVC is required"),
    ("disk.qcow2", "Unable to process data: virtual image size 67108864 is larger than the "
                   "reported available storage 33554432. A larger PVC is required"),
    ("disk.raw.gz", "Unable to process data: image size (more than 33554432 bytes) is larger "
                    "than the reported available storage 33554432. A larger PVC is required"),
])
def test_image_larger_than_target(http_server: FileServer, raw_image: Path,
                                  volume: Callable[..., Volume], import_in_process: Importer,
                                  name: str, expected: str) -> None:
    images.convert(raw_image, http_server.root / "disk.qcow2", "qcow2")
    images.compress(raw_image, "gz")
    vol = volume()
    result = import_in_process(vol, IMPORTER_ENDPOINT=http_server.url(name),
                               IMPORTER_IMAGE_SIZE=str(32 * MiB))
    assert (result.code, result.message) == (1, expected)
    assert not vol.disk.exists()


def test_image_larger_than_block_volume(http_server: FileServer, raw_image: Path,
                                        volume: Callable[..., Volume],
                                        import_in_process: Importer) -> None:
    vol = volume(block=True, block_size=16 * MiB)
    result = import_in_process(vol, IMPORTER_ENDPOINT=http_server.url("disk.raw"))
    assert result.code == 1
    assert result.message == ("Unable to process data: virtual image size 67108864 is larger "
                              "than the reported available storage 16777216. A larger PVC is "
                              "required")
    assert vol.disk.stat().st_size == 16 * MiB


def test_filesystem_overhead(http_server: FileServer, raw_image: Path,
                             volume: Callable[..., Volume], import_in_process: Importer) -> None:
    vol = volume()
    _ok(import_in_process(vol, IMPORTER_ENDPOINT=http_server.url("disk.raw"),
                          IMPORTER_IMAGE_SIZE="100Mi", FILESYSTEM_OVERHEAD="0.055"))
    # usable = RoundDown(ceil(100 MiB / 1.055), 1 MiB) = 94 MiB
    assert vol.disk.stat().st_size == 94 * MiB


def test_preallocation(http_server: FileServer, raw_image: Path, volume: Callable[..., Volume],
                       import_in_process: Importer) -> None:
    images.convert(raw_image, http_server.root / "disk.qcow2", "qcow2")
    for name in ("disk.raw", "disk.qcow2"):
        vol = volume()
        result = import_in_process(vol, IMPORTER_ENDPOINT=http_server.url(name),
                                   IMPORTER_IMAGE_SIZE=str(80 * MiB), PREALLOCATION="true")
        assert result.code == 0
        assert result.json["preallocationApplied"] is True
        assert qemu_img.compare(str(raw_image), str(vol.disk))
        assert images.allocated_bytes(vol.disk) >= 80 * MiB


def test_cache_mode_trynone(http_server: FileServer, raw_image: Path,
                            volume: Callable[..., Volume], import_in_process: Importer,
                            caplog: pytest.LogCaptureFixture) -> None:
    images.convert(raw_image, http_server.root / "disk.qcow2", "qcow2")
    vol = volume()
    with caplog.at_level("INFO", logger="importer.qemu_img"):
        _ok(import_in_process(vol, IMPORTER_ENDPOINT=http_server.url("disk.qcow2"),
                              IMPORTER_IMAGE_SIZE=SIZE, CACHE_MODE="TRYNONE"))
    assert qemu_img.compare(str(raw_image), str(vol.disk))
    runs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("RUN ")]
    assert len(runs) == 1 and " -t none " in runs[0]
    assert sorted(p.name for p in vol.data_dir.iterdir()) == ["disk.img"], "probe removed"


@pytest.mark.parametrize("name", ["disk.raw", "disk.qcow2"])
def test_through_proxy(http_server: FileServer, https_server: FileServer, tls_files: TLSFiles,
                       forward_proxy: ForwardProxy, raw_image: Path,
                       volume: Callable[..., Volume], import_in_process: Importer,
                       name: str) -> None:
    images.convert(raw_image, http_server.root / "disk.qcow2", "qcow2")
    for f in ("disk.raw", "disk.qcow2"):
        (https_server.root / f).parent.mkdir(parents=True, exist_ok=True)
        (https_server.root / f).write_bytes((http_server.root / f).read_bytes())
    for server, extra in ((http_server, {}),
                          (https_server, {"IMPORTER_CERT_DIR": str(tls_files.ca_dir)})):
        vol = volume()
        _ok(import_in_process(vol, IMPORTER_ENDPOINT=server.url(name), IMPORTER_IMAGE_SIZE=SIZE,
                              http_proxy=forward_proxy.url, https_proxy=forward_proxy.url,
                              **extra))
        assert qemu_img.compare(str(raw_image), str(vol.disk))
    seen = forward_proxy.requests()
    assert f"GET {http_server.url(name)}" in seen
    assert f"CONNECT 127.0.0.1:{https_server.port}" in seen


def test_no_proxy_bypasses(http_server: FileServer, forward_proxy: ForwardProxy,
                           raw_image: Path, volume: Callable[..., Volume],
                           import_in_process: Importer) -> None:
    vol = volume()
    _ok(import_in_process(vol, IMPORTER_ENDPOINT=http_server.url("disk.raw"),
                          IMPORTER_IMAGE_SIZE=SIZE, http_proxy=forward_proxy.url,
                          no_proxy="127.0.0.1"))
    assert forward_proxy.requests() == []


@pytest.mark.parametrize("name", ["disk.raw", "disk.qcow2"])
def test_extra_headers(http_server: FileServer, raw_image: Path, volume: Callable[..., Volume],
                       import_in_process: Importer, tmp_path: Path, name: str) -> None:
    images.convert(raw_image, http_server.root / "disk.qcow2", "qcow2")
    secret = tmp_path / "secret-headers" / "0"
    secret.mkdir(parents=True)
    (secret / "token").write_text("X-Secret: hidden\n")
    vol = volume()
    _ok(import_in_process(vol, IMPORTER_ENDPOINT=http_server.url(name), IMPORTER_IMAGE_SIZE=SIZE,
                          IMPORTER_EXTRA_HEADER_0="X-Tenant: blue",
                          IMPORTER_SECRET_EXTRA_HEADERS_DIR=str(secret.parent)))
    gets = http_server.requests_for(name, "GET")
    assert gets and all(r.headers.get("x-tenant") == "blue" for r in gets)
    assert all(r.headers.get("x-secret") == "hidden" for r in gets)


def test_qcow2_without_head_uses_scratch(http_server: FileServer, raw_image: Path,
                                         volume: Callable[..., Volume],
                                         import_in_process: Importer) -> None:
    images.convert(raw_image, http_server.root / "disk.qcow2", "qcow2")
    http_server.configure("disk.qcow2", no_head=True)
    vol = volume(scratch=False)
    result = import_in_process(vol, IMPORTER_ENDPOINT=http_server.url("disk.qcow2"),
                               IMPORTER_IMAGE_SIZE=SIZE)
    assert result.json == {"scratchSpaceRequired": True,
                           "message": "scratch space required and none found"}
    vol = volume()
    _ok(import_in_process(vol, IMPORTER_ENDPOINT=http_server.url("disk.qcow2"),
                          IMPORTER_IMAGE_SIZE=SIZE))
    assert qemu_img.compare(str(raw_image), str(vol.disk))


def test_qcow2_through_nbdkit_survives_cuts(http_server: FileServer, raw_image: Path,
                                           volume: Callable[..., Volume],
                                           import_in_process: Importer) -> None:
    images.convert(raw_image, http_server.root / "disk.qcow2", "qcow2")
    http_server.configure("disk.qcow2", cut_after=100_000, cut_times=3)
    vol = volume(scratch=False)  # proves the nbdkit path: no scratch to fall back on
    _ok(import_in_process(vol, IMPORTER_ENDPOINT=http_server.url("disk.qcow2"),
                          IMPORTER_IMAGE_SIZE=SIZE))
    assert qemu_img.compare(str(raw_image), str(vol.disk))
    assert len(http_server.requests_for("disk.qcow2", "GET")) > 4


def test_file_changed_under_nbdkit_fails_instead_of_mixing(
        http_server: FileServer, raw_image: Path, volume: Callable[..., Volume],
        import_in_process: Importer, tmp_path: Path) -> None:
    served = images.convert(raw_image, http_server.root / "disk.qcow2", "qcow2")
    data = bytearray(served.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4096] = b"\xff" * 4096  # same size, other content, other ETag
    newer = tmp_path / "newer.qcow2"
    newer.write_bytes(bytes(data))
    # Our first GET sees the old file; every request after it, nbdkit's too, the new one.
    http_server.configure("disk.qcow2", change_after_first_get=newer)
    vol = volume(scratch=False)
    result = import_in_process(vol, IMPORTER_ENDPOINT=http_server.url("disk.qcow2"),
                               IMPORTER_IMAGE_SIZE=SIZE, IMPORTER_RETRIES="1")
    assert result.code == 1, result.message
    # The message names the image's URL, not the NBD socket qemu-img read it through.
    assert result.message.startswith(
        f"Unable to process data: image {http_server.url('disk.qcow2')} is invalid: "), \
        result.message
    assert "nbd" not in result.message
    assert not vol.disk.exists()
    by_nbdkit = [r for r in http_server.requests_for("disk.qcow2")
                 if r.headers.get("user-agent") == "cdi-nbdkit-importer"]
    assert by_nbdkit and {r.status for r in by_nbdkit} == {412}, \
        "every request of nbdkit was refused by its If-Match"


def test_credentials_never_follow_a_redirect_to_another_host(
        http_server: FileServer, tmp_path: Path, volume: Callable[..., Volume],
        import_in_process: Importer) -> None:
    other = FileServer(tmp_path / "other").start()
    try:
        raw = images.make_raw(other.root / "disk.raw", virtual_size=16 * MiB,
                              extents=[(0, 4 * MiB)])
        images.convert(raw, other.root / "disk.qcow2", "qcow2")
        other.configure("disk.raw", cut_after=2 * MiB)
        for name in ("disk.raw", "disk.qcow2"):  # streamed with a resume; through nbdkit
            http_server.configure(f"start/{name}", auth=("alice", "s3cret"),
                                  redirect_to=other.url(name))
            vol = volume(scratch=False)
            _ok(import_in_process(vol, IMPORTER_ENDPOINT=http_server.url(f"start/{name}"),
                                  IMPORTER_IMAGE_SIZE=SIZE, IMPORTER_ACCESS_KEY_ID="alice",
                                  IMPORTER_SECRET_KEY="s3cret"))
            assert qemu_img.compare(str(raw), str(vol.disk))
        seen = other.requests
        assert len(seen) > 3 and not any("authorization" in r.headers for r in seen)
    finally:
        other.stop()
