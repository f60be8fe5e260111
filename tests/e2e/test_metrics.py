"""`GET /metrics` of `cdi serve`: CDI's control-plane gauges from the real objects."""

from __future__ import annotations

import re
import time

import requests

from tests.e2e.conftest import Server, condition


def _metrics(server: Server) -> str:
    r = server.session.get(server.url + "/metrics", timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return r.text


def _value(text: str, pattern: str) -> float | None:
    m = re.search(rf"^{pattern} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else None


def test_control_plane_gauges(server: Server) -> None:
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
