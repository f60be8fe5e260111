"""DataImportCron over an HTTP URL, end to end: a real `cdi serve` polling real servers.

With a strong ETag: the file at creation is imported and the DataSource is Ready on it;
an unchanged file answers the forced poll with 304 and nothing is imported; a new file
(new ETag) is imported on the next forced poll, pinned with ``If-Match``, and the
DataSource moves to it.  A server with only Last-Modified works the same way with
``If-Modified-Since``/``If-Unmodified-Since``.  A server with neither is refused, with a
Warning event and the reason in the UpToDate condition.  Content is compared with
``qemu-img compare``.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from importer import qemu_img
from tests.e2e.conftest import Server, condition, phase
from tests.e2e.test_datavolume import volume_of
from tests.support import images
from tests.support.versioned import VersionedServer, etag_of, last_modified_of

MiB = 1 << 20
NEXT = "cdi.kubevirt.io/storage.import.nextCronTime"
LAST = "cdi.kubevirt.io/storage.import.lastCronTime"
DIGEST = "cdi.kubevirt.io/storage.import.sourceDesiredDigest"
VALIDATOR = "cdi.kubevirt.io/storage.import.sourceValidator"


@pytest.fixture
def web(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[VersionedServer]:
    server = VersionedServer(tmp_path / "www", validators=request.param).start()
    try:
        yield server
    finally:
        server.stop()


def _image(server: VersionedServer, tmp_path: Path, seed: int, mtime: int) -> Path:
    """A qcow2 of an 8 MiB disk with 1 MiB of data, served as disk.qcow2."""
    raw = images.make_raw(tmp_path / f"v{seed}.raw", virtual_size=8 * MiB,
                          extents=[(seed * MiB, MiB)], seed=seed)
    images.convert(raw, tmp_path / f"v{seed}.qcow2", "qcow2")
    served = server.root / "disk.qcow2"
    served.write_bytes((tmp_path / f"v{seed}.qcow2").read_bytes())
    os.utime(served, (mtime, mtime))
    return raw


def _cron(url: str) -> dict[str, Any]:
    return {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataImportCron",
            "metadata": {"name": "web-cron"},
            "spec": {"schedule": "0 0 1 1 *", "managedDataSource": "web",
                     "importsToKeep": 1,
                     "template": {"spec": {
                         "source": {"http": {"url": url}},
                         "storage": {"resources": {"requests": {"storage": "16Mi"}}}}}}}


def _name(validator: str) -> str:
    return "web-" + hashlib.sha256(validator.encode()).hexdigest()[:12]


def _poll_now(server: Server) -> str:
    """Force a run; return the lastCronTime it is to replace."""
    before = str(server.get("dic", "web-cron")["metadata"]["annotations"].get(LAST, ""))
    time.sleep(1.1)  # lastCronTime has a resolution of one second
    r = server.session.patch(server.path("dic", "web-cron"), timeout=10,
                             json={"metadata": {"annotations": {NEXT: "2000-01-01T00:00:00Z"}}},
                             headers={"Content-Type": "application/merge-patch+json"})
    assert r.status_code == 200, r.text
    return before


def _polled_since(before: str) -> Any:
    return lambda o: o["metadata"]["annotations"].get(LAST, "") not in ("", before) and \
        not o["metadata"]["annotations"][NEXT].startswith("2000")


def _source(ds: dict[str, Any]) -> str:
    return str(((ds.get("spec") or {}).get("source") or {}).get("pvc", {}).get("name", ""))


def _cron_volumes(server: Server) -> list[str]:
    items = server.session.get(server.path("dv"), timeout=10,
                               params={"labelSelector": "cdi.kubevirt.io/dataImportCron=web-cron"}
                               ).json()["items"]
    return sorted(i["metadata"]["name"] for i in items)


def _ready_on(server: Server, name: str) -> None:
    server.wait_for("das", "web", lambda o: _source(o) == name, timeout=90)
    ds = server.wait_for("das", "web", lambda o: condition(o, "Ready").get("status") == "True")
    assert ds["status"]["source"]["pvc"]["name"] == name
    cron = server.wait_for("dic", "web-cron",
                           lambda o: condition(o, "UpToDate").get("status") == "True")
    assert condition(cron, "UpToDate")["message"] == "Latest import is up to date"
    assert cron["status"]["lastImportedPVC"] == {"namespace": "default", "name": name}


@pytest.mark.parametrize("web", ["etag"], indirect=True)
def test_an_http_cron_follows_the_etag(server: Server, web: VersionedServer,
                                       tmp_path: Path) -> None:
    v1 = _image(web, tmp_path, 1, 1_700_000_000)
    etag1 = etag_of(web.root / "disk.qcow2")
    name1 = _name(etag1)
    url = web.url("disk.qcow2")
    assert server.create(_cron(url)).status_code == 201
    _ready_on(server, name1)
    cron = server.get("dic", "web-cron")
    digest1 = "sha256:" + hashlib.sha256(etag1.encode()).hexdigest()
    assert cron["metadata"]["annotations"][DIGEST] == digest1
    assert cron["metadata"]["annotations"][VALIDATOR] == f"ETag: {etag1}"
    assert cron["status"]["currentImports"] == [{"DataVolumeName": name1, "Digest": digest1}]
    dv = server.get("dv", name1)
    assert phase(dv) == "Succeeded"
    assert dv["spec"]["source"]["http"] == {"url": url, "extraHeaders": [f"If-Match: {etag1}"]}
    assert qemu_img.compare(str(v1), str(volume_of(server, name1)))
    gets = len(web.requests("GET"))  # two: without scratch space, then with it
    assert {r.headers.get("if-match") for r in web.requests("GET")} == {etag1}

    # Unchanged: the forced poll is answered 304 and nothing is imported.
    before = _poll_now(server)
    server.wait_for("dic", "web-cron", _polled_since(before), timeout=30)
    heads = web.requests("HEAD")
    assert [(r.status, r.headers.get("if-none-match")) for r in heads] == \
        [(200, None), (304, etag1)]
    assert _cron_volumes(server) == [name1]
    assert len(web.requests("GET")) == gets

    # A new file: a new ETag, imported on the next poll; the DataSource moves to it and
    # the older import is collected (importsToKeep: 1).
    v2 = _image(web, tmp_path, 2, 1_700_000_100)
    etag2 = etag_of(web.root / "disk.qcow2")
    name2 = _name(etag2)
    _poll_now(server)
    _ready_on(server, name2)
    assert web.requests("HEAD")[-1].status == 200
    assert server.get("dv", name2)["spec"]["source"]["http"]["extraHeaders"] == \
        [f"If-Match: {etag2}"]
    assert qemu_img.compare(str(v2), str(volume_of(server, name2)))
    server.wait_for("dic", "web-cron", lambda o: _cron_volumes(server) == [name2])


@pytest.mark.parametrize("web", ["last-modified"], indirect=True)
def test_a_last_modified_only_server(server: Server, web: VersionedServer,
                                     tmp_path: Path) -> None:
    v1 = _image(web, tmp_path, 1, 1_700_000_000)
    stamp = last_modified_of(web.root / "disk.qcow2")
    assert stamp == "Tue, 14 Nov 2023 22:13:20 GMT"
    name1 = _name(stamp)
    assert server.create(_cron(web.url("disk.qcow2"))).status_code == 201
    _ready_on(server, name1)
    assert server.get("dv", name1)["spec"]["source"]["http"]["extraHeaders"] == \
        [f"If-Unmodified-Since: {stamp}"]
    assert qemu_img.compare(str(v1), str(volume_of(server, name1)))
    before = _poll_now(server)
    server.wait_for("dic", "web-cron", _polled_since(before), timeout=30)
    assert [(r.status, r.headers.get("if-modified-since")) for r in web.requests("HEAD")] \
        == [(200, None), (304, stamp)]
    assert _cron_volumes(server) == [name1]

    v2 = _image(web, tmp_path, 2, 1_700_000_100)
    name2 = _name(last_modified_of(web.root / "disk.qcow2"))
    _poll_now(server)
    _ready_on(server, name2)
    assert qemu_img.compare(str(v2), str(volume_of(server, name2)))


@pytest.mark.parametrize("web", ["neither"], indirect=True)
def test_a_server_without_validators_is_refused(server: Server, web: VersionedServer,
                                                tmp_path: Path) -> None:
    _image(web, tmp_path, 1, 1_700_000_000)
    url = web.url("disk.qcow2")
    assert server.create(_cron(url)).status_code == 201
    why = (f"the server gives no ETag or Last-Modified for {url}, so a new version cannot be "
           "told from the old one; it is not polled (serve the file with a strong ETag or a "
           "Last-Modified header)")
    cron = server.wait_for("dic", "web-cron",
                           lambda o: condition(o, "UpToDate").get("reason") == "NoDigest"
                           and ":" in condition(o, "UpToDate").get("message", ""))
    assert condition(cron, "UpToDate")["status"] == "False"
    assert condition(cron, "UpToDate")["message"] == f"No source digest: {why}"
    assert DIGEST not in cron["metadata"]["annotations"]
    items = server.session.get(server.url + "/api/v1/namespaces/default/events",
                               timeout=10).json()["items"]
    assert [(e["type"], e["reason"], e["message"]) for e in items
            if e["involvedObject"]["name"] == "web-cron"] == [
        ("Warning", "PollFailed", f"Failed to poll the source digest: {why}")]
    assert _cron_volumes(server) == []
    assert web.requests("GET") == []


@pytest.mark.parametrize("web", ["etag"], indirect=True)
def test_a_file_replaced_between_poll_and_import(server: Server, web: VersionedServer,
                                                 tmp_path: Path) -> None:
    """The import is pinned to the polled ETag: the newer file is refused (412), the
    DataSource is not pointed at it, and the next poll imports the newer file."""
    _image(web, tmp_path, 1, 1_700_000_000)
    etag1 = etag_of(web.root / "disk.qcow2")
    name1 = _name(etag1)
    v2_raw = images.make_raw(tmp_path / "v2.raw", virtual_size=8 * MiB,
                             extents=[(2 * MiB, MiB)], seed=2)
    images.convert(v2_raw, tmp_path / "v2.qcow2", "qcow2")

    def replace_once(request: Any) -> None:  # right after the cron's poll
        web.on_head = None
        served = web.root / "disk.qcow2"
        served.write_bytes((tmp_path / "v2.qcow2").read_bytes())
        os.utime(served, (1_700_000_100, 1_700_000_100))

    web.on_head = replace_once
    url = web.url("disk.qcow2")
    assert server.create(_cron(url)).status_code == 201
    dv = server.wait_for("dv", name1,
                         lambda o: condition(o, "Running").get("reason") == "Error", timeout=60)
    assert condition(dv, "Running")["message"] == (
        f"Unable to connect to http data source: {url} is no longer the version this import "
        f"is pinned to (If-Match: {etag1}): the server answered 412 Precondition Failed")
    assert {r.status for r in web.requests("GET")} == {412}
    cron = server.get("dic", "web-cron")
    assert condition(cron, "UpToDate")["status"] == "False"
    assert "lastImportedPVC" not in cron["status"]

    # The next poll sees the newer file: the failed import goes, the newer one is imported.
    etag2 = etag_of(web.root / "disk.qcow2")
    name2 = _name(etag2)
    _poll_now(server)
    _ready_on(server, name2)
    assert qemu_img.compare(str(v2_raw), str(volume_of(server, name2)))
    server.wait_for("dic", "web-cron", lambda o: _cron_volumes(server) == [name2])
