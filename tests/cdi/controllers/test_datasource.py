"""The DataSource controller on the real SQLite store: each reason, timestamps, the index."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from cdi.api import errors
from cdi.backends.embedded.store import SQLiteStore
from cdi.backends.port import Obj
from cdi.controllers.datasource import DataSourceController
from cdi.controllers.runtime import Runtime

NS = "ns"


class Env:
    def __init__(self, store: SQLiteStore) -> None:
        self.store = store
        self.ticks = itertools.count(1)
        self.controller = DataSourceController(store, clock=self.clock)

    def clock(self) -> str:
        return f"2026-01-01T00:00:{next(self.ticks):02d}Z"

    async def ds(self, name: str, source: Obj, ns: str = NS) -> Obj:
        return await self.store.create({
            "apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataSource",
            "metadata": {"name": name, "namespace": ns}, "spec": {"source": source}})

    async def pvc(self, name: str, ns: str = NS) -> Obj:
        return await self.store.create({
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"resources": {"requests": {"storage": "1Mi"}}}})

    async def dv(self, name: str, phase: str) -> Obj:
        return await self.store.create({
            "apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"source": {"blank": {}}}, "status": {"phase": phase}})

    async def snapshot(self, name: str, ready: bool | None) -> Obj:
        status = {} if ready is None else {"readyToUse": ready}
        return await self.store.create({
            "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"source": {"persistentVolumeClaimName": "x"}}, "status": status})

    async def reconcile(self, name: str, ns: str = NS) -> Obj:
        assert await self.controller.reconcile((ns, name)) is None
        return await self.store.get("DataSource", name, ns)


def run(tmp_path: Path, body: Callable[[Env], Awaitable[None]]) -> None:
    async def main() -> None:
        async with SQLiteStore(tmp_path / "db") as store:
            await body(Env(store))

    asyncio.run(main())


def ready(ds: Obj) -> dict[str, Any]:
    conditions = ds["status"]["conditions"]
    assert [c["type"] for c in conditions] == ["Ready"]
    return dict(conditions[0])


def reason(ds: Obj) -> tuple[str, str, str]:
    c = ready(ds)
    return c["status"], c["reason"], c["message"]


READY = ("True", "Ready", "DataSource is ready to be consumed")


def test_claim_without_datavolume_is_ready(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        await env.pvc("golden")
        await env.ds("das", {"pvc": {"name": "golden", "namespace": NS}})
        ds = await env.reconcile("das")
        assert reason(ds) == READY
        assert ds["status"]["source"] == {"pvc": {"name": "golden", "namespace": NS}}
    run(tmp_path, body)


def test_claim_in_namespace_of_datasource_when_unset(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        await env.pvc("golden")
        await env.ds("das", {"pvc": {"name": "golden"}})
        ds = await env.reconcile("das")
        assert reason(ds) == READY
        assert ds["status"]["source"] == {"pvc": {"name": "golden"}}, "mirrored as written"
    run(tmp_path, body)


def test_claim_missing_is_not_found(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        await env.ds("das", {"pvc": {"name": "golden", "namespace": NS}})
        ds = await env.reconcile("das")
        assert reason(ds) == ("False", "NotFound", "PVC not found")
        assert ds["status"]["source"] == {}
    run(tmp_path, body)


def test_datavolume_not_done_gives_its_phase(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        await env.pvc("golden")
        dv = await env.dv("golden", "ImportInProgress")
        await env.ds("das", {"pvc": {"name": "golden", "namespace": NS}})
        ds = await env.reconcile("das")
        assert reason(ds) == ("False", "ImportInProgress",
                              "Import DataVolume phase ImportInProgress")
        assert ds["status"]["source"] == {}
        dv["status"] = {"phase": "Succeeded"}
        await env.store.replace_status(dv)
        assert reason(await env.reconcile("das")) == READY
    run(tmp_path, body)


def test_datavolume_succeeded_is_ready_before_the_claim_is_seen(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        await env.dv("golden", "Succeeded")
        await env.ds("das", {"pvc": {"name": "golden", "namespace": NS}})
        assert reason(await env.reconcile("das")) == READY  # CDI looks only at the DV then
    run(tmp_path, body)


@pytest.mark.parametrize(("ready_to_use", "expected"), [
    (True, READY),
    (False, ("False", "SnapshotNotReady", "Snapshot phase is not ready")),
    (None, ("False", "SnapshotNotReady", "Snapshot phase is not ready")),
])
def test_snapshot(tmp_path: Path, ready_to_use: bool | None,
                  expected: tuple[str, str, str]) -> None:
    async def body(env: Env) -> None:
        await env.snapshot("snap", ready_to_use)
        await env.ds("das", {"snapshot": {"name": "snap", "namespace": NS}})
        ds = await env.reconcile("das")
        assert reason(ds) == expected
        source = {"snapshot": {"name": "snap", "namespace": NS}} if expected == READY else {}
        assert ds["status"]["source"] == source
    run(tmp_path, body)


def test_snapshot_missing_is_not_found(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        await env.ds("das", {"snapshot": {"name": "snap", "namespace": NS}})
        assert reason(await env.reconcile("das")) == ("False", "NotFound", "Snapshot not found")
    run(tmp_path, body)


def test_no_source(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        await env.ds("das", {})
        ds = await env.reconcile("das")
        assert reason(ds) == ("False", "NoSource", "No source PVC set")
        assert ds["status"]["source"] == {}
    run(tmp_path, body)


def test_reference_resolves_to_the_referenced_source(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        await env.pvc("golden")
        await env.ds("base", {"pvc": {"name": "golden", "namespace": NS}})
        await env.ds("alias", {"dataSource": {"name": "base"}})
        ds = await env.reconcile("alias")
        assert reason(ds) == READY
        assert ds["status"]["source"] == {"pvc": {"name": "golden", "namespace": NS}}
    run(tmp_path, body)


def test_reference_to_a_datasource_whose_claim_is_missing(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        await env.ds("base", {"pvc": {"name": "golden", "namespace": NS}})
        await env.ds("alias", {"dataSource": {"name": "base", "namespace": NS}})
        ds = await env.reconcile("alias")
        assert reason(ds) == ("False", "NotFound", "PVC not found")
        assert ds["status"]["source"] == {}
    run(tmp_path, body)


@pytest.mark.parametrize(("ref", "expected"), [
    ({"name": "missing"},
     ("NotFound", 'datasources.cdi.kubevirt.io "missing" not found')),
    ({"name": "das"},
     ("SelfReference", "DataSource cannot self-reference")),
    ({"name": "das", "namespace": NS},
     ("SelfReference", "DataSource cannot self-reference")),
    ({"name": "base", "namespace": "other"},
     ("CrossNamespaceReference",
      "DataSource cannot reference a DataSource in another namespace")),
    ({"name": "chained"},
     ("MaxReferenceDepthReached", "DataSource reference chain exceeds maximum depth of 1")),
])
def test_reference_errors(tmp_path: Path, ref: Obj, expected: tuple[str, str]) -> None:
    async def body(env: Env) -> None:
        await env.pvc("golden")
        await env.ds("base", {"pvc": {"name": "golden", "namespace": NS}})
        await env.ds("base", {"pvc": {"name": "golden", "namespace": NS}}, ns="other")
        await env.ds("chained", {"dataSource": {"name": "base"}})
        await env.ds("das", {"dataSource": ref})
        ds = await env.reconcile("das")
        assert reason(ds) == ("False", *expected)
        assert ds["status"]["source"] == {}
    run(tmp_path, body)


def test_timestamps_move_as_cdi_moves_them(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        await env.ds("das", {"pvc": {"name": "golden", "namespace": NS}})
        first = await env.reconcile("das")
        c = ready(first)
        assert c["lastTransitionTime"] == c["lastHeartbeatTime"] == "2026-01-01T00:00:01Z"
        again = await env.reconcile("das")
        assert again["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"], \
            "nothing new, nothing written"
        # Same status, other reason: the heartbeat moves, the transition does not.
        await env.dv("golden", "Pending")
        c = ready(await env.reconcile("das"))
        assert (c["reason"], c["lastTransitionTime"], c["lastHeartbeatTime"]) == \
            ("Pending", "2026-01-01T00:00:01Z", "2026-01-01T00:00:03Z")
        # Status changes: both move.
        await env.store.delete("DataVolume", "golden", NS)
        await env.pvc("golden")
        c = ready(await env.reconcile("das"))
        assert (c["status"], c["lastTransitionTime"], c["lastHeartbeatTime"]) == \
            ("True", "2026-01-01T00:00:04Z", "2026-01-01T00:00:04Z")
    run(tmp_path, body)


def test_other_conditions_and_status_fields_are_kept(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        created = await env.ds("das", {})
        created["status"] = {"conditions": [{"type": "Other", "status": "True"}], "extra": 1}
        await env.store.replace_status(created)
        status = (await env.reconcile("das"))["status"]
        assert [c["type"] for c in status["conditions"]] == ["Other", "Ready"]
        assert status["extra"] == 1
    run(tmp_path, body)


def test_index_maps_dependents_to_datasources(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        c = env.controller
        maps = c.watches()
        await env.ds("base", {"pvc": {"name": "golden"}})
        await env.ds("alias", {"dataSource": {"name": "base"}})
        await env.ds("snap", {"snapshot": {"name": "s", "namespace": NS}})
        for name in ("base", "alias", "snap"):
            await env.reconcile(name)
        claim = {"metadata": {"name": "golden", "namespace": NS}}
        both = [(NS, "alias"), (NS, "base")]
        assert list(maps["PersistentVolumeClaim"](claim)) == both, "resolved sources count too"
        assert list(maps["DataVolume"](claim)) == both
        assert list(maps["VolumeSnapshot"]({"metadata": {"name": "s", "namespace": NS}})) == \
            [(NS, "snap")]
        assert list(maps["DataSource"]({"metadata": {"name": "base", "namespace": NS}})) == \
            [(NS, "alias")]
        assert list(maps["PersistentVolumeClaim"](
            {"metadata": {"name": "golden", "namespace": "other"}})) == []
        await env.store.delete("DataSource", "alias", NS)
        with pytest.raises(errors.NotFound):
            await env.reconcile("alias")
        assert c.referrers("claim", NS, "golden") == {(NS, "base")}
        assert c.referrers("dataSource", NS, "base") == set()
    run(tmp_path, body)


def test_runtime_follows_the_claim_and_the_reference(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        rt = Runtime(env.store)
        rt.add(env.controller)
        await env.ds("base", {"pvc": {"name": "golden", "namespace": NS}})
        await env.ds("alias", {"dataSource": {"name": "base"}})
        await rt.start()
        try:
            for name in ("base", "alias"):
                await until(env, name, lambda ds: reason(ds)[1] == "NotFound")
            await env.pvc("golden")
            for name in ("base", "alias"):
                await until(env, name, lambda ds: reason(ds) == READY)
            await env.store.delete("PersistentVolumeClaim", "golden", NS)
            for name in ("base", "alias"):
                await until(env, name, lambda ds: reason(ds)[1] == "NotFound")
        finally:
            await rt.stop()
    run(tmp_path, body)


async def until(env: Env, name: str, predicate: Callable[[Obj], bool]) -> None:
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        ds = await env.store.get("DataSource", name, NS)
        if ds.get("status", {}).get("conditions") and predicate(ds):
            return
        assert asyncio.get_running_loop().time() < deadline, ds.get("status")
        await asyncio.sleep(0.02)
