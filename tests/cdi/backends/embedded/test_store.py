"""SQLiteStore against a real SQLite file: the port's semantics, watches,
durability (including ``kill -9``) and concurrency.

Each test runs its own event loop with ``asyncio.run``; nothing is mocked.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from cdi.api.errors import AlreadyExists, APIError, BadRequest, Conflict, Gone, NotFound
from cdi.backends.embedded import DatabaseInUse, SQLiteStore, StoreClosed
from cdi.backends.embedded.db import Database
from cdi.backends.port import Obj, ObjectStore, WatchEvent

REPO = Path(__file__).resolve().parents[4]
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
CONFLICT = ('Operation cannot be fulfilled on datavolume "a": the object has been modified; '
            "please apply your changes to the latest version and try again")

Body = Callable[[SQLiteStore], Awaitable[None]]


def run(tmp_path: Path, body: Body, **options: Any) -> None:
    """Run ``body`` with a store open on ``tmp_path / "cdi.db"``."""
    async def main() -> None:
        async with SQLiteStore(tmp_path / "cdi.db", **options) as store:
            await body(store)
    asyncio.run(main())


def dv(name: str, namespace: str = "default", *, labels: dict[str, str] | None = None,
       **spec: Any) -> Obj:
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if labels is not None:
        meta["labels"] = labels
    return {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume", "metadata": meta,
            "spec": spec}


def owned(kind: str, name: str, *owners: Obj, namespace: str = "default",
          finalizers: list[str] | None = None) -> Obj:
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "ownerReferences": [
        {"kind": o["kind"], "name": o["metadata"]["name"], "uid": o["metadata"]["uid"]}
        for o in owners]}
    if finalizers:
        meta["finalizers"] = finalizers
    return {"kind": kind, "metadata": meta, "spec": {}}


async def take(events: AsyncIterator[WatchEvent], n: int) -> list[tuple[str, str]]:
    """The next ``n`` events as (type, name), failing after 5 s."""
    out: list[tuple[str, str]] = []
    for _ in range(n):
        event = await asyncio.wait_for(anext(events), 5)
        out.append((event.type, event.object["metadata"]["name"]))
    return out


def rv(obj: Obj) -> int:
    return int(obj["metadata"]["resourceVersion"])


# -- create, get, list ---------------------------------------------------------


def test_create_sets_server_fields(tmp_path: Path) -> None:
    async def body(store: SQLiteStore) -> None:
        given = dv("a", source={"http": {"url": "http://x"}})
        a = await store.create(given)
        assert given["metadata"] == {"name": "a", "namespace": "default"}  # not mutated
        meta = a["metadata"]
        assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}",
                            meta["uid"])
        assert TIMESTAMP.match(meta["creationTimestamp"])
        assert meta["generation"] == 1
        assert meta["resourceVersion"] == "1"
        b = await store.create({"kind": "DataVolume", "metadata": {"name": "b",
                                "namespace": "default"}, "status": {"phase": "Pending"}})
        assert b["apiVersion"] == "cdi.kubevirt.io/v1beta1"
        assert b["status"] == {"phase": "Pending"}  # status given on create is kept
        assert rv(b) > rv(a)
        assert b["metadata"]["uid"] != meta["uid"]
        got = await store.get("DataVolume", "a", "default")
        assert got == a
        got["spec"]["source"] = "mutated"
        assert (await store.get("DataVolume", "a", "default")) == a
        listed = await store.list("DataVolume", "default")
        assert [o["metadata"]["name"] for o in listed.items] == ["a", "b"]
        assert listed.resource_version == b["metadata"]["resourceVersion"]
        listed.items[0]["spec"] = {}
        assert (await store.get("DataVolume", "a", "default"))["spec"] != {}
    run(tmp_path, body)


def test_create_ignores_client_set_server_fields(tmp_path: Path) -> None:
    async def body(store: SQLiteStore) -> None:
        obj = dv("a")
        obj["metadata"].update(uid="mine", resourceVersion="99", generation=7,
                               creationTimestamp="2000-01-01T00:00:00Z",
                               deletionTimestamp="2000-01-01T00:00:00Z")
        a = await store.create(obj)
        assert a["metadata"]["uid"] != "mine"
        assert a["metadata"]["generation"] == 1
        assert a["metadata"]["resourceVersion"] == "1"
        assert a["metadata"]["creationTimestamp"] != "2000-01-01T00:00:00Z"
        assert "deletionTimestamp" not in a["metadata"]
    run(tmp_path, body)


def test_generate_name(tmp_path: Path) -> None:
    async def body(store: SQLiteStore) -> None:
        names = set()
        for _ in range(3):
            obj = await store.create({"kind": "DataVolume", "metadata": {
                "generateName": "import-", "namespace": "default"}})
            names.add(obj["metadata"]["name"])
            assert re.fullmatch(r"import-[a-z0-9]{5}", obj["metadata"]["name"])
            assert obj["metadata"]["generateName"] == "import-"
        assert len(names) == 3
        with pytest.raises(BadRequest, match="name or generateName is required"):
            await store.create({"kind": "DataVolume", "metadata": {"namespace": "default"}})
    run(tmp_path, body)


def test_namespaced_and_cluster_scoped(tmp_path: Path) -> None:
    async def body(store: SQLiteStore) -> None:
        with pytest.raises(BadRequest) as e:
            await store.create({"kind": "DataVolume", "metadata": {"name": "a"}})
        assert e.value.message == "namespace is required for DataVolume"
        with pytest.raises(BadRequest, match="namespace is required for DataVolume"):
            await store.get("DataVolume", "a")
        await store.create(dv("a", "ns1"))
        await store.create(dv("a", "ns2"))  # the same name in another namespace
        await store.create(dv("b", "ns2"))
        assert len((await store.list("DataVolume")).items) == 3
        assert [o["metadata"]["name"] for o in (await store.list("DataVolume", "ns2")).items] \
            == ["a", "b"]
        sc = await store.create({"kind": "StorageClass", "metadata": {
            "name": "local", "namespace": "ignored"}, "provisioner": "x"})
        assert "namespace" not in sc["metadata"]
        assert sc["apiVersion"] == "storage.k8s.io/v1"
        assert (await store.get("StorageClass", "local")) == sc
        assert (await store.get("StorageClass", "local", "anything")) == sc
        assert (await store.list("StorageClass", "anything")).items == [sc]
        with pytest.raises(BadRequest, match="unknown kind 'Nope'"):
            await store.get("Nope", "a")
        with pytest.raises(BadRequest, match="apiVersion 'v1' does not match kind DataVolume"):
            await store.create({**dv("c"), "apiVersion": "v1"})
        with pytest.raises(BadRequest, match="not valid JSON"):
            await store.create({**dv("c"), "spec": {"bad": object()}})
        with pytest.raises(BadRequest, match="labels must map strings to strings"):
            await store.create(dv("c", labels={"a": 1}))  # type: ignore[dict-item]
    run(tmp_path, body)


def test_not_found_and_already_exists_messages(tmp_path: Path) -> None:
    async def body(store: SQLiteStore) -> None:
        await store.create(dv("a"))
        with pytest.raises(AlreadyExists) as exists:
            await store.create(dv("a"))
        assert exists.value.message == 'datavolume "a" already exists'
        assert exists.value.status()["code"] == 409
        calls: list[Callable[[], Awaitable[Obj]]] = [
            lambda: store.get("DataVolume", "x", "default"),
            lambda: store.replace(dv("x")),
            lambda: store.replace_status(dv("x")),
            lambda: store.patch("DataVolume", "x", "default", {"spec": {}}),
            lambda: store.delete("DataVolume", "x", "default"),
            lambda: store.get("DataVolume", "a", "other"),
        ]
        for call in calls:
            with pytest.raises(NotFound) as missing:
                await call()
            assert missing.value.message in ('datavolume "x" not found',
                                             'datavolume "a" not found')
            assert missing.value.status()["code"] == 404
    run(tmp_path, body)


# -- replace, status, conflicts, generation ---------------------------------------


def test_replace_keeps_status_and_replace_status_keeps_spec(tmp_path: Path) -> None:
    async def body(store: SQLiteStore) -> None:
        a = await store.create(dv("a", size="1Gi"))
        a = await store.replace_status({**a, "status": {"phase": "Pending"}, "spec": {"x": 1}})
        assert a["status"] == {"phase": "Pending"}
        assert a["spec"] == {"size": "1Gi"}
        assert a["metadata"]["generation"] == 1
        a = await store.replace({**a, "spec": {"size": "2Gi"}, "status": {"phase": "Lost"}})
        assert a["status"] == {"phase": "Pending"}
        assert a["spec"] == {"size": "2Gi"}
        assert a["metadata"]["generation"] == 2
        assert (await store.get("DataVolume", "a", "default")) == a
    run(tmp_path, body)


def test_conflict_on_stale_resource_version(tmp_path: Path) -> None:
    async def body(store: SQLiteStore) -> None:
        old = await store.create(dv("a"))
        new = await store.replace({**old, "spec": {"x": 1}})
        stale_rv = {"resourceVersion": old["metadata"]["resourceVersion"]}
        calls: list[Callable[[], Awaitable[Obj]]] = [
            lambda: store.replace({**old, "spec": {"x": 2}}),
            lambda: store.replace_status({**old, "status": {"phase": "x"}}),
            lambda: store.patch("DataVolume", "a", "default",
                                {"metadata": stale_rv, "spec": {"x": 3}}),
        ]
        for call in calls:
            with pytest.raises(Conflict) as e:
                await call()
            assert e.value.message == CONFLICT
        assert (await store.get("DataVolume", "a", "default")) == new
        # Without a resourceVersion the write is unconditional.
        stale = {**old, "metadata": {k: v for k, v in old["metadata"].items()
                                     if k != "resourceVersion"}}
        assert (await store.replace({**stale, "spec": {"x": 4}}))["spec"] == {"x": 4}
        # A different uid means the object was recreated: also a conflict.
        other = {**new, "metadata": {**new["metadata"], "uid": "someone-else",
                                     "resourceVersion": None}}
        with pytest.raises(Conflict, match="UID in precondition"):
            await store.replace(other)
    run(tmp_path, body)


def test_generation_and_no_op_writes(tmp_path: Path) -> None:
    async def body(store: SQLiteStore) -> None:
        a = await store.create(dv("a", size="1Gi"))
        events = store.watch("DataVolume")
        b = await store.replace({**a, "metadata": {**a["metadata"], "labels": {"l": "1"}}})
        assert b["metadata"]["generation"] == 1 and rv(b) > rv(a)
        c = await store.patch("DataVolume", "a", "default", {"status": {"phase": "Pending"}})
        assert c["metadata"]["generation"] == 1
        d = await store.patch("DataVolume", "a", "default", {"spec": {"size": "2Gi"}})
        assert d["metadata"]["generation"] == 2
        # Writing what is stored changes nothing: no new version, no event.
        assert (await store.replace(d)) == d
        assert (await store.replace_status(d)) == d
        assert (await store.patch("DataVolume", "a", "default", {"spec": {"size": "2Gi"}})) == d
        e = await store.replace({**d, "metadata": {**d["metadata"], "generation": 99,
                                                   "creationTimestamp": "x"}})
        assert e == d  # server fields are the server's
        await store.create(dv("marker"))
        assert await take(events, 4) == [("MODIFIED", "a")] * 3 + [("ADDED", "marker")]
    run(tmp_path, body)


def test_merge_patch(tmp_path: Path) -> None:
    async def body(store: SQLiteStore) -> None:
        await store.create(dv("a", labels={"keep": "1", "drop": "1"},
                              source={"http": {"url": "u", "secretRef": "s"}}, size="1Gi"))
        a = await store.patch("DataVolume", "a", "default", {
            "metadata": {"labels": {"drop": None, "new": "2"}, "name": "renamed"},
            "spec": {"source": {"http": {"secretRef": None, "certConfigMap": "c"}},
                     "size": None},
            "status": {"phase": "ImportInProgress", "progress": "10%"},
        })
        assert a["metadata"]["labels"] == {"keep": "1", "new": "2"}
        assert a["metadata"]["name"] == "a"
        assert a["spec"] == {"source": {"http": {"url": "u", "certConfigMap": "c"}}}
        assert a["status"] == {"phase": "ImportInProgress", "progress": "10%"}
        a = await store.patch("DataVolume", "a", "default", {"status": {"progress": None}})
        assert a["status"] == {"phase": "ImportInProgress"}
        assert (await store.get("DataVolume", "a", "default")) == a
        with pytest.raises(BadRequest, match="metadata must be an object"):
            await store.patch("DataVolume", "a", "default", {"metadata": "x"})
    run(tmp_path, body)


# -- delete: finalizers and garbage collection -----------------------------------


def test_finalizers_hold_deletion(tmp_path: Path) -> None:
    async def body(store: SQLiteStore) -> None:
        obj = dv("a")
        obj["metadata"]["finalizers"] = ["one", "two"]
        await store.create(obj)
        events = store.watch("DataVolume", "default")
        deleting = await store.delete("DataVolume", "a", "default")
        assert TIMESTAMP.match(deleting["metadata"]["deletionTimestamp"])
        assert (await store.get("DataVolume", "a", "default")) == deleting
        assert (await store.delete("DataVolume", "a", "default")) == deleting  # no-op
        # deletionTimestamp cannot be cleared.
        cleared = {**deleting, "metadata": {**deleting["metadata"], "deletionTimestamp": None}}
        kept = await store.replace(cleared)
        assert kept["metadata"]["deletionTimestamp"] == deleting["metadata"]["deletionTimestamp"]
        one = await store.patch("DataVolume", "a", "default",
                                {"metadata": {"finalizers": ["two"]}})
        assert one["metadata"]["finalizers"] == ["two"]
        gone = await store.replace({**one, "metadata": {**one["metadata"], "finalizers": []}})
        assert rv(gone) > rv(one)
        with pytest.raises(NotFound):
            await store.get("DataVolume", "a", "default")
        assert await take(events, 2) == [("MODIFIED", "a"), ("MODIFIED", "a")]
        last = await asyncio.wait_for(anext(events), 5)
        assert last.type == "DELETED"
        assert last.object == gone
    run(tmp_path, body)


def test_cascading_delete_across_kinds_and_levels(tmp_path: Path) -> None:
    async def body(store: SQLiteStore) -> None:
        profile = await store.create({"kind": "StorageProfile", "metadata": {"name": "sp"}})
        volume = await store.create(dv("vol"))
        pvc = await store.create(owned("PersistentVolumeClaim", "vol", volume))
        pod = await store.create(owned("Pod", "importer-vol", pvc))
        svc = await store.create(owned("Service", "upload-vol", volume))
        grandchild = await store.create(owned("Event", "ev", pod, namespace="other"))
        source = await store.create(owned("DataSource", "src", profile))  # cluster -> namespaced
        unrelated = await store.create(dv("other"))
        watches = [store.watch(k) for k in ("DataVolume", "PersistentVolumeClaim", "Pod",
                                            "Service", "Event")]
        await store.delete("DataVolume", "vol", "default")
        for kind, name, namespace in [("DataVolume", "vol", "default"),
                                      ("PersistentVolumeClaim", "vol", "default"),
                                      ("Pod", "importer-vol", "default"),
                                      ("Service", "upload-vol", "default"),
                                      ("Event", "ev", "other")]:
            with pytest.raises(NotFound):
                await store.get(kind, name, namespace)
        deleted = [(await asyncio.wait_for(anext(w), 5)) for w in watches]
        assert all(e.type == "DELETED" for e in deleted)
        versions = [rv(e.object) for e in deleted]
        assert versions[0] < versions[1] < versions[2]  # owner first, level by level
        assert versions[2] < versions[4]  # the pod's event after the pod
        assert {e.object["metadata"]["uid"] for e in deleted} == {
            o["metadata"]["uid"] for o in (volume, pvc, pod, svc, grandchild)}
        assert (await store.get("DataVolume", "other", "default")) == unrelated
        await store.delete("StorageProfile", "sp")
        with pytest.raises(NotFound):
            await store.get("DataSource", "src", "default")
        assert source["metadata"]["ownerReferences"][0]["uid"] == profile["metadata"]["uid"]
    run(tmp_path, body)


def test_cascade_with_several_owners_and_finalizers(tmp_path: Path) -> None:
    async def body(store: SQLiteStore) -> None:
        first = await store.create(dv("first"))
        second = await store.create(dv("second"))
        shared = await store.create(owned("PersistentVolumeClaim", "shared", first, second))
        held = await store.create(owned("Pod", "held", first, finalizers=["keep"]))
        child = await store.create(owned("Pod", "child", held))
        await store.delete("DataVolume", "first", "default")
        # Another owner is alive: kept.  A finalizer: being deleted, and its own
        # dependents go at once.
        assert (await store.get("PersistentVolumeClaim", "shared", "default")) == shared
        pending = await store.get("Pod", "held", "default")
        assert "deletionTimestamp" in pending["metadata"]
        with pytest.raises(NotFound):
            await store.get("Pod", "child", "default")
        await store.delete("DataVolume", "second", "default")
        with pytest.raises(NotFound):
            await store.get("PersistentVolumeClaim", "shared", "default")
        await store.patch("Pod", "held", "default", {"metadata": {"finalizers": None}})
        assert (await store.list("Pod")).items == []
        assert child["metadata"]["uid"] != held["metadata"]["uid"]
        # An owner held by a finalizer does not hold its dependents.
        owner = dv("owner")
        owner["metadata"]["finalizers"] = ["x"]
        owner = await store.create(owner)
        await store.create(owned("PersistentVolumeClaim", "dep", owner))
        await store.delete("DataVolume", "owner", "default")
        assert (await store.list("PersistentVolumeClaim")).items == []
        assert "deletionTimestamp" in (await store.get("DataVolume", "owner",
                                                       "default"))["metadata"]
    run(tmp_path, body)


# -- label selectors -------------------------------------------------------------


def test_list_with_label_selectors(tmp_path: Path) -> None:
    async def body(store: SQLiteStore) -> None:
        await store.create(dv("a", labels={"app": "cdi", "tier": "db"}))
        await store.create(dv("b", labels={"app": "cdi", "tier": "web"}))
        await store.create(dv("c", labels={"app": "other"}))
        await store.create(dv("d"))
        cases = {
            "app=cdi": "ab", "app==cdi": "ab", "app!=cdi": "cd", "tier": "ab", "!tier": "cd",
            "tier in (db, web)": "ab", "tier notin (db)": "bcd", "app=cdi,tier!=db": "b",
            "app in (cdi,other),!tier": "c", "": "abcd",
        }
        for selector, expected in cases.items():
            listed = await store.list("DataVolume", "default", label_selector=selector)
            assert "".join(o["metadata"]["name"] for o in listed.items) == expected, selector
        with pytest.raises(BadRequest, match=r"invalid label selector 'app in \(cdi': "):
            await store.list("DataVolume", label_selector="app in (cdi")
        with pytest.raises(BadRequest, match="invalid label selector"):
            store.watch("DataVolume", label_selector="app in cdi")
    run(tmp_path, body)


# -- watch -------------------------------------------------------------------------


def test_watch_yields_changes_in_order(tmp_path: Path) -> None:
    async def body(store: SQLiteStore) -> None:
        events = store.watch("DataVolume")
        a = await store.create(dv("a"))
        await store.patch("DataVolume", "a", "default", {"spec": {"x": 1}})
        await store.create({"kind": "Pod", "metadata": {"name": "p", "namespace": "default"}})
        await store.delete("DataVolume", "a", "default")
        received = []
        for _ in range(3):
            received.append(await asyncio.wait_for(anext(events), 5))
        assert [(e.type, rv(e.object)) for e in received] == [
            ("ADDED", 1), ("MODIFIED", 2), ("DELETED", 4)]
        assert received[0].object == a
        assert received[1].object["spec"] == {"x": 1}
    run(tmp_path, body)


def test_watch_from_resource_version_replays(tmp_path: Path) -> None:
    async def body(store: SQLiteStore) -> None:
        await store.create(dv("a"))
        listed = await store.list("DataVolume")
        await store.create(dv("b"))
        await store.patch("DataVolume", "a", "default", {"spec": {"x": 1}})
        assert await take(store.watch("DataVolume", resource_version=listed.resource_version),
                          2) == [("ADDED", "b"), ("MODIFIED", "a")]
        assert await take(store.watch("DataVolume", resource_version="0"), 3) == [
            ("ADDED", "a"), ("ADDED", "b"), ("MODIFIED", "a")]
        replay = store.watch("DataVolume", resource_version="0")
        assert await take(replay, 3) == [("ADDED", "a"), ("ADDED", "b"), ("MODIFIED", "a")]
        await store.create(dv("c"))  # then live events, without a gap
        assert await take(replay, 1) == [("ADDED", "c")]
        with pytest.raises(BadRequest, match="invalid resourceVersion 'abc'"):
            store.watch("DataVolume", resource_version="abc")
    run(tmp_path, body)


def test_watch_filters_namespace_and_labels(tmp_path: Path) -> None:
    async def body(store: SQLiteStore) -> None:
        in_ns = store.watch("DataVolume", "ns1")
        labelled = store.watch("DataVolume", label_selector="app=cdi")
        await store.create(dv("a", "ns2", labels={"app": "cdi"}))
        await store.create(dv("b", "ns1"))
        await store.create(dv("c", "ns1", labels={"app": "cdi"}))
        await store.patch("DataVolume", "c", "ns1", {"metadata": {"labels": {"app": "x"}}})
        await store.patch("DataVolume", "b", "ns1", {"metadata": {"labels": {"app": "cdi"}}})
        assert await take(in_ns, 4) == [("ADDED", "b"), ("ADDED", "c"), ("MODIFIED", "c"),
                                        ("MODIFIED", "b")]
        # Labels are matched as they are at each event: "c" stops matching
        # silently, "b" starts matching with a MODIFIED.
        assert await take(labelled, 3) == [("ADDED", "a"), ("ADDED", "c"), ("MODIFIED", "b")]
    run(tmp_path, body)


def test_watch_events_are_copies(tmp_path: Path) -> None:
    async def body(store: SQLiteStore) -> None:
        first, second = store.watch("DataVolume"), store.watch("DataVolume")
        await store.create(dv("a", size="1Gi"))
        event = await asyncio.wait_for(anext(first), 5)
        event.object["spec"]["size"] = "mutated"
        assert (await asyncio.wait_for(anext(second), 5)).object["spec"] == {"size": "1Gi"}
        assert (await store.get("DataVolume", "a", "default"))["spec"] == {"size": "1Gi"}
    run(tmp_path, body)


def test_watch_too_old_version_is_gone(tmp_path: Path) -> None:
    async def body(store: SQLiteStore) -> None:
        for i in range(10):
            await store.create(dv(f"dv{i}"))
        with pytest.raises(Gone) as e:
            store.watch("DataVolume", resource_version="4")
        assert e.value.status()["code"] == 410
        assert e.value.message == "too old resource version: 4 (6)"
        assert await take(store.watch("DataVolume", resource_version="5"), 5) == [
            ("ADDED", f"dv{i}") for i in range(5, 10)]
    run(tmp_path, body, history_size=5)


def test_watch_ends_when_the_consumer_stops_or_the_store_closes(tmp_path: Path) -> None:
    async def body(store: SQLiteStore) -> None:
        async def consume(stop_after: int | None) -> list[str]:
            seen = []
            async for event in store.watch("DataVolume"):
                seen.append(event.object["metadata"]["name"])
                if len(seen) == stop_after:
                    break
            return seen

        stopping = asyncio.create_task(consume(1))
        running = asyncio.create_task(consume(None))
        await asyncio.sleep(0)  # let both subscribe
        assert store.watches == 2
        await store.create(dv("a"))
        await store.create(dv("b"))
        assert await asyncio.wait_for(stopping, 5) == ["a"]
        for _ in range(100):  # the loop finalizes the abandoned generator soon
            if store.watches == 1:
                break
            await asyncio.sleep(0)
        assert store.watches == 1
        await store.close()
        assert await asyncio.wait_for(running, 5) == ["a", "b"]
        assert store.watches == 0
        with pytest.raises(StoreClosed):
            store.watch("DataVolume")
        with pytest.raises(StoreClosed):
            await store.get("DataVolume", "a", "default")
    run(tmp_path, body)


# -- durability ----------------------------------------------------------------


def test_objects_and_counter_survive_reopen(tmp_path: Path) -> None:
    async def first(store: SQLiteStore) -> None:
        await store.create(dv("a"))
        await store.create(dv("b"))
        await store.delete("DataVolume", "b", "default")  # the newest version is a delete

    async def second(store: SQLiteStore) -> None:
        listed = await store.list("DataVolume")
        assert [o["metadata"]["name"] for o in listed.items] == ["a"]
        assert listed.resource_version == "3"
        with pytest.raises(Gone):
            store.watch("DataVolume", resource_version="2")  # the history is not kept
        events = store.watch("DataVolume", resource_version="3")  # nothing since: fine
        c = await store.create(dv("c"))
        assert c["metadata"]["resourceVersion"] == "4"
        assert await take(events, 1) == [("ADDED", "c")]

    run(tmp_path, first)
    run(tmp_path, second)
    db = Database.open(tmp_path / "cdi.db")
    try:
        assert db.pragma("journal_mode") == "wal"
        assert db.pragma("synchronous") == 2  # FULL
        assert db.pragma("locking_mode") == "exclusive"
    finally:
        db.close()


def test_a_second_opener_is_refused(tmp_path: Path) -> None:
    async def body(store: SQLiteStore) -> None:
        other = SQLiteStore(tmp_path / "cdi.db")
        with pytest.raises(DatabaseInUse, match="in use by another process"):
            await other.open()
        await store.create(dv("a"))
    run(tmp_path, body)


CHILD = """
import asyncio, sys
from pathlib import Path
from cdi.backends.embedded import SQLiteStore

