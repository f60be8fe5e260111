"""More of `cdi serve` end to end: scratch space, progress, deletion, admission, seeds, CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from importer import qemu_img
from tests.cdi.api import seeds as seed_files
from tests.cdi.api.test_seeds import SEEDS
from tests.e2e.conftest import Server, condition, phase
from tests.e2e.test_datavolume import http_dv, volume_of
from tests.support import images
from tests.support.httpserver import FileServer

MiB = 1 << 20


@pytest.fixture
def raw(http_server: FileServer) -> Path:
    return images.make_raw(http_server.root / "disk.raw", virtual_size=64 * MiB,
                           extents=[(0, MiB), (20 * MiB, 2 * MiB)])


def test_scratch_space_added_when_the_worker_asks(server: Server, http_server: FileServer,
                                                   raw: Path) -> None:
    qcow2 = images.convert(raw, http_server.root / "disk.qcow2", "qcow2")
    gz = images.compress(qcow2, "gz")
    assert server.create(http_dv("zipped", http_server.url(gz.name))).status_code == 201
    server.wait_for("dv", "zipped", lambda o: phase(o) == "Succeeded")
    assert qemu_img.compare(str(raw), str(volume_of(server, "zipped")))
    ann = server.get("pvc", "zipped")["metadata"]["annotations"]
    assert ann["cdi.kubevirt.io/storage.import.requiresScratch"] == "false"
    # The scratch claim (owned by the finished pod) and its volume are gone.
    assert server.session.get(server.path("pvc", "zipped-scratch")).status_code == 404
    pvs = server.session.get(server.url + "/api/v1/persistentvolumes").json()["items"]
    assert [pv["spec"]["claimRef"]["name"] for pv in pvs] == ["zipped"]


def test_progress_while_importing(server: Server, http_server: FileServer, raw: Path) -> None:
    http_server.configure("disk.raw", stall_after=21 * MiB, stall_seconds=6)
    assert server.create(http_dv("slow", http_server.url("disk.raw"))).status_code == 201
    dv = server.wait_for("dv", "slow", lambda o: _percent(o) > 0, timeout=30)
    percent = float(dv["status"]["progress"].rstrip("%"))
    assert 0 < percent < 100
    transfer = dv["status"]["transfer"]
    assert transfer["bytesTotal"] == 64 * MiB
    assert 0 < transfer["bytesRead"] < 64 * MiB
    assert phase(dv) == "ImportInProgress"
    assert condition(dv, "Running")["status"] == "True"
    dv = server.wait_for("dv", "slow", lambda o: phase(o) == "Succeeded", timeout=60)
    assert "transfer" not in dv["status"]


def _percent(dv: dict[str, Any]) -> float:
    text = dv.get("status", {}).get("progress", "N/A")
    return 0.0 if text in ("N/A", "100.0%") else float(text.rstrip("%"))


def test_delete_leaves_nothing(server: Server, http_server: FileServer, raw: Path) -> None:
    assert server.create(http_dv("gone", http_server.url("disk.raw"))).status_code == 201
    server.wait_for("dv", "gone", lambda o: phase(o) == "Succeeded")
    disk = volume_of(server, "gone")
    assert disk.exists()
    p = server.cli("delete", "dv", "gone")
    assert p.returncode == 0, p.stderr
    for kind in ("dv", "pvc"):
        _wait_absent(server, kind, "gone")
    assert not disk.parent.exists(), "the volume is removed with its claim"


def _wait_absent(server: Server, kind: str, name: str) -> None:
    import time
    deadline = time.monotonic() + 20
    while server.session.get(server.path(kind, name)).status_code != 404:
        assert time.monotonic() < deadline, f"{kind}/{name} still there"
        time.sleep(0.1)


INVALID: list[tuple[str, dict[str, Any], str]] = [
    ("no-source", {"storage": {"resources": {"requests": {"storage": "1Gi"}}}},
     "Data volume should have either Source or SourceRef, or be externally populated"),
    ("two-sources", {"source": {"http": {"url": "http://x/y"}, "blank": {}},
                     "storage": {"resources": {"requests": {"storage": "1Gi"}}}},
     "Multiple Data volume sources"),
    ("no-storage", {"source": {"blank": {}}}, "Missing Data volume PVC"),
    ("both-storage", {"source": {"blank": {}},
                      "storage": {"resources": {"requests": {"storage": "1Gi"}}},
                      "pvc": {"accessModes": ["ReadWriteOnce"],
                              "resources": {"requests": {"storage": "1Gi"}}}},
     "Duplicate storage definition, both target storage and target pvc defined"),
    ("tiny", {"source": {"blank": {}}, "storage": {"resources": {"requests": {"storage": "1Ki"}}}},
     "Storage size should be at least 1MiB"),
    ("bad-url", {"source": {"http": {"url": "ftp://x/y"}},
                 "storage": {"resources": {"requests": {"storage": "1Gi"}}}},
     "spec.source Invalid source URL scheme: ftp://x/y"),
    ("bad-sum", {"source": {"http": {"url": "http://x/y", "checksum": "md5:abc"}},
                 "storage": {"resources": {"requests": {"storage": "1Gi"}}}},
     "Invalid checksum format: invalid md5 hash length: expected 32 hex characters, got 3"),
    ("blank-archive", {"source": {"blank": {}}, "contentType": "archive",
                       "storage": {"resources": {"requests": {"storage": "1Gi"}}}},
     "SourceType cannot be blank and the contentType be archive"),
]


@pytest.mark.parametrize("name,spec,message", INVALID, ids=[i[0] for i in INVALID])
def test_admission_errors(server: Server, name: str, spec: dict[str, Any], message: str) -> None:
    dv = {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
          "metadata": {"name": name}, "spec": spec}
    p = server.cli("apply", "-f", "-", input=json.dumps(dv))
    assert p.returncode == 1
    assert message in p.stderr.strip(), p.stderr
    r = server.create(dv)
    assert r.status_code == 422
    assert r.json()["reason"] == "Invalid" and message in r.json()["message"]


def test_spec_is_immutable(server: Server) -> None:
    dv = {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
          "metadata": {"name": "fixed"},
          "spec": {"source": {"blank": {}},
                   "storage": {"resources": {"requests": {"storage": "8Mi"}}}}}
    assert server.create(dv).status_code == 201
    dv["spec"]["storage"]["resources"]["requests"]["storage"] = "16Mi"
    p = server.cli("apply", "-f", "-", input=json.dumps(dv))
    assert p.returncode == 1
    assert "Cannot update DataVolume Spec" in p.stderr


def test_seed_manifests_apply(server: Server) -> None:
    docs = []
    for f in sorted(SEEDS.glob("*.txt")):
        for m in seed_files.extract(f):
            spec = m.obj.get("spec") or {}
            if m.obj["kind"] == "DataVolume" and "source" not in spec and "sourceRef" not in spec:
                continue  # the one example whose spec the documentation elides
            if not m.obj.get("metadata"):
                m.obj["metadata"] = {"name": f"seed-{m.line}"}  # elided as "# ..." there
            docs.append(m.obj)
    assert len(docs) >= 7
    # A StorageProfile belongs to a StorageClass of the same name (the profile
    # controller removes profiles whose class is gone), so make the classes first.
    for name in {d["metadata"]["name"] for d in docs if d["kind"] == "StorageProfile"}:
        sc = {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
              "metadata": {"name": name}, "provisioner": "example.com/seed"}
        assert server.session.post(server.url + "/apis/storage.k8s.io/v1/storageclasses",
                                   json=sc, timeout=10).status_code == 201
        server.wait_for("storageprofile", name, lambda o: "status" in o, namespace="")
    p = server.cli("apply", "-f", "-", input="\n---\n".join(yaml.safe_dump(d) for d in docs))
    assert p.returncode == 0, p.stderr
    assert p.stdout.count(" created") + p.stdout.count(" configured") == len(docs), p.stdout


def test_profiles_and_config(server: Server) -> None:
    server.wait_for("storageprofile", "local",
                    lambda o: bool(o.get("status", {}).get("claimPropertySets")), namespace="")
    profile = server.get("storageprofile", "local", namespace="")
    assert profile["status"]["claimPropertySets"][0] == {"accessModes": ["ReadWriteOnce"],
                                                         "volumeMode": "Filesystem"}
    assert profile["status"]["cloneStrategy"] == "copy"
    assert profile["status"]["provisioner"] == "cdi.kubevirt.io/local"
    config = server.wait_for("cdiconfig", "config",
                             lambda o: "filesystemOverhead" in o.get("status", {}), namespace="")
    assert config["status"]["filesystemOverhead"] == {
        "global": "0.06", "storageClass": {"local": "0.06", "local-wffc": "0.06"}}
    p = server.cli("get", "sc")
    assert p.returncode == 0
    assert p.stdout.splitlines()[0].split() == ["NAME", "PROVISIONER", "RECLAIMPOLICY",
                                                "VOLUMEBINDINGMODE", "AGE"]


def test_cli_get_describe_logs(server: Server, http_server: FileServer, raw: Path) -> None:
    http_server.configure("missing.raw", status=404)
    assert server.create(http_dv("broken", http_server.url("missing.raw"))).status_code == 201
    server.wait_for("dv", "broken", lambda o: o.get("status", {}).get("restartCount", 0) >= 1)
    p = server.cli("get", "dv")
    assert p.returncode == 0
    header, row = p.stdout.splitlines()[:2]
    assert header.split() == ["NAME", "PHASE", "PROGRESS", "RESTARTS", "AGE"]
    assert row.split()[:2] == ["broken", "ImportInProgress"]
    p = server.cli("describe", "dv", "broken")
    assert p.returncode == 0
    assert "expected status code 200, got 404" in p.stdout
    assert "Warning" in p.stdout and "ImportScheduled" in p.stdout
    p = server.cli("logs", "importer-broken")
    assert p.returncode == 0
    assert "Unable to connect to http data source" in p.stdout
