"""`cdi describe` and `cdi wait`, run as a user runs them."""

from __future__ import annotations

import datetime
import threading
import time
from typing import Any

from tests.cdi.apiserver.harness import datavolume
from tests.cdi.apiserver.test_resources import DVS
from tests.cdi.cli.conftest import Cluster

EVENTS = "/api/v1/namespaces/default/events"


def ago(seconds: int) -> str:
    t = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=seconds)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def event(name: str, involved: dict[str, Any], reason: str, message: str, seconds_ago: int,
          type_: str = "Normal") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Event", "metadata": {"name": name},
            "involvedObject": involved, "reason": reason, "message": message, "type": type_,
            "firstTimestamp": ago(seconds_ago), "lastTimestamp": ago(seconds_ago), "count": 1}


def test_describe_datavolume(cluster: Cluster) -> None:
    dv = cluster.post(DVS, datavolume("fedora", labels={"os": "fedora"}))
    cluster.set_status(DVS + "/fedora", {
        "phase": "Succeeded", "progress": "100.0%", "restartCount": 1, "claimName": "fedora",
        "conditions": [
            {"type": "Bound", "status": "True", "reason": "Bound", "message": "PVC fedora Bound"},
            {"type": "Ready", "status": "True"},
            {"type": "Running", "status": "False", "reason": "Completed",
             "message": "Import Complete"}]})
    mine = {"kind": "DataVolume", "name": "fedora", "namespace": "default",
            "uid": dv["metadata"]["uid"]}
    cluster.post(EVENTS, event("e2", mine, "ImportSucceeded", "Successfully imported", 5))
    cluster.post(EVENTS, event("e1", mine, "Pending", "PVC fedora Pending", 150, "Warning"))
    cluster.post(EVENTS, event("e3", dict(mine, name="other", uid="x"), "Other", "not mine", 1))

    p = cluster.cdi("describe", "dv", "fedora")
    assert (p.returncode, p.stderr) == (0, "")
    out = p.stdout.splitlines()
    assert out[:6] == [
        "Name:         fedora",
        "Namespace:    default",
        "Labels:       os=fedora",
        "Annotations:  <none>",
        "API Version:  cdi.kubevirt.io/v1beta1",
        "Kind:         DataVolume",
    ]
    text = p.stdout
    assert ("Spec:\n  Source:        http (url=http://example.com/d.img)\n"
            "  Storage Size:  1Gi\n") in text
    assert ("Status:\n  Phase:          Succeeded\n  Progress:       100.0%\n"
            "  Restart Count:  1\n  Claim Name:     fedora\n") in text
    assert ("Conditions:\n"
            "  TYPE      STATUS   REASON      MESSAGE\n"
            "  Bound     True     Bound       PVC fedora Bound\n"
            "  Ready     True\n"
            "  Running   False    Completed   Import Complete\n") in text
    events = text[text.index("Events:"):].splitlines()
    assert events[:2] == ["Events:", "  TYPE      REASON            AGE     MESSAGE"]
    assert events[2].startswith("  Warning   Pending           2m3")
    assert events[2].endswith("PVC fedora Pending")
    assert events[3].startswith("  Normal    ImportSucceeded   ")
    assert len(events) == 4


def test_describe_generic_and_missing(cluster: Cluster) -> None:
    cluster.post("/apis/storage.k8s.io/v1/storageclasses", {
        "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
        "metadata": {"name": "local"}, "provisioner": "cdi.kubevirt.io/local"})
    cluster.post("/apis/cdi.kubevirt.io/v1beta1/storageprofiles", {
        "apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "StorageProfile",
        "metadata": {"name": "local"},
        "spec": {"claimPropertySets": [{"accessModes": ["ReadWriteOnce"],
                                        "volumeMode": "Filesystem"}]}})
    p = cluster.cdi("describe", "storageprofile", "local")
    assert p.returncode == 0, p.stderr
    assert "Namespace:" not in p.stdout
    assert ("Spec:\n  Claim Property Sets:\n    Access Modes:       ReadWriteOnce\n"
            "    Volume Mode:        Filesystem\n") in p.stdout
    assert p.stdout.endswith("Status:  <none>\nEvents:  <none>\n")
    p = cluster.cdi("describe", "dv", "missing")
    assert (p.returncode, p.stderr) == (1, 'Error from server (NotFound): datavolume "missing" '
                                           "not found\n")


def later(seconds: float, action: Any) -> threading.Thread:
    def run() -> None:
        time.sleep(seconds)
        action()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_wait_for_condition(cluster: Cluster) -> None:
    cluster.post(DVS, datavolume("fedora"))
    cluster.set_status(DVS + "/fedora", {"conditions": [{"type": "Ready", "status": "False"}]})
    thread = later(1, lambda: cluster.set_status(
        DVS + "/fedora", {"conditions": [{"type": "Ready", "status": "True"}]}))
    start = time.monotonic()
    p = cluster.cdi("wait", "dv/fedora", "--for=condition=Ready", "--timeout=30s")
    thread.join()
    assert (p.returncode, p.stdout, p.stderr) == (
        0, "datavolume.cdi.kubevirt.io/fedora condition met\n", "")
    assert time.monotonic() - start < 10
    p = cluster.cdi("wait", "datavolume", "fedora", "--for", "condition=ready=true")
    assert p.returncode == 0, p.stderr


def test_wait_times_out(cluster: Cluster) -> None:
    cluster.post(DVS, datavolume("fedora"))
    start = time.monotonic()
    p = cluster.cdi("wait", "dv/fedora", "--for=condition=Ready", "--timeout=2s")
    elapsed = time.monotonic() - start
    assert (p.returncode, p.stdout) == (1, "")
    assert p.stderr == "error: timed out waiting for the condition on datavolumes/fedora\n"
    assert 1.5 < elapsed < 10
    p = cluster.cdi("wait", "dv/missing", "--for=condition=Ready", "--timeout=2s")
    assert (p.returncode, p.stderr) == (1, 'Error from server (NotFound): datavolume "missing" '
                                           "not found\n")
    p = cluster.cdi("wait", "dv/fedora", "--for=jsonpath={.status}", "--timeout=1s")
    assert p.returncode == 1
    assert p.stderr.startswith('error: unrecognized condition: "jsonpath={.status}"')


def test_wait_for_delete(cluster: Cluster) -> None:
    cluster.post(DVS, datavolume("fedora"))
    thread = later(1, lambda: cluster.api("DELETE", DVS + "/fedora"))
    p = cluster.cdi("wait", "dv/fedora", "--for=delete", "--timeout=30s")
    thread.join()
    assert (p.returncode, p.stdout) == (0, "datavolume.cdi.kubevirt.io/fedora deleted\n")
    p = cluster.cdi("wait", "dv/fedora", "--for=delete", "--timeout=0")
    assert p.returncode == 0
