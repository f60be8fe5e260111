"""S3 source behaviour against moto's S3 on 127.0.0.1: formats, credentials, TLS, resume."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from importer import errors, qemu_img
from importer.sources import s3 as s3_source
from tests.importer.conftest import Importer, Volume
from tests.support import images
from tests.support.cutter import Cutter, Mode
from tests.support.s3server import MotoS3
from tests.support.tls import TLSFiles

MiB = 1 << 20
SIZE = str(16 * MiB)
VIRTUAL = 4 * MiB
EXTENTS = [(0, MiB // 2), (MiB + MiB // 2, MiB // 4), (3 * MiB + MiB // 2, MiB // 2)]
DATA = sum(length for _, length in EXTENTS)  # 1.25 MiB
BUCKET = "images"


# -- fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def moto_servers(tls_files: TLSFiles) -> Iterator[tuple[MotoS3, MotoS3]]:
    """moto over HTTP and over HTTPS (a trustme certificate); one S3 behind both."""
    plain, tls = MotoS3().start(), MotoS3(tls_files).start()
    try:
        yield plain, tls
    finally:
        plain.stop()
        tls.stop()


@pytest.fixture
def s3(moto_servers: tuple[MotoS3, MotoS3], monkeypatch: pytest.MonkeyPatch) -> Iterator[MotoS3]:
    """The HTTP endpoint with an empty S3, authentication off, no AWS_* in the environment."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    server = moto_servers[0]
    yield server
    server.require_auth(False)
    for s in moto_servers:  # one S3 behind both; each forgets the buckets it made
        s.reset()


@pytest.fixture
def s3_tls(s3: MotoS3, moto_servers: tuple[MotoS3, MotoS3]) -> MotoS3:
    return moto_servers[1]


class Sources:
    """The test image in each format and compression, each made once per session."""

    def __init__(self, directory: Path) -> None:
        self.raw = images.make_raw(directory / "disk.raw", virtual_size=VIRTUAL, extents=EXTENTS)

    def get(self, fmt: str, compression: str | None = None) -> Path:
        image = self.raw.with_suffix(f".{fmt}")
        if not image.exists():
            images.convert(self.raw, image, fmt)
        if compression is None:
            return image
        packed = image.with_name(f"{image.name}.{compression}")
        return packed if packed.exists() else images.compress(image, compression)


@pytest.fixture(scope="session")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Sources:
    return Sources(tmp_path_factory.mktemp("s3-sources"))


@pytest.fixture
def raw(sources: Sources) -> Path:
    """4 MiB virtual, 1.25 MiB of data (shared: never modify it)."""
    return sources.raw


@pytest.fixture
def cutter(s3: MotoS3) -> Iterator[Callable[..., Cutter]]:
    made: list[Cutter] = []

    def make(*, cut_after: int = 0, cut_times: int = 0, mode: Mode = "close") -> Cutter:
        c = Cutter(s3.port, cut_after=cut_after, cut_times=cut_times, mode=mode).start()
        made.append(c)
        return c

    yield make
    for c in made:
        c.stop()


def _ok(result: object) -> None:
    code, message = getattr(result, "code"), getattr(result, "message")  # noqa: B009
    assert code == 0, message
    assert '"message": "Import Complete"' in message


def _phases(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage().removeprefix("PHASE ") for r in caplog.records
            if r.name == "importer.processor" and r.getMessage().startswith("PHASE ")]


# -- URL parsing ----------------------------------------------------------------------


