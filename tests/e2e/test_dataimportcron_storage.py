"""DataImportCron end to end, the storage side: the snapshot source format on the reflink
class (and a VM disk cloned from it through ``sourceRef``), garbage collection with the
default ``importsToKeep`` and with ``garbageCollect: Never``, a storage-class change, an
empty schedule, and ``kill -9`` of `cdi serve` around the poll and the import."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from importer import containerdisk, qemu_img
from tests.cdi.api import seeds
from tests.cdi.api.test_seeds import SEEDS
from tests.e2e.conftest import Server, condition, phase
from tests.e2e.test_datavolume import volume_of
from tests.support import images
from tests.support.registry import Registry

MiB = 1 << 20
A = "cdi.kubevirt.io/"
NEXT = A + "storage.import.nextCronTime"
DIGEST = A + "storage.import.sourceDesiredDigest"
CRON = A + "dataImportCron"


def _patch(server: Server, kind: str, name: str, body: dict[str, Any],
           namespace: str = "default") -> dict[str, Any]:
    r = server.session.patch(server.path(kind, name, namespace), json=body, timeout=10,
                             headers={"Content-Type": "application/merge-patch+json"})
    assert r.status_code == 200, r.text
    result: dict[str, Any] = r.json()
    return result


def _trust(server: Server, registry: Registry) -> None:
    _patch(server, "cdiconfig", "config", {"spec": {"insecureRegistries": [registry.host]}}, "")


def _cron(url: str, *, schedule: str = "* * * * *", storage_class: str | None = None,
          **spec: Any) -> dict[str, Any]:
    storage: dict[str, Any] = {"resources": {"requests": {"storage": "16Mi"}}}
    if storage_class:
        storage["storageClassName"] = storage_class
    return {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataImportCron",
            "metadata": {"name": "golden-cron"},
            "spec": {"schedule": schedule, "managedDataSource": "golden",
                     "template": {"spec": {"source": {"registry": {"url": url}},
                                           "storage": storage}},
                     **spec}}


def _poll_now(server: Server) -> None:
    _patch(server, "dic", "golden-cron",
           {"metadata": {"annotations": {NEXT: "2000-01-01T00:00:00Z"}}})


def _name(digest: str) -> str:
    return "golden-" + digest.removeprefix("sha256:")[:12]


def _source(ds: dict[str, Any]) -> dict[str, Any]:
    return dict((ds.get("spec") or {}).get("source") or {})


def _exists(server: Server, kind: str, name: str) -> bool:
    return server.session.get(server.path(kind, name), timeout=10).status_code == 200


def _names(server: Server, kind: str) -> list[str]:
    items = server.session.get(server.path(kind), timeout=10,
                               params={"labelSelector": f"{CRON}=golden-cron"}).json()["items"]
    return sorted(o["metadata"]["name"] for o in items)


def _disk(tmp_path: Path, n: int) -> Path:
    return images.make_raw(tmp_path / f"disk{n}.raw", virtual_size=4 * MiB,
                           extents=[(0, MiB)], seed=n)


def test_snapshot_format_serves_snapshots(reflink_server: Server, registry: Registry,
                                          tmp_path: Path) -> None:
    server = reflink_server
    _trust(server, registry)
    _patch(server, "storageprofile", "local-reflink",
           {"spec": {"dataImportCronSourceFormat": "snapshot"}}, "")
    server.wait_for("storageprofile", "local-reflink", namespace="",
                    predicate=lambda o: o["status"].get("dataImportCronSourceFormat")
                    == "snapshot")
    ref = registry.ref("os/golden")
    first, second = _disk(tmp_path, 1), _disk(tmp_path, 2)
    d1 = containerdisk.publish(first, ref, insecure=True)
    assert server.create(_cron(f"docker://{ref}", storage_class="local-reflink",
                               importsToKeep=1)).status_code == 201

    # The import becomes a snapshot; the DataSource serves it and the volume goes.
    ds = server.wait_for("das", "golden", lambda o: _source(o) == {
        "snapshot": {"namespace": "default", "name": _name(d1)}} and
        condition(o, "Ready").get("status") == "True", timeout=90)
    assert ds["status"]["source"] == {"snapshot": {"namespace": "default", "name": _name(d1)}}
    snap = server.get("volumesnapshot", _name(d1))
    assert snap["status"]["readyToUse"] is True
    assert snap["spec"]["source"] == {"persistentVolumeClaimName": _name(d1)}
    assert snap["metadata"]["labels"][CRON] == "golden-cron"
    assert snap["metadata"]["annotations"][A + "storage.import.sourceVolumeMode"] == \
        "Filesystem"
    cron = server.wait_for("dic", "golden-cron",
                           lambda o: not _exists(server, "pvc", _name(d1)) and
                           condition(o, "UpToDate").get("status") == "True")
    assert cron["status"]["sourceFormat"] == "snapshot"
    assert not _exists(server, "dv", _name(d1))

    # A VM disk from the golden image, through sourceRef: restored from the snapshot.
    vm = {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
          "metadata": {"name": "vm-disk"},
          "spec": {"sourceRef": {"kind": "DataSource", "name": "golden"},
                   "storage": {"storageClassName": "local-reflink"}}}
    assert server.create(vm).status_code == 201
    server.wait_for("dv", "vm-disk", lambda o: phase(o) == "Succeeded", timeout=60)
    assert server.get("pvc", "vm-disk")["metadata"]["annotations"][A + "cloneType"] == \
        "snapshot"
    assert qemu_img.compare(str(first), str(volume_of(server, "vm-disk")))

    # A new image: its snapshot replaces the old one, which is collected (importsToKeep 1).
    d2 = containerdisk.publish(second, ref, insecure=True)
    _poll_now(server)
    server.wait_for("das", "golden", lambda o: _source(o) == {
        "snapshot": {"namespace": "default", "name": _name(d2)}}, timeout=90)
    server.wait_for("dic", "golden-cron",
                    lambda o: _names(server, "volumesnapshot") == [_name(d2)])
    assert _names(server, "pvc") == []
    # The VM disk made from the old snapshot is the user's and stays as it was.
    assert qemu_img.compare(str(first), str(volume_of(server, "vm-disk")))


@pytest.mark.parametrize(("spec", "kept"), [({}, 3), ({"garbageCollect": "Never"}, 4)],
                         ids=["default-keeps-3", "never"])
def test_garbage_collection_of_imports(server: Server, registry: Registry, tmp_path: Path,
                                       spec: dict[str, Any], kept: int) -> None:
    _trust(server, registry)
    ref = registry.ref("os/many")
    names = []
    for n in range(4):
        digest = containerdisk.publish(_disk(tmp_path, n), ref, insecure=True)
        names.append(_name(digest))
        if n == 0:
            assert server.create(_cron(f"docker://{ref}", **spec)).status_code == 201
        else:
            _poll_now(server)
        server.wait_for("das", "golden",
                        lambda o: _source(o).get("pvc", {}).get("name") == names[-1])
    server.wait_for("dic", "golden-cron",
                    lambda o: len(_names(server, "pvc")) == kept, timeout=30)
    assert _names(server, "pvc") == sorted(names[-kept:])
    assert _names(server, "dv") == sorted(names[-kept:])


def test_a_new_default_storage_class_reimports(server: Server, registry: Registry,
                                               tmp_path: Path) -> None:
    """The seeds' procedure (8.3.2.1): the default class moves; the golden image follows."""
    _trust(server, registry)
    ref = registry.ref("os/moving")
    disk = _disk(tmp_path, 7)
    digest = containerdisk.publish(disk, ref, insecure=True)
    assert server.create(_cron(f"docker://{ref}")).status_code == 201
    server.wait_for("dv", _name(digest), lambda o: phase(o) == "Succeeded", timeout=60)
    assert server.get("pvc", _name(digest))["spec"]["storageClassName"] == "local"
    assert server.get("dic", "golden-cron")["metadata"]["annotations"][
        A + "storage.import.storageClass"] == "local"
    for name, default in (("local", "false"), ("local-wffc", "true")):
        _patch(server, "storageclass", name, {"metadata": {"annotations": {
            "storageclass.kubernetes.io/is-default-class": default}}}, "")
    server.wait_for("pvc", _name(digest),
                    lambda o: o["spec"].get("storageClassName") == "local-wffc"
                    and o["status"].get("phase") == "Bound", timeout=60)
    cron = server.wait_for("dic", "golden-cron",
                           lambda o: condition(o, "UpToDate").get("status") == "True" and
                           _exists(server, "dv", _name(digest)))
    assert cron["metadata"]["annotations"][A + "storage.import.storageClass"] == "local-wffc"
    server.wait_for("dv", _name(digest), lambda o: phase(o) == "Succeeded")
    server.wait_for("das", "golden", lambda o: condition(o, "Ready").get("status") == "True")
    assert qemu_img.compare(str(disk), str(volume_of(server, _name(digest))))


