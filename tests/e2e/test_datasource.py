"""DataSources through a real `cdi serve`: Ready follows claims, DataVolumes and references."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from importer import qemu_img
from tests.e2e.conftest import Server, condition, phase
from tests.e2e.test_datavolume import volume_of
from tests.support import images

MiB = 1 << 20

READY = ("True", "Ready", "DataSource is ready to be consumed")


def _ds(name: str, source: dict[str, Any], namespace: str = "default") -> dict[str, Any]:
    return {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataSource",
            "metadata": {"name": name, "namespace": namespace}, "spec": {"source": source}}


def _ready(obj: dict[str, Any]) -> tuple[str, str, str]:
    c = condition(obj, "Ready")
    return c.get("status", ""), c.get("reason", ""), c.get("message", "")


def _wait_reason(server: Server, name: str, reason: str,
                 namespace: str = "default") -> dict[str, Any]:
    return server.wait_for("das", name, lambda o: _ready(o)[1] == reason, namespace=namespace)


def test_ready_once_the_blank_datavolume_succeeds(server: Server) -> None:
    pvc = {"pvc": {"name": "golden", "namespace": "default"}}
    assert server.create(_ds("golden", pvc)).status_code == 201
    assert server.create(_ds("alias", {"dataSource": {"name": "golden"}})).status_code == 201
    ds = _wait_reason(server, "golden", "NotFound")
    assert _ready(ds) == ("False", "NotFound", "PVC not found")
    assert ds["status"]["source"] == {}
    assert server.create({
        "apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
        "metadata": {"name": "golden"},
        "spec": {"source": {"blank": {}},
                 "storage": {"resources": {"requests": {"storage": "8Mi"}}}}}).status_code == 201
    ds = server.wait_for("das", "golden", lambda o: _ready(o) == READY)
    assert phase(server.get("dv", "golden")) == "Succeeded"
    assert ds["status"]["source"] == pvc
    alias = server.wait_for("das", "alias", lambda o: _ready(o) == READY)
    assert alias["status"]["source"] == pvc, "the referenced DataSource's source"
    c = condition(ds, "Ready")
    assert c["lastTransitionTime"] and c["lastHeartbeatTime"]


def test_missing_claim_becomes_ready_when_it_appears(server: Server) -> None:
    assert server.create(_ds("later", {"pvc": {"name": "later"}})).status_code == 201
    ds = _wait_reason(server, "later", "NotFound")
    assert _ready(ds) == ("False", "NotFound", "PVC not found")
    assert server.create({
        "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "later"},
        "spec": {"accessModes": ["ReadWriteOnce"],
                 "resources": {"requests": {"storage": "8Mi"}}}}).status_code == 201
    ds = server.wait_for("das", "later", lambda o: _ready(o) == READY)
    assert ds["status"]["source"] == {"pvc": {"name": "later"}}


def test_reference_errors(server: Server) -> None:
    assert server.create(_ds("base", {"pvc": {"name": "nothing"}})).status_code == 201
    cases = {
        "self": ({"name": "self"}, "SelfReference", "DataSource cannot self-reference"),
        "chain": ({"name": "alias"}, "MaxReferenceDepthReached",
                  "DataSource reference chain exceeds maximum depth of 1"),
        "alias": ({"name": "base"}, "NotFound", "PVC not found"),
        "dangling": ({"name": "gone"}, "NotFound",
                     'datasources.cdi.kubevirt.io "gone" not found'),
        "cross": ({"name": "base", "namespace": "other"}, "CrossNamespaceReference",
                  "DataSource cannot reference a DataSource in another namespace"),
        "empty": (None, "NoSource", "No source PVC set"),
    }
    for name, (ref, _, _) in cases.items():
        source = {"dataSource": ref} if ref is not None else {}
        assert server.create(_ds(name, source)).status_code == 201
    for name, (_, reason, message) in cases.items():
        ds = _wait_reason(server, name, reason)
        assert _ready(ds) == ("False", reason, message), name
        assert ds["status"]["source"] == {}, name
    # The dangling reference resolves once its target appears.
    assert server.create(_ds("gone", {"pvc": {"name": "nothing"}})).status_code == 201
    ds = server.wait_for("das", "dangling", lambda o: _ready(o)[2] == "PVC not found")
    assert _ready(ds)[1] == "NotFound"


def test_a_datavolume_clones_through_a_referencing_datasource(server: Server,
                                                               tmp_path: Path) -> None:
    """sourceRef -> DataSource "alias" -> DataSource "golden" -> the claim: the disk is a
    copy of the golden image; a chain one level deeper is refused with CDI's text."""
    raw = images.make_raw(tmp_path / "golden.raw", virtual_size=8 * MiB,
                          extents=[(0, MiB), (5 * MiB, MiB)], seed=5)
    p = server.cli("image-upload", "dv", "golden", "--image-path", str(raw), "--size", "8Mi")
    assert p.returncode == 0, p.stderr
    assert server.create(_ds("golden", {"pvc": {"name": "golden"}})).status_code == 201
    assert server.create(_ds("alias", {"dataSource": {"name": "golden"}})).status_code == 201
    assert server.create(_ds("alias2", {"dataSource": {"name": "alias"}})).status_code == 201
    for name, ref in (("vm-disk", "alias"), ("too-deep", "alias2")):
        assert server.create({
            "apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
            "metadata": {"name": name},
            "spec": {"sourceRef": {"kind": "DataSource", "name": ref},
                     "storage": {"resources": {"requests": {"storage": "8Mi"}}}}}
        ).status_code == 201
    server.wait_for("dv", "vm-disk", lambda o: phase(o) == "Succeeded", timeout=60)
    assert qemu_img.compare(str(raw), str(volume_of(server, "vm-disk")))
    dv = server.wait_for("dv", "too-deep",
                         lambda o: condition(o, "Running").get("reason") == "CloneWithoutSource")
    assert condition(dv, "Running")["message"] == (
        "DataSource default/alias2: DataSource reference chain exceeds maximum depth of 1")
    assert phase(dv) != "Succeeded"