@pytest.mark.parametrize("url,endpoint,bucket,key,region,tls", [
    ("https://s3.us-west-2.amazonaws.com/bkt/disk.img",
     "https://s3.us-west-2.amazonaws.com", "bkt", "disk.img", "us-west-2", True),
    ("https://s3-eu-west-1.amazonaws.com/bkt/a/b/disk.qcow2",
     "https://s3-eu-west-1.amazonaws.com", "bkt", "a/b/disk.qcow2", "eu-west-1", True),
    ("https://s3.dualstack.ap-south-1.amazonaws.com/bkt/k",
     "https://s3.dualstack.ap-south-1.amazonaws.com", "bkt", "k", "ap-south-1", True),
    ("https://s3.cn-north-1.amazonaws.com.cn/bkt/k",
     "https://s3.cn-north-1.amazonaws.com.cn", "bkt", "k", "cn-north-1", True),
    ("https://s3.amazonaws.com/bkt/k", "https://s3.amazonaws.com", "bkt", "k", "us-east-1", True),
    ("https://s3-external-1.amazonaws.com/bkt/k",
     "https://s3-external-1.amazonaws.com", "bkt", "k", "us-east-1", True),
    ("https://bkt.s3.amazonaws.com/bkt/k", "https://bkt.s3.amazonaws.com", "bkt", "k",
     "us-east-1", True),
    ("https://bkt.s3.us-gov-west-1.amazonaws.com/bkt/k",
     "https://bkt.s3.us-gov-west-1.amazonaws.com", "bkt", "k", "us-gov-west-1", True),
    ("https://s3.eu-west-1.wasabisys.com/bkt/k",
     "https://s3.eu-west-1.wasabisys.com", "bkt", "k", "s3", True),
    ("http://minio.example.com:9000/bkt/dir/disk.img",
     "http://minio.example.com:9000", "bkt", "dir/disk.img", "minio", False),
    ("HTTP://Minio.Example.com/bkt/k", "http://minio.example.com", "bkt", "k", "minio", False),
    ("http://127.0.0.1:9000/bkt/k", "http://127.0.0.1:9000", "bkt", "k", "us-east-1", False),
    ("http://[::1]:9000/bkt/k", "http://[::1]:9000", "bkt", "k", "us-east-1", False),
    ("http://my_store.local/bkt/k", "http://my_store.local", "bkt", "k", "us-east-1", False),
    ("https://user:pw@ceph.lan/bkt/k/", "https://ceph.lan", "bkt", "k", "ceph", True),
    ("https://ceph.lan/bkt/disk%20one.img?x=1", "https://ceph.lan", "bkt", "disk one.img",
     "ceph", True),
])
def test_parse_url(url: str, endpoint: str, bucket: str, key: str, region: str,
                   tls: bool) -> None:
    assert s3_source.parse_url(url) == s3_source.Location(endpoint, bucket, key, region, tls)


@pytest.mark.parametrize("url", ["http://host/bucket-only", "http://host/", "http:///bkt/k",
                                 "http://host:99999/bkt/k"])
def test_parse_url_refuses(url: str) -> None:
    with pytest.raises(errors.SourceError) as e:
        s3_source.parse_url(url)
    assert e.value.termination_message().startswith("Unable to connect to s3 data source: ")
    assert "http(s)://<host>[:port]/<bucket>/<key>" in str(e.value)


# -- formats and targets --------------------------------------------------------------


@pytest.mark.parametrize("block", [False, True], ids=["filesystem", "block"])
@pytest.mark.parametrize("fmt,compression,phase", [
    ("raw", None, "TransferDataFile"),
    ("raw", "gz", "TransferDataFile"),
    ("raw", "xz", "TransferDataFile"),
    ("raw", "zst", "TransferDataFile"),
    ("qcow2", None, "TransferScratch"),
    ("qcow2", "gz", "TransferScratch"),
    ("vmdk", None, "TransferScratch"),
])
def test_formats(s3: MotoS3, sources: Sources, raw: Path, volume: Callable[..., Volume],
                 import_in_process: Importer, caplog: pytest.LogCaptureFixture,
                 fmt: str, compression: str | None, phase: str, block: bool) -> None:
    src = sources.get(fmt, compression)
    s3.put(BUCKET, f"dir/{src.name}", src, public=True)
    vol = volume(block=block, block_size=16 * MiB)
    with caplog.at_level(logging.INFO):
        result = import_in_process(vol, IMPORTER_SOURCE="s3", IMPORTER_IMAGE_SIZE=SIZE,
                                   IMPORTER_ENDPOINT=s3.url(BUCKET, f"dir/{src.name}"))
    _ok(result)
    assert _phases(caplog)[:2] == ["Info", phase]
    assert qemu_img.compare(str(raw), str(vol.disk))
    assert vol.disk.stat().st_size == 16 * MiB
    assert images.allocated_bytes(vol.disk) <= DATA + MiB, "runs of zeros stay unallocated"
    assert list(vol.scratch_dir.iterdir()) == [], "the scratch image is removed"


