"""HTTP sources of a DataImportCron: the conditional poll against real servers on
127.0.0.1 (ETag, Last-Modified only, weak ETag, neither, no HEAD, auth, TLS, proxy),
and the controller recording the validator, naming and pinning the import."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cdi.backends.embedded.store import SQLiteStore
from cdi.backends.port import Obj
from cdi.controllers import cronhttp, cronpoll
from cdi.controllers import dataimportcron as dic
from cdi.controllers.dataimportcron import DataImportCronController
from tests.support.proxy import ForwardProxy
from tests.support.tls import TLSFiles
from tests.support.versioned import Validators, VersionedServer, etag_of, last_modified_of

NS = "ns"


def serve(tmp_path: Path, validators: Validators = "both", **kw: Any) -> VersionedServer:
    server = VersionedServer(tmp_path / "www", validators=validators, **kw).start()
    (server.root / "disk.img").write_bytes(b"version one\n" * 100)
    os.utime(server.root / "disk.img", (1_700_000_000, 1_700_000_000))
    return server


def change(server: VersionedServer, content: bytes, mtime: int = 1_700_000_100) -> None:
    path = server.root / "disk.img"
    path.write_bytes(content)
    os.utime(path, (mtime, mtime))


@pytest.fixture
def etag_server(tmp_path: Path) -> Iterator[VersionedServer]:
    server = serve(tmp_path, "etag")
    yield server
    server.stop()


def test_etag_poll_is_conditional(etag_server: VersionedServer) -> None:
    target = cronhttp.HTTPTarget(etag_server.url("disk.img"))
    first = cronhttp.poll(target)
    etag = etag_of(etag_server.root / "disk.img")
    assert first == cronhttp.Validator("ETag", etag)
    assert first.digest == "sha256:" + hashlib.sha256(etag.encode()).hexdigest()
    # Unchanged: 304 to If-None-Match, the same validator.
    again = cronhttp.poll(dataclasses.replace(target, last=first))
    assert again == first
    heads = etag_server.requests("HEAD")
    assert [(r.status, r.headers.get("if-none-match")) for r in heads] == \
        [(200, None), (304, etag)]
    assert etag_server.requests("GET") == []
    # Changed: a new ETag, a new digest.
    change(etag_server, b"version two\n" * 100)
    second = cronhttp.poll(dataclasses.replace(target, last=first))
    assert second.kind == "ETag" and second.value == etag_of(etag_server.root / "disk.img")
    assert second.digest != first.digest
    assert etag_server.requests("HEAD")[-1].status == 200


def test_last_modified_only(tmp_path: Path) -> None:
    server = serve(tmp_path, "last-modified")
    try:
        target = cronhttp.HTTPTarget(server.url("disk.img"))
        first = cronhttp.poll(target)
        assert first == cronhttp.Validator("Last-Modified", "Tue, 14 Nov 2023 22:13:20 GMT")
        assert cronhttp.poll(dataclasses.replace(target, last=first)) == first
        assert server.requests("HEAD")[-1].headers["if-modified-since"] == first.value
        assert server.requests("HEAD")[-1].status == 304
        change(server, b"version two\n" * 100)
        second = cronhttp.poll(dataclasses.replace(target, last=first))
        assert second == cronhttp.Validator("Last-Modified",
                                            last_modified_of(server.root / "disk.img"))
        assert second.value == "Tue, 14 Nov 2023 22:15:00 GMT"
        assert second.pin() == "If-Unmodified-Since: Tue, 14 Nov 2023 22:15:00 GMT"
    finally:
        server.stop()


def test_a_strong_etag_is_preferred_to_last_modified(tmp_path: Path) -> None:
    server = serve(tmp_path, "both")
    try:
        found = cronhttp.poll(cronhttp.HTTPTarget(server.url("disk.img")))
        assert found == cronhttp.Validator("ETag", etag_of(server.root / "disk.img"))
        assert found.pin() == f"If-Match: {found.value}"
    finally:
        server.stop()


@pytest.mark.parametrize("validators", ["neither", "weak"])
def test_a_server_without_validators_is_refused(tmp_path: Path,
                                                validators: Validators) -> None:
    server = serve(tmp_path, validators)
    try:
        url = server.url("disk.img")
        with pytest.raises(cronhttp.Unpollable) as e:
            cronhttp.poll(cronhttp.HTTPTarget(url))
        assert str(e.value) == (
            f"the server gives no ETag or Last-Modified for {url}, so a new version cannot "
            "be told from the old one; it is not polled (serve the file with a strong ETag "
            "or a Last-Modified header)")
    finally:
        server.stop()


def test_head_refused_falls_back_to_get_without_the_body(tmp_path: Path) -> None:
    server = serve(tmp_path, "etag", no_head=True)
    try:
        target = cronhttp.HTTPTarget(server.url("disk.img"))
        first = cronhttp.poll(target)
        assert cronhttp.poll(dataclasses.replace(target, last=first)) == first
        assert [(r.method, r.status) for r in server.requests()] == [
            ("HEAD", 405), ("GET", 200), ("HEAD", 405), ("GET", 304)]
        assert server.requests("GET")[1].headers["if-none-match"] == first.value
    finally:
        server.stop()


def test_errors_name_the_status(etag_server: VersionedServer) -> None:
    url = etag_server.url("missing.img")
    with pytest.raises(cronpoll.PollError) as e:
        cronhttp.poll(cronhttp.HTTPTarget(url))
    assert str(e.value) == f"{url}: HTTP 404 Not Found"
    with pytest.raises(cronpoll.PollError, match="connection refused"):
        cronhttp.poll(cronhttp.HTTPTarget("http://127.0.0.1:1/disk.img"))


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


async def _objects(store: SQLiteStore, ca_pem: str, proxy: str = "") -> None:
    await store.create({"apiVersion": "v1", "kind": "Secret",
                        "metadata": {"name": "keys", "namespace": NS},
                        "data": {"accessKeyId": _b64("alice"), "secretKey": _b64("s3cret")}})
    await store.create({"apiVersion": "v1", "kind": "Secret",
                        "metadata": {"name": "hdrs", "namespace": NS},
                        "data": {"token": _b64("X-Token: t0k3n")}})
    await store.create({"apiVersion": "v1", "kind": "ConfigMap",
                        "metadata": {"name": "ca", "namespace": NS},
                        "data": {"ca.crt": ca_pem}})
    if proxy:
        await store.create({"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "CDIConfig",
                            "metadata": {"name": "config"}, "spec": {},
                            "status": {"importProxy": {"HTTPProxy": proxy,
                                                       "HTTPSProxy": proxy}}})


def test_credentials_headers_and_ca_as_the_import_uses_them(
        tmp_path: Path, tls_files: TLSFiles) -> None:
    server = serve(tmp_path, "etag", auth=("alice", "s3cret"), tls=tls_files)
    try:
        url = server.url("disk.img")
        src = {"url": url, "secretRef": "keys", "certConfigMap": "ca",
               "extraHeaders": ["X-Plain: 1", 'If-Match: "stale"'],
               "secretExtraHeaders": ["hdrs"]}

        async def main() -> cronhttp.HTTPTarget:
            async with SQLiteStore(tmp_path / "db") as store:
                await _objects(store, tls_files.ca_cert.read_text())
                return await cronhttp.gather(store, NS, src, None)

        target = asyncio.run(main())
        assert (target.username, target.password) == ("alice", "s3cret")
        assert target.headers == (("X-Plain", "1"), ("X-Token", "t0k3n"))  # no pin header
        found = cronhttp.poll(target)
        assert found.value == etag_of(server.root / "disk.img")
        head = server.requests("HEAD")[-1]
        assert (head.headers["x-plain"], head.headers["x-token"]) == ("1", "t0k3n")
        assert "if-match" not in head.headers
        with pytest.raises(cronpoll.PollError) as e:
            cronhttp.poll(dataclasses.replace(target, password="wrong"))
        assert str(e.value) == f"{url}: HTTP 401 Unauthorized"
        assert "wrong" not in str(e.value)
        with pytest.raises(cronpoll.PollError, match="certificate verification failed"):
            cronhttp.poll(dataclasses.replace(target, ca_pems=()))
    finally:
        server.stop()


def test_through_the_import_proxy(tmp_path: Path, forward_proxy: ForwardProxy) -> None:
    server = serve(tmp_path, "etag")
    try:
        async def main() -> cronhttp.HTTPTarget:
            async with SQLiteStore(tmp_path / "db") as store:
                await _objects(store, "", proxy=forward_proxy.url)
                return await cronhttp.gather(store, NS, {"url": server.url("disk.img")}, None)

        target = asyncio.run(main())
        assert target.proxy == (forward_proxy.url, forward_proxy.url, "")
        cronhttp.poll(target)
        assert forward_proxy.requests() == [f"HEAD {server.url('disk.img')}"]
    finally:
        server.stop()


# -- in the controller ------------------------------------------------------------------


def _cron(url: str) -> Obj:
    return {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataImportCron",
            "metadata": {"name": "web", "namespace": NS},
            "spec": {"schedule": "0 * * * *", "managedDataSource": "web-ds",
                     "template": {"spec": {
                         "source": {"http": {"url": url, "extraHeaders": ["X-A: b"]}},
                         "storage": {"resources": {"requests": {"storage": "1Gi"}}}}}}}


def test_the_controller_records_the_validator_and_pins_the_import(tmp_path: Path) -> None:
    server = serve(tmp_path, "etag")
    now = datetime.datetime(2026, 3, 1, 10, 20, tzinfo=datetime.UTC)

    async def main() -> None:
        async with SQLiteStore(tmp_path / "db") as store:
            controller = DataImportCronController(store, clock=lambda: now)
            await store.create(_cron(server.url("disk.img")))
            assert (await controller.reconcile((NS, "web"))) is not None
            cron = await store.get("DataImportCron", "web", NS)
            etag = etag_of(server.root / "disk.img")
            found = cronhttp.Validator("ETag", etag)
            ann = cron["metadata"]["annotations"]
            assert ann[cronhttp.ANN_VALIDATOR] == f"ETag: {etag}"
            assert ann[dic.ANN_DESIRED_DIGEST] == found.digest
            name = "web-ds-" + found.digest.removeprefix("sha256:")[:12]
            assert cron["status"]["currentImports"] == [
                {"DataVolumeName": name, "Digest": found.digest}]
            dv = await store.get("DataVolume", name, NS)
            assert dv["spec"]["source"]["http"] == {
                "url": server.url("disk.img"), "extraHeaders": ["X-A: b", f"If-Match: {etag}"]}
            # A forced run: 304, nothing new.
            await store.patch("DataImportCron", "web", NS, {"metadata": {"annotations": {
                dic.ANN_NEXT_CRON_TIME: "2000-01-01T00:00:00Z"}}})
            await controller.reconcile((NS, "web"))
            assert [r.status for r in server.requests("HEAD")] == [200, 304]
            assert len((await store.list("DataVolume", NS)).items) == 1

    try:
        asyncio.run(main())
    finally:
        server.stop()


def test_a_server_without_validators_says_so_in_the_condition(tmp_path: Path) -> None:
    server = serve(tmp_path, "neither")
    now = datetime.datetime(2026, 3, 1, 10, 20, tzinfo=datetime.UTC)

    async def main() -> None:
        async with SQLiteStore(tmp_path / "db") as store:
            controller = DataImportCronController(store, clock=lambda: now)
            await store.create(_cron(server.url("disk.img")))
            result = await controller.reconcile((NS, "web"))
            assert result is not None and result.requeue_after == 30.0
            cron = await store.get("DataImportCron", "web", NS)
            up = next(c for c in cron["status"]["conditions"] if c["type"] == "UpToDate")
            why = (f"the server gives no ETag or Last-Modified for {server.url('disk.img')}, "
                   "so a new version cannot be told from the old one; it is not polled "
                   "(serve the file with a strong ETag or a Last-Modified header)")
            assert (up["status"], up["reason"], up["message"]) == (
                "False", "NoDigest", f"No source digest: {why}")
            events = (await store.list("Event", NS)).items
            assert [(e["type"], e["reason"], e["message"]) for e in events] == [
                ("Warning", "PollFailed", f"Failed to poll the source digest: {why}")]
            assert (await store.list("DataVolume", NS)).items == []

    try:
        asyncio.run(main())
    finally:
        server.stop()


def test_a_digest_set_by_hand_is_not_pinned() -> None:
    spec: Obj = {"source": {"http": {"url": "http://x/d.img"}}}
    cron = {"metadata": {"annotations": {cronhttp.ANN_VALIDATOR: 'ETag: "abc"'}}}
    cronhttp.pin(spec, cron, "sha256:" + "0" * 64)
    assert spec == {"source": {"http": {"url": "http://x/d.img"}}}
    cronhttp.pin(spec, cron, cronhttp.Validator("ETag", '"abc"').digest)
    assert spec["source"]["http"]["extraHeaders"] == ['If-Match: "abc"']
