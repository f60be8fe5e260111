"""The controller runtime against the real SQLite store."""

from __future__ import annotations

import asyncio
from pathlib import Path

from cdi.backends.embedded import SQLiteStore
from cdi.controllers.runtime import Key, Mapper, Result, Runtime, TemporaryError, owner_keys


class Recorder:
    name = "recorder"
    kind = "DataVolume"

    def __init__(self) -> None:
        self.calls: list[Key] = []
        self.running: set[Key] = set()
        self.overlap = False
        self.fail_first: set[Key] = set()
        self.requeue: dict[Key, int] = {}

    def watches(self) -> dict[str, Mapper]:
        return {"PersistentVolumeClaim": owner_keys("DataVolume")}

    async def reconcile(self, key: Key) -> Result | None:
        if key in self.running:
            self.overlap = True
        self.running.add(key)
        try:
            self.calls.append(key)
            await asyncio.sleep(0.01)
            if key in self.fail_first:
                self.fail_first.discard(key)
                raise TemporaryError("not yet", delay=0.05)
            left = self.requeue.get(key, 0)
            if left:
                self.requeue[key] = left - 1
                return Result(requeue_after=0.02)
            return None
        finally:
            self.running.discard(key)


def dv(name: str) -> dict[str, object]:
    return {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
            "metadata": {"name": name, "namespace": "ns"}, "spec": {}}


async def _settle(rec: Recorder, until: int, timeout: float = 5) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while len(rec.calls) < until:
        assert asyncio.get_running_loop().time() < deadline, rec.calls
        await asyncio.sleep(0.01)


def test_events_map_to_keys_in_order_and_retry(tmp_path: Path) -> None:
    async def main() -> None:
        async with SQLiteStore(tmp_path / "db") as store:
            existing = await store.create(dv("existing"))
            rec = Recorder()
            rec.fail_first.add(("ns", "flaky"))
            rec.requeue[("ns", "again")] = 2
            rt = Runtime(store)
            rt.add(rec)
            await rt.start()
            await _settle(rec, 1)
            assert rec.calls == [("ns", "existing")], "listed objects are reconciled"
            # A claim owned by the DataVolume maps to the DataVolume's key.
            await store.create({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                                "metadata": {"name": "c", "namespace": "ns", "ownerReferences": [
                                    {"kind": "DataVolume", "name": "existing",
                                     "uid": existing["metadata"]["uid"], "apiVersion": "x"}]},
                                "spec": {}})
            await _settle(rec, 2)
            await store.create(dv("flaky"))
            await _settle(rec, 4)
            assert rec.calls[2:4] == [("ns", "flaky"), ("ns", "flaky")], "retried after error"
            await store.create(dv("again"))
            await _settle(rec, 7)
            assert rec.calls[4:7] == [("ns", "again")] * 3, "requeued twice"
            # A burst of changes to one key is coalesced and never overlaps.
            before = len(rec.calls)
            for i in range(20):
                await store.patch("DataVolume", "existing", "ns",
                                  {"metadata": {"labels": {"n": str(i)}}})
            await asyncio.sleep(0.3)
            assert 1 <= len(rec.calls) - before < 20
            assert not rec.overlap
            await rt.stop()

    asyncio.run(main())