def test_archive(s3: MotoS3, tmp_path: Path, volume: Callable[..., Volume],
                 import_in_process: Importer) -> None:
    tar = images.make_tar(tmp_path / "files.tar", {"a.txt": b"alpha\n", "d/b.bin": b"\0" * 9})
    s3.put(BUCKET, "files.tar", tar, public=True)
    vol = volume()
    _ok(import_in_process(vol, IMPORTER_SOURCE="s3", IMPORTER_CONTENTTYPE="archive",
                          IMPORTER_ENDPOINT=s3.url(BUCKET, "files.tar")))
    assert (vol.data_dir / "a.txt").read_bytes() == b"alpha\n"
    assert (vol.data_dir / "d" / "b.bin").read_bytes() == b"\0" * 9


def test_image_larger_than_block_volume(s3: MotoS3, raw: Path, volume: Callable[..., Volume],
                                        import_in_process: Importer) -> None:
    s3.put(BUCKET, "disk.raw", raw, public=True)
    vol = volume(block=True, block_size=2 * MiB)
    result = import_in_process(vol, IMPORTER_SOURCE="s3",
                               IMPORTER_ENDPOINT=s3.url(BUCKET, "disk.raw"))
    assert (result.code, result.message) == (
        1, "Unable to process data: virtual image size 4194304 is larger than the reported "
           "available storage 2097152. A larger PVC is required")


# -- credentials and errors -----------------------------------------------------------


def test_credentials(s3: MotoS3, raw: Path, volume: Callable[..., Volume],
                     import_in_process: Importer) -> None:
    s3.put(BUCKET, "disk.raw", raw)
    key_id, secret = s3.create_user("importer")
    s3.require_auth(True)
    url = s3.url(BUCKET, "disk.raw")
    vol = volume()
    _ok(import_in_process(vol, IMPORTER_SOURCE="s3", IMPORTER_ENDPOINT=url,
                          IMPORTER_IMAGE_SIZE=SIZE, IMPORTER_ACCESS_KEY_ID=key_id,
                          IMPORTER_SECRET_KEY=secret))
    assert qemu_img.compare(str(raw), str(vol.disk))

    for key, secret_, reason in [
        (key_id, "wrong-secret", "access denied: the secret key does not match the access key "
                                 "ID (SignatureDoesNotMatch)"),
        ("AKIAUNKNOWN", secret, "access denied: the access key ID is not known "
                                "(InvalidAccessKeyId)"),
    ]:
        vol = volume()
        result = import_in_process(vol, IMPORTER_SOURCE="s3", IMPORTER_ENDPOINT=url,
                                   IMPORTER_IMAGE_SIZE=SIZE, IMPORTER_ACCESS_KEY_ID=key,
                                   IMPORTER_SECRET_KEY=secret_)
        assert (result.code, result.message) == (
            1, f'Unable to connect to s3 data source: could not get s3 object '
               f'"{BUCKET}/disk.raw": {reason}')
        assert not vol.disk.exists()


def test_secret_never_logged(s3: MotoS3, raw: Path, volume: Callable[..., Volume],
                             import_in_process: Importer, caplog: pytest.LogCaptureFixture,
                             cutter: Callable[..., Cutter]) -> None:
    s3.put(BUCKET, "disk.raw", raw)
    key_id, secret = s3.create_user("importer")
    s3.require_auth(True)
    relay = cutter(cut_after=MiB, cut_times=1)  # the resume path logs too
    caplog.clear()
    messages = []
    with caplog.at_level(logging.DEBUG):
        for secret_ in (secret, secret[::-1]):
            vol = volume()
            result = import_in_process(
                vol, IMPORTER_SOURCE="s3", IMPORTER_IMAGE_SIZE=SIZE,
                IMPORTER_ENDPOINT=f"{relay.endpoint}/{BUCKET}/disk.raw",
                IMPORTER_ACCESS_KEY_ID=key_id, IMPORTER_SECRET_KEY=secret_)
            messages.append(result.message)
    assert '"Import Complete"' in messages[0] and "SignatureDoesNotMatch" in messages[1]
    assert relay.cuts == 1 and "RESUME" in caplog.text
    assert caplog.records and key_id in caplog.text, "the capture works"
    for s in (secret, secret[::-1]):
        assert s not in caplog.text
        assert all(s not in m for m in messages)