def test_an_empty_schedule_never_polls(server: Server, registry: Registry,
                                       tmp_path: Path) -> None:
    _trust(server, registry)
    ref = registry.ref("os/manual")
    disk = _disk(tmp_path, 3)
    digest = containerdisk.publish(disk, ref, insecure=True)
    assert server.create(_cron(f"docker://{ref}", schedule="")).status_code == 201
    cron = server.wait_for("dic", "golden-cron",
                           lambda o: condition(o, "UpToDate").get("reason") == "NoDigest")
    assert condition(cron, "UpToDate")["message"] == "No source digest"
    time.sleep(2)
    assert [a for a in registry.accesses() if "/manifests/" in a.path and
            a.method == "HEAD"] == []
    # The user sets the digest: it is imported, without a poll.
    _patch(server, "dic", "golden-cron", {"metadata": {"annotations": {DIGEST: digest}}})
    server.wait_for("das", "golden",
                    lambda o: _source(o).get("pvc", {}).get("name") == _name(digest))
    assert qemu_img.compare(str(disk), str(volume_of(server, _name(digest))))
    assert NEXT not in server.get("dic", "golden-cron")["metadata"]["annotations"]


def test_kill_9_around_the_poll_and_the_import(server: Server, registry: Registry,
                                               tmp_path: Path) -> None:
    """`cdi serve` killed at several points after a poll was forced: each new image ends
    imported exactly once, served, equal to its source, and nothing is left over."""
    _trust(server, registry)
    ref = registry.ref("os/killed")
    disks = [_disk(tmp_path, 10 + n) for n in range(4)]
    digests = []
    for n, (disk, delay) in enumerate(zip(disks, (0.0, 0.05, 0.3, 0.8), strict=True)):
        digests.append(containerdisk.publish(disk, ref, insecure=True))
        if n == 0:
            assert server.create(_cron(f"docker://{ref}", importsToKeep=2)).status_code == 201
        else:
            _poll_now(server)
        time.sleep(delay)
        server.stop(signal.SIGKILL)
        server.start()
        server.wait_for("das", "golden",
                        lambda o: _source(o).get("pvc", {}).get("name") == _name(digests[-1]),
                        timeout=90)
        assert qemu_img.compare(str(disk), str(volume_of(server, _name(digests[-1]))))
    cron = server.wait_for("dic", "golden-cron",
                           lambda o: condition(o, "UpToDate").get("status") == "True" and
                           len(_names(server, "pvc")) == 2, timeout=30)
    assert cron["status"]["currentImports"] == [
        {"DataVolumeName": _name(digests[-1]), "Digest": digests[-1]}]
    assert _names(server, "pvc") == sorted(_name(d) for d in digests[-2:])
    assert _names(server, "dv") == sorted(_name(d) for d in digests[-2:])
    # No worker left running and no volume without a claim.
    pods = server.session.get(server.path("pod"), timeout=10).json()["items"]
    assert [p["metadata"]["name"] for p in pods
            if p.get("status", {}).get("phase") not in ("Succeeded", "Failed")] == []
    volumes = server.session.get(server.url + "/api/v1/persistentvolumes",
                                 timeout=10).json()["items"]
    claims = {(v["spec"].get("claimRef") or {}).get("name") for v in volumes}
    assert claims == {_name(d) for d in digests[-2:]}