async def main() -> None:
    async with SQLiteStore(Path(sys.argv[1])) as store:
        for i in range(1_000_000):
            obj = {"kind": "DataVolume", "metadata": {"name": f"dv-{i}", "namespace": "default"},
                   "spec": {"i": i}}
            if i >= 2 and i % 2 == 0:  # mix in updates
                await store.patch("DataVolume", f"dv-{i - 2}", "default", {"spec": {"i": -1}})
            await store.create(obj)
            print(f"dv-{i}", flush=True)

asyncio.run(main())
"""


def test_acknowledged_writes_survive_kill_9(tmp_path: Path) -> None:
    script = tmp_path / "writer.py"
    script.write_text(CHILD)
    db = tmp_path / "cdi.db"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with (tmp_path / "stderr").open("w") as stderr, subprocess.Popen(
            [sys.executable, str(script), str(db)], stdout=subprocess.PIPE, stderr=stderr,
            env=env, text=True) as child:
        assert child.stdout is not None
        output: list[str] = []
        while len(output) < 300:
            line = child.stdout.readline()
            assert line, (tmp_path / "stderr").read_text()
            output.append(line)
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        output.append(child.stdout.read())
    assert child.returncode == -signal.SIGKILL
    acknowledged = [line for line in "".join(output).splitlines(keepends=True)
                    if line.endswith("\n")]
    assert len(acknowledged) >= 300

    async def check(store: SQLiteStore) -> None:
        listed = await store.list("DataVolume")
        names = {o["metadata"]["name"] for o in listed.items}
        missing = [n.strip() for n in acknowledged if n.strip() not in names]
        assert missing == []
        assert int(listed.resource_version) >= len(acknowledged)
        # The counter went on from where the killed process stopped.
        assert rv(await store.create(dv("after"))) == int(listed.resource_version) + 1

    run(tmp_path, check)


# -- concurrency ---------------------------------------------------------------


def test_concurrent_creates_and_replaces(tmp_path: Path) -> None:
    async def body(store: SQLiteStore) -> None:
        created = await asyncio.gather(*(store.create(dv(f"dv{i}")) for i in range(200)))
        assert len({rv(o) for o in created}) == 200
        assert len((await store.list("DataVolume")).items) == 200
        base = created[0]
        results = await asyncio.gather(
            *(store.replace({**base, "spec": {"writer": i}}) for i in range(50)),
            return_exceptions=True)
        winners = [r for r in results if isinstance(r, dict)]
        losers = [r for r in results if not isinstance(r, dict)]
        assert len(winners) == 1
        assert all(isinstance(r, Conflict) and r.message == CONFLICT.replace('"a"', '"dv0"')
                   for r in losers)
        assert (await store.get("DataVolume", "dv0", "default")) == winners[0]
    run(tmp_path, body)


def test_is_an_object_store(tmp_path: Path) -> None:
    store: ObjectStore = SQLiteStore(tmp_path / "cdi.db")  # checked by mypy
    assert isinstance(store, SQLiteStore)
    with pytest.raises(ValueError, match="at least 1"):
        SQLiteStore(tmp_path / "x.db", history_size=0)

    async def unopened() -> None:
        with pytest.raises(StoreClosed):
            await SQLiteStore(tmp_path / "y.db").get("DataVolume", "a", "default")
    asyncio.run(unopened())
    assert issubclass(StoreClosed, RuntimeError) and not issubclass(StoreClosed, APIError)