def test_anonymous(s3: MotoS3, raw: Path, volume: Callable[..., Volume],
                   import_in_process: Importer, cutter: Callable[..., Cutter]) -> None:
    s3.put(BUCKET, "public.raw", raw, public=True)
    s3.put(BUCKET, "private.raw", raw)
    relay = cutter()
    vol = volume()
    _ok(import_in_process(vol, IMPORTER_SOURCE="s3", IMPORTER_IMAGE_SIZE=SIZE,
                          IMPORTER_ENDPOINT=f"{relay.endpoint}/{BUCKET}/public.raw"))
    assert qemu_img.compare(str(raw), str(vol.disk))
    gets = relay.requests()
    assert [(r.method, r.path) for r in gets] == [("GET", f"/{BUCKET}/public.raw")]
    assert "authorization" not in gets[0].headers, "an anonymous request is not signed"

    vol = volume()
    result = import_in_process(vol, IMPORTER_SOURCE="s3", IMPORTER_IMAGE_SIZE=SIZE,
                               IMPORTER_ENDPOINT=s3.url(BUCKET, "private.raw"))
    assert (result.code, result.message) == (
        1, f'Unable to connect to s3 data source: could not get s3 object "{BUCKET}/private.raw": '
           "access denied to an anonymous request (no credentials were given)")


@pytest.mark.parametrize("bucket,key,reason", [
    (BUCKET, "missing.raw", f'the key "missing.raw" does not exist in bucket "{BUCKET}"'),
    ("nobucket", "disk.raw", 'the bucket "nobucket" does not exist'),
])
def test_missing(s3: MotoS3, raw: Path, volume: Callable[..., Volume],
                 import_in_process: Importer, bucket: str, key: str, reason: str) -> None:
    s3.put(BUCKET, "disk.raw", raw)
    vol = volume()
    result = import_in_process(vol, IMPORTER_SOURCE="s3", IMPORTER_IMAGE_SIZE=SIZE,
                               IMPORTER_ENDPOINT=s3.url(bucket, key),
                               IMPORTER_ACCESS_KEY_ID="id", IMPORTER_SECRET_KEY="secret")
    assert (result.code, result.message) == (
        1, f'Unable to connect to s3 data source: could not get s3 object "{bucket}/{key}": '
           f"{reason}")
    assert not vol.disk.exists()


def test_half_credentials(s3: MotoS3, volume: Callable[..., Volume],
                          import_in_process: Importer) -> None:
    result = import_in_process(volume(), IMPORTER_SOURCE="s3", IMPORTER_ACCESS_KEY_ID="id",
                               IMPORTER_ENDPOINT=s3.url(BUCKET, "disk.raw"))
    assert (result.code, result.message) == (
        1, "Unable to connect to s3 data source: the s3 access key and secret key must be set "
           "together or not at all")


def test_unreachable(s3: MotoS3, volume: Callable[..., Volume],
                     import_in_process: Importer) -> None:
    c = Cutter(s3.port)  # bound, never started: nothing accepts on its port
    port = c.port
    c.stop()
    result = import_in_process(volume(), IMPORTER_SOURCE="s3",
                               IMPORTER_ENDPOINT=f"http://127.0.0.1:{port}/{BUCKET}/disk.raw")
    assert (result.code, result.message) == (
        1, f'Unable to connect to s3 data source: could not get s3 object "{BUCKET}/disk.raw" '
           f"from http://127.0.0.1:{port}: connection refused")


