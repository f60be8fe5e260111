"""KubeStore's verbs against the fake API server: the port's semantics over REST."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from cdi.api import errors
from cdi.backends.kube import KubeStore, Unavailable, error_of
from cdi.backends.port import Obj
from cdi.controllers import events
from tests.cdi.backends.kube.conftest import store_on
from tests.support.fakekube import FakeKube

DV = "cdi.kubevirt.io/v1beta1"


def dv(name: str, **extra: Any) -> Obj:
    return {"apiVersion": DV, "kind": "DataVolume", "metadata": {"name": name, "namespace": "ns"},
            "spec": {"source": {"blank": {}}, "storage": {"resources": {"requests": {
                "storage": "1Gi"}}}}, **extra}


def run(fake: FakeKube, body: Any, **kw: Any) -> Any:
    async def main() -> Any:
        async with store_on(fake, **kw) as store:
            return await body(store)
    return asyncio.run(main())


@pytest.mark.parametrize("obj", [
    dv("disk"),
    {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
     "metadata": {"name": "claim", "namespace": "ns"},
     "spec": {"resources": {"requests": {"storage": "1Gi"}}}},
    {"apiVersion": DV, "kind": "StorageProfile", "metadata": {"name": "fast"}, "spec": {}},
    {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "metadata": {"name": "fast"},
     "provisioner": "csi.example.com"},
    {"apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
     "metadata": {"name": "snap", "namespace": "ns"},
     "spec": {"source": {"persistentVolumeClaimName": "claim"}}},
    {"apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshotClass",
     "metadata": {"name": "snaps"}, "driver": "csi.example.com", "deletionPolicy": "Delete"},
    {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
     "metadata": {"name": "reader"}, "rules": []},
    {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
     "metadata": {"name": "lock", "namespace": "cdi"}, "spec": {"holderIdentity": "a"}},
    {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s", "namespace": "ns"},
     "data": {"k": "dg=="}},
], ids=lambda o: o["kind"])
def test_crud_round_trip(fake: FakeKube, obj: Obj) -> None:
    kind, name = obj["kind"], obj["metadata"]["name"]
    ns = obj["metadata"].get("namespace")

    async def body(store: KubeStore) -> tuple[Obj, Obj, Obj, list[Obj], Obj]:
        created = await store.create(obj)
        got = await store.get(kind, name, ns)
        changed = await store.patch(kind, name, ns, {"metadata": {"labels": {"a": "b"}}})
        listed = (await store.list(kind, ns, label_selector="a=b")).items
        await store.delete(kind, name, ns)
        with pytest.raises(errors.NotFound):
            await store.get(kind, name, ns)
        return created, got, changed, listed, obj

    created, got, changed, listed, _ = run(fake, body)
    assert created["metadata"]["uid"] and created["metadata"]["resourceVersion"]
    assert got == created
    assert int(changed["metadata"]["resourceVersion"]) > int(created["metadata"]["resourceVersion"])
    assert changed["metadata"]["labels"] == {"a": "b"}
    # list items get apiVersion and kind back even where the server leaves them out
    assert [(o["apiVersion"], o["kind"], o["metadata"]["name"]) for o in listed] == \
        [(obj["apiVersion"], kind, name)]
    assert fake.get(kind, name, ns or "") is None


def test_replace_with_a_stale_version_is_a_conflict(fake: FakeKube) -> None:
    async def body(store: KubeStore) -> None:
        first = await store.create(dv("disk"))
        second = dict(first, spec=dict(first["spec"], contentType="archive"))
        newer = await store.replace(second)
        assert newer["metadata"]["generation"] == 2
        with pytest.raises(errors.Conflict) as caught:
            await store.replace(dict(first, spec=dict(first["spec"], contentType="kubevirt")))
        assert "has been modified" in caught.value.message
        with pytest.raises(errors.Conflict):
            await store.patch("DataVolume", "disk", "ns", {"metadata": {
                "resourceVersion": first["metadata"]["resourceVersion"], "labels": {"x": "y"}}})
        with pytest.raises(errors.AlreadyExists):
            await store.create(dv("disk"))
        assert (await store.get("DataVolume", "disk", "ns"))["spec"]["contentType"] == "archive"
    run(fake, body)


def test_status_goes_through_its_subresource(fake: FakeKube) -> None:
    async def body(store: KubeStore) -> None:
        created = await store.create(dv("disk", status={"phase": "Pending"}))
        assert created["status"] == {"phase": "Pending"}  # kept on create, as the port says
        replaced = await store.replace(dict(created, status={"phase": "Succeeded"},
                                            metadata=dict(created["metadata"],
                                                          labels={"l": "1"})))
        assert replaced["status"] == {"phase": "Pending"}
        assert replaced["metadata"]["labels"] == {"l": "1"}
        status = await store.replace_status(dict(replaced, status={"phase": "ImportScheduled"},
                                                 spec={"source": {"http": {"url": "x"}}}))
        assert status["status"] == {"phase": "ImportScheduled"}
        assert status["spec"] == replaced["spec"]
        # A patch with status and metadata, guarded by the version read: both land.
        patched = await store.patch("DataVolume", "disk", "ns", {
            "metadata": {"resourceVersion": status["metadata"]["resourceVersion"],
                         "annotations": {"a": "1"}},
            "status": {"phase": "Succeeded", "progress": "100.0%"}})
        assert patched["metadata"]["annotations"] == {"a": "1"}
        assert patched["status"] == {"phase": "Succeeded", "progress": "100.0%"}
        # The same guard, now stale, changes nothing.
        with pytest.raises(errors.Conflict):
            await store.patch("DataVolume", "disk", "ns", {
                "metadata": {"resourceVersion": status["metadata"]["resourceVersion"]},
                "status": {"phase": "Failed"}})
        assert (await store.get("DataVolume", "disk", "ns"))["status"]["phase"] == "Succeeded"
    run(fake, body)
    paths = [(m, p) for m, p, _ in fake.requests if m == "PATCH"]
    assert ("PATCH", "/apis/cdi.kubevirt.io/v1beta1/namespaces/ns/datavolumes/disk/status") \
        in paths


def test_finalizers_hold_a_deleted_object(fake: FakeKube) -> None:
    async def body(store: KubeStore) -> None:
        await store.create({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                            "metadata": {"name": "c", "namespace": "ns",
                                         "finalizers": ["kubernetes.io/pvc-protection"]},
                            "spec": {}})
        held = await store.delete("PersistentVolumeClaim", "c", "ns")
        assert held["metadata"]["deletionTimestamp"]
        await store.patch("PersistentVolumeClaim", "c", "ns",
                          {"metadata": {"finalizers": None}})
        with pytest.raises(errors.NotFound):
            await store.get("PersistentVolumeClaim", "c", "ns")
        # A custom resource's delete answers with a Status: the port still gets an object.
        created = await store.create(dv("gone"))
        deleted = await store.delete("DataVolume", "gone", "ns")
        assert deleted["metadata"] == {"name": "gone", "namespace": "ns",
                                       "uid": created["metadata"]["uid"]}
    run(fake, body)


def test_list_pages_through_a_large_collection(fake: FakeKube) -> None:
    for i in range(7):
        fake.put(dv(f"d{i}"))

    async def body(store: KubeStore) -> tuple[list[str], str]:
        listed = await store.list("DataVolume", "ns")
        return [o["metadata"]["name"] for o in listed.items], listed.resource_version

    names, rv = run(fake, body, page_size=3)
    assert names == [f"d{i}" for i in range(7)]
    assert rv == str(fake.rv)
    pages = [q for m, p, q in fake.requests if p.endswith("/datavolumes") and m == "GET"]
    assert [q.get("limit") for q in pages] == ["3", "3", "3"]
    assert "continue" in pages[1] and "continue" in pages[2]


def test_errors_map_to_the_ports_exceptions(fake: FakeKube) -> None:
    async def body(store: KubeStore) -> None:
        with pytest.raises(errors.NotFound):
            await store.get("Pod", "nope", "ns")
        with pytest.raises(errors.Invalid):
            await store.create({"apiVersion": "v1", "kind": "ConfigMap",
                                "metadata": {"namespace": "ns"}})
        with pytest.raises(errors.BadRequest):
            await store.get("Pod", "x")  # a namespaced kind needs its namespace
        with pytest.raises(errors.BadRequest):
            await store.get("Gizmo", "x")
    run(fake, body)
    assert isinstance(error_of(503, {"message": "etcd"}), Unavailable)
    assert isinstance(error_of(409, {"reason": "AlreadyExists"}), errors.AlreadyExists)
    assert isinstance(error_of(409, {"reason": "Conflict"}), errors.Conflict)
    assert type(error_of(410, {})) is errors.Gone


def test_a_wrong_token_is_unauthorized(fake: FakeKube) -> None:
    async def main() -> None:
        async with KubeStore(fake.config(token="wrong")) as store:
            with pytest.raises(errors.Unauthorized):
                await store.get("Pod", "x", "ns")
    asyncio.run(main())


def test_events_are_written_as_the_embedded_backend_writes_them(fake: FakeKube) -> None:
    async def body(store: KubeStore) -> list[Obj]:
        disk = await store.create(dv("disk"))
        profile = await store.create({"apiVersion": DV, "kind": "StorageProfile",
                                      "metadata": {"name": "fast"}})
        await events.emit(store, disk, reason="ImportSucceeded", message="done")
        await events.emit(store, profile, reason="Recognized", message="cluster-scoped")
        return [*(await store.list("Event", "ns")).items,
                *(await store.list("Event", "default")).items]

    found = run(fake, body)
    assert [(e["metadata"]["namespace"], e["reason"], e["involvedObject"]["kind"])
            for e in found] == [("ns", "ImportSucceeded", "DataVolume"),
                                ("default", "Recognized", "StorageProfile")]


def test_reads_are_retried_on_server_errors_and_writes_are_not(fake: FakeKube) -> None:
    fake.put(dv("disk"))

    async def body(store: KubeStore) -> None:
        fake.faults[:] = [503, 429]
        assert (await store.get("DataVolume", "disk", "ns"))["metadata"]["name"] == "disk"
        fake.faults[:] = [500]
        with pytest.raises(Unavailable):
            await store.create(dv("other"))
        fake.faults[:] = [503, 503, 503]
        with pytest.raises(Unavailable):
            await store.get("DataVolume", "disk", "ns")
    run(fake, body)
    assert fake.get("DataVolume", "other", "ns") is None


def test_a_list_whose_continue_token_expires_starts_over(fake: FakeKube) -> None:
    for i in range(5):
        fake.put(dv(f"d{i}"))
    compacted = []

    def compact_once(method: str, path: str, query: dict[str, str]) -> None:
        if "continue" in query and not compacted:
            compacted.append(query["continue"])
            fake.history.clear()  # on the server's loop already: a write elsewhere, then
            fake.rv += 1  # compaction up to it
            fake.floor = fake.rv

    fake.on_request = compact_once

    async def body(store: KubeStore) -> list[str]:
        return [o["metadata"]["name"] for o in (await store.list("DataVolume", "ns")).items]

    assert run(fake, body, page_size=2) == [f"d{i}" for i in range(5)]
    pages = [q for m, p, q in fake.requests if m == "GET" and p.endswith("/datavolumes")]
    # first page, the expired continue, then a whole new list of three pages
    assert ["continue" in q for q in pages] == [False, True, False, True, True]
