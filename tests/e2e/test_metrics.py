"""`GET /metrics` of `cdi serve`: CDI's control-plane gauges from the real objects."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

import requests

from tests.e2e.conftest import Server, condition
from tests.support.versioned import VersionedServer


def _metrics(server: Server) -> str:
    r = server.session.get(server.url + "/metrics", timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return r.text


def _value(text: str, pattern: str) -> float | None:
    m = re.search(rf"^{pattern} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else None


def test_control_plane_gauges(server: Server) -> None:
    # The profile controller fills the local class's profile shortly after start.
    server.wait_for("storageprofile", "local", namespace="",
                    predicate=lambda o: bool(o.get("status", {}).get("claimPropertySets")))
    text = _metrics(server)
    assert _value(text, "kubevirt_cdi_cr_ready") == 1.0
    assert _value(text, "kubevirt_cdi_datavolume_pending") == 0.0
    assert _value(text, re.escape(
        'kubevirt_cdi_storageprofile_info{complete="true",default="true",degraded="true",'
        'provisioner="cdi.kubevirt.io/local",rwx="false",smartclone="false",'
        'storageclass="local",virtdefault="false"}')) == 1.0, text
    # A cron with no digest yet is outdated.
    cron = {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataImportCron",
            "metadata": {"name": "fedora"},
            "spec": {"managedDataSource": "fedora", "schedule": "",
                     "template": {"spec": {
                         "source": {"registry": {"url": "docker://127.0.0.1:1/fedora:41"}},
                         "storage": {"resources": {"requests": {"storage": "1Gi"}}}}}}}
    assert server.create(cron).status_code == 201
    server.wait_for("dataimportcron", "fedora", lambda o: bool(condition(o, "UpToDate")))
    assert _value(_metrics(server), re.escape(
        'kubevirt_cdi_dataimportcron_outdated{cron_name="fedora",namespace="default",'
        'pending="false"}')) == 1.0
    # An importer that keeps failing is counted once it restarted more than 3 times.
    dv = {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
          "metadata": {"name": "unreachable"},
          "spec": {"source": {"http": {"url": "http://127.0.0.1:1/disk.img"}},
                   "storage": {"resources": {"requests": {"storage": "8Mi"}}}}}
    assert server.create(dv).status_code == 201
    assert _value(_metrics(server), "cluster:kubevirt_cdi_import_pods_high_restart:count") == 0
    deadline = time.monotonic() + 90
    while _value(_metrics(server), "cluster:kubevirt_cdi_import_pods_high_restart:count") != 1:
        assert time.monotonic() < deadline, server.get("dv", "unreachable")["status"]
        time.sleep(0.5)


def test_metrics_need_a_token(server: Server) -> None:
    r = requests.get(server.url + "/metrics", timeout=10)
    assert r.status_code == 401


def _outdated(server: Server, name: str, pending: str) -> float | None:
    return _value(_metrics(server), re.escape(
        f'kubevirt_cdi_dataimportcron_outdated{{cron_name="{name}",namespace="default",'
        f'pending="{pending}"}}'))


def _cron(name: str, url: str) -> dict[str, Any]:
    return {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataImportCron",
            "metadata": {"name": name},
            "spec": {"managedDataSource": name, "schedule": "0 0 1 1 *",
                     "template": {"spec": {
                         "source": {"http": {"url": url}},
                         "storage": {"resources": {"requests": {"storage": "8Mi"}}}}}}}


def test_dataimportcron_outdated(server: Server, tmp_path: Path) -> None:
    web = VersionedServer(tmp_path / "www", validators="etag").start()
    try:
        (web.root / "disk.img").write_bytes(os.urandom(1 << 20))
        # Up to date: imported, UpToDate True -> 0.
        assert server.create(_cron("current", web.url("disk.img"))).status_code == 201
        server.wait_for("dataimportcron", "current",
                        lambda o: condition(o, "UpToDate").get("status") == "True", timeout=60)
        assert _outdated(server, "current", "false") == 0.0
        # Outdated: its source cannot be polled (404), UpToDate False -> 1.
        assert server.create(_cron("stale", web.url("missing.img"))).status_code == 201
        server.wait_for("dataimportcron", "stale",
                        lambda o: condition(o, "UpToDate").get("reason") == "NoDigest")
        assert _outdated(server, "stale", "false") == 1.0
        # No default storage class: a new cron that uses the default is pending.
        r = server.session.patch(
            server.path("storageclass", "local", ""), timeout=10,
            json={"metadata": {"annotations": {
                "storageclass.kubernetes.io/is-default-class": "false"}}},
            headers={"Content-Type": "application/merge-patch+json"})
        assert r.status_code == 200, r.text
        assert server.create(_cron("waiting", web.url("disk.img"))).status_code == 201
        cron = server.wait_for("dataimportcron", "waiting",
                               lambda o: bool(condition(o, "UpToDate")))
        assert "cdi.kubevirt.io/storage.import.storageClass" not in \
            cron["metadata"]["annotations"]
        assert _outdated(server, "waiting", "true") == 1.0
        assert _outdated(server, "current", "false") == 0.0
    finally:
        web.stop()