# -- TLS ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["ca", "insecure", "none"])
def test_tls(s3_tls: MotoS3, tls_files: TLSFiles, sources: Sources, raw: Path,
             volume: Callable[..., Volume], import_in_process: Importer, mode: str) -> None:
    s3_tls.put(BUCKET, "disk.raw.gz", sources.get("raw", "gz"), public=True)
    env = {"ca": {"IMPORTER_CERT_DIR": str(tls_files.ca_dir)}, "insecure": {"INSECURE_TLS": "true"},
           "none": {}}[mode]
    vol = volume()
    result = import_in_process(vol, IMPORTER_SOURCE="s3", IMPORTER_IMAGE_SIZE=SIZE,
                               IMPORTER_ENDPOINT=s3_tls.url(BUCKET, "disk.raw.gz"), **env)
    if mode == "none":
        assert (result.code, result.message) == (
            1, f'Unable to connect to s3 data source: could not get s3 object '
               f'"{BUCKET}/disk.raw.gz" from {s3_tls.endpoint}: TLS certificate verification '
               "failed: unable to get local issuer certificate")
        return
    _ok(result)
    assert qemu_img.compare(str(raw), str(vol.disk))


# -- resume, restart, checksum --------------------------------------------------------


@pytest.mark.parametrize("name,mode", [("disk.raw", "close"), ("disk.qcow2.xz", "close"),
                                       ("disk.raw", "reset")], ids=["raw", "qcow2.xz", "reset"])
def test_resume_after_cut(s3: MotoS3, sources: Sources, raw: Path,
                          volume: Callable[..., Volume], import_in_process: Importer,
                          cutter: Callable[..., Cutter], caplog: pytest.LogCaptureFixture,
                          name: str, mode: Mode) -> None:
    src = raw if name == "disk.raw" else sources.get("qcow2", "xz")
    etag = s3.put(BUCKET, name, src, public=True)
    cut_after = MiB if name == "disk.raw" else 20_000
    relay = cutter(cut_after=cut_after, cut_times=2, mode=mode)
    vol = volume()
    with caplog.at_level(logging.INFO, logger="importer"):
        _ok(import_in_process(vol, IMPORTER_SOURCE="s3", IMPORTER_IMAGE_SIZE=SIZE,
                              IMPORTER_ENDPOINT=f"{relay.endpoint}/{BUCKET}/{name}"))
    assert qemu_img.compare(str(raw), str(vol.disk))
    gets = relay.requests()
    assert len(gets) == 3 and relay.cuts == 2
    assert "range" not in gets[0].headers
    offsets = [int(g.headers["range"].removeprefix("bytes=").removesuffix("-")) for g in gets[1:]]
    if mode == "reset":  # a reset may drop bytes the client had received but not read
        assert 0 < offsets[0] <= offsets[1] < 2 * cut_after
    else:  # each resume starts where the last response ended (a few hundred bytes of headers)
        assert cut_after - 1024 < offsets[0] < cut_after
        assert 2 * cut_after - 2048 < offsets[1] < 2 * cut_after
    assert all(g.headers["if-match"] == etag for g in gets[1:])
    resumes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("RESUME ")]
    assert len(resumes) == 2 and f"offset={offsets[0]} " in resumes[0]


def test_resume_after_stall(s3: MotoS3, raw: Path, volume: Callable[..., Volume],
                            import_in_process: Importer, cutter: Callable[..., Cutter],
                            caplog: pytest.LogCaptureFixture) -> None:
    s3.put(BUCKET, "disk.raw", raw, public=True)
    relay = cutter(cut_after=MiB, cut_times=1, mode="stall")
    vol = volume()
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="importer"):
        _ok(import_in_process(vol, IMPORTER_SOURCE="s3", IMPORTER_IMAGE_SIZE=SIZE,
                              IMPORTER_ENDPOINT=f"{relay.endpoint}/{BUCKET}/disk.raw",
                              IMPORTER_STALL_TIMEOUT="1"))
    assert time.monotonic() - started < 15, "the stall timeout is the socket's read timeout"
    assert qemu_img.compare(str(raw), str(vol.disk))
    assert [g.headers.get("range") is not None for g in relay.requests()] == [False, True]
    assert any("RESUME " in m and "reason=timed out" in m for m in caplog.messages)