def test_seed_cron_templates_apply(server: Server) -> None:
    """Every complete DataImportCron of the seeds' HyperConverged examples (8.3) is created
    through `cdi apply` unchanged, and listed by `cdi get dic`."""
    crons = [m.obj for path in sorted(SEEDS.glob("*.txt")) for m in seeds.cron_templates(path)
             if ((m.obj.get("spec") or {}).get("template") or {}).get("spec", {}).get("source")]
    assert len(crons) == 3
    for n, cron in enumerate(crons):  # the status example repeats a name of the spec one
        cron["metadata"]["name"] = f"{cron['metadata']['name']}-{n}"
    p = server.cli("apply", "-f", "-", input="\n---\n".join(yaml.safe_dump(c) for c in crons))
    assert p.returncode == 0, p.stderr
    assert p.stdout.count(" created") == 3, p.stdout
    p = server.cli("get", "dic")
    assert p.returncode == 0, p.stderr
    assert sorted(line.split()[0] for line in p.stdout.splitlines()[1:]) == sorted(
        c["metadata"]["name"] for c in crons)


def test_a_cron_clones_a_golden_claim_once_its_service_account_may(server: Server,
                                                                    tmp_path: Path) -> None:
    """A PVC-source cron: refused (NotAuthorized) until the seeds' 8.6 RBAC lets the cron's
    service account clone from the source namespace; then imported and served."""
    raw = _disk(tmp_path, 21)
    p = server.cli("image-upload", "dv", "golden", "-n", "images", "--image-path", str(raw),
                   "--size", "4Mi")
    assert p.returncode == 0, p.stderr
    cron = _cron("docker://unused")
    cron["spec"]["template"]["spec"]["source"] = {"pvc": {"namespace": "images",
                                                         "name": "golden"}}
    assert server.create(cron).status_code == 201
    cron = server.wait_for("dic", "golden-cron",
                           lambda o: condition(o, "Progressing").get("reason") == "NotAuthorized")
    assert condition(cron, "Progressing")["message"] == "Not authorized to create DataVolume"
    uid = server.get("pvc", "golden", "images")["metadata"]["uid"]
    assert cron["metadata"]["annotations"][DIGEST] == f"uid:{uid}"
    assert _names(server, "dv") == []

    rbac = ("apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\n"
            "metadata: {name: datavolume-cloner}\n"
            "rules:\n- apiGroups: [cdi.kubevirt.io]\n  resources: [datavolumes/source]\n"
            "  verbs: ['*']\n---\n"
            "apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\n"
            "metadata: {name: allow-clone-to-cron, namespace: images}\n"
            "subjects:\n- {kind: ServiceAccount, name: default, namespace: default}\n"
            "roleRef: {kind: ClusterRole, name: datavolume-cloner, "
            "apiGroup: rbac.authorization.k8s.io}\n")
    p = server.cli("apply", "-f", "-", input=rbac)
    assert p.returncode == 0, p.stderr
    _poll_now(server)
    name = "golden-" + uid[:12]
    server.wait_for("das", "golden",
                    lambda o: _source(o).get("pvc", {}).get("name") == name and
                    condition(o, "Ready").get("status") == "True", timeout=90)
    assert qemu_img.compare(str(raw), str(volume_of(server, name)))
    assert server.get("dv", name)["spec"]["source"] == {
        "pvc": {"namespace": "images", "name": "golden"}}