def test_changed_object_restarts_from_zero(s3: MotoS3, raw: Path, tmp_path: Path,
                                           volume: Callable[..., Volume],
                                           import_in_process: Importer,
                                           cutter: Callable[..., Cutter]) -> None:
    newer = images.make_raw(tmp_path / "newer.raw", virtual_size=VIRTUAL,
                            extents=[(MiB, 2 * MiB)], seed=7)
    first = s3.put(BUCKET, "disk.raw", raw, public=True)
    relay = cutter(cut_after=MiB, cut_times=1)
    # The object is replaced while the importer is cut off.
    relay.on_cut = lambda: s3.put(BUCKET, "disk.raw", newer, public=True)
    vol = volume()
    _ok(import_in_process(vol, IMPORTER_SOURCE="s3", IMPORTER_IMAGE_SIZE=SIZE,
                          IMPORTER_ENDPOINT=f"{relay.endpoint}/{BUCKET}/disk.raw"))
    assert qemu_img.compare(str(newer), str(vol.disk)), "the new object, not a mix of both"
    gets = relay.requests()
    assert [(g.headers.get("range"), g.headers.get("if-match")) for g in gets] == [
        (None, None), (gets[1].headers["range"], first), (None, None)
    ], "cut, If-Match refused (412), fresh start"


def test_retries_exhausted(s3: MotoS3, raw: Path, volume: Callable[..., Volume],
                           import_in_process: Importer, cutter: Callable[..., Cutter]) -> None:
    s3.put(BUCKET, "disk.raw", raw, public=True)
    relay = cutter(cut_after=MiB, cut_times=100)
    relay.on_cut = lambda: setattr(relay, "cut_after", 0)  # then no resume gets a byte
    vol = volume()
    url = f"{relay.endpoint}/{BUCKET}/disk.raw"
    result = import_in_process(vol, IMPORTER_SOURCE="s3", IMPORTER_IMAGE_SIZE=SIZE,
                               IMPORTER_ENDPOINT=url, IMPORTER_RETRIES="2")
    assert result.code == 1
    assert re.fullmatch(rf"Unable to process data: transfer of {re.escape(url)} failed after 3 "
                        r"attempts at byte 10\d{5}: Remote end closed connection without response",
                        result.message), result.message
    assert relay.cuts == 3
    assert not vol.disk.exists(), "half-written data is removed"


@pytest.mark.parametrize("block", [False, True], ids=["filesystem", "block"])
def test_checksum(s3: MotoS3, sources: Sources, raw: Path, volume: Callable[..., Volume],
                  import_in_process: Importer, block: bool) -> None:
    gz = sources.get("raw", "gz")
    s3.put(BUCKET, gz.name, gz, public=True)
    actual = hashlib.sha256(gz.read_bytes()).hexdigest()
    url = s3.url(BUCKET, gz.name)
    vol = volume(block=block, block_size=16 * MiB)
    _ok(import_in_process(vol, IMPORTER_SOURCE="s3", IMPORTER_IMAGE_SIZE=SIZE,
                          IMPORTER_ENDPOINT=url, IMPORTER_CHECKSUM=f"sha256:{actual}"))
    assert qemu_img.compare(str(raw), str(vol.disk))

    wrong = "0" * 64
    vol = volume(block=block, block_size=16 * MiB)
    result = import_in_process(vol, IMPORTER_SOURCE="s3", IMPORTER_IMAGE_SIZE=SIZE,
                               IMPORTER_ENDPOINT=url, IMPORTER_CHECKSUM=f"sha256:{wrong}")
    assert result.code == 0, "CDI's contract: the controller, not a pod restart, handles this"
    assert result.json == {"message": (
        "Unable to process data: checksum validation failed: checksum mismatch: "
        f"expected sha256:{wrong}, calculated sha256:{actual}")}
    if block:
        assert images.allocated_bytes(vol.disk) == 0, "nothing of the bad image is left"
    else:
        assert not vol.disk.exists(), "the written data is removed"
