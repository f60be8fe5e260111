"""KubeStore.watch: order, resume after a dropped stream, bookmarks, and 410 Gone."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from cdi.api import errors
from cdi.backends.kube import KubeStore
from cdi.backends.port import Obj, WatchEvent
from tests.cdi.backends.kube.conftest import store_on
from tests.support.fakekube import FakeKube


def cm(name: str, value: str = "1", ns: str = "ns") -> Obj:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": ns},
            "data": {"v": value}}


async def take(events: AsyncIterator[WatchEvent], n: int) -> list[tuple[str, str, Any]]:
    got = []
    for _ in range(n):
        e = await asyncio.wait_for(anext(events), 10)
        got.append((e.type, e.object["metadata"]["name"], (e.object.get("data") or {}).get("v")))
    return got


async def until(predicate: Any, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await asyncio.to_thread(predicate):
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.02)


def watch_requests(fake: FakeKube, plural: str = "configmaps") -> list[dict[str, str]]:
    return [q for m, p, q in fake.requests if p.endswith(plural) and q.get("watch") == "1"]


def test_watch_from_a_list_sees_every_change_in_order(fake: FakeKube) -> None:
    fake.put(cm("before"))

    async def main() -> list[tuple[str, str, Any]]:
        async with store_on(fake) as store:
            listed = await store.list("ConfigMap", "ns")
            events = store.watch("ConfigMap", "ns", resource_version=listed.resource_version)
            first = asyncio.ensure_future(take(events, 4))
            await until(lambda: fake.watchers() == 1)
            await store.create(cm("a"))
            await store.patch("ConfigMap", "a", "ns", {"data": {"v": "2"}})
            await store.create(cm("other", ns="elsewhere"))  # another namespace: not seen
            await store.delete("ConfigMap", "before", "ns")
            await store.create(cm("b"))
            got = await first
            await events.aclose()  # type: ignore[attr-defined]
            return got

    assert asyncio.run(main()) == [("ADDED", "a", "1"), ("MODIFIED", "a", "2"),
                                   ("DELETED", "before", "1"), ("ADDED", "b", "1")]
    assert watch_requests(fake)[0]["allowWatchBookmarks"] == "true"


def test_a_dropped_stream_resumes_from_the_last_version(fake: FakeKube) -> None:
    async def main() -> list[tuple[str, str, Any]]:
        async with store_on(fake) as store:
            events = store.watch("ConfigMap", "ns")
            got = asyncio.ensure_future(take(events, 4))
            await until(lambda: fake.watchers() == 1)
            await store.create(cm("a"))
            await until(lambda: fake.get("ConfigMap", "a", "ns") is not None)
            await asyncio.sleep(0.1)  # delivered before the cut
            assert await asyncio.to_thread(fake.drop_watches) == 1
            # Changes while no watch is connected are not lost, and none is repeated.
            fake.put(cm("b"))
            fake.put(cm("c"))
            await until(lambda: fake.watchers() == 1)
            await store.create(cm("d"))
            result = await got
            await events.aclose()  # type: ignore[attr-defined]
            return result

    assert asyncio.run(main()) == [("ADDED", "a", "1"), ("ADDED", "b", "1"),
                                   ("ADDED", "c", "1"), ("ADDED", "d", "1")]
    first, resumed = watch_requests(fake)[:2]
    a = fake.get("ConfigMap", "a", "ns")
    assert a is not None and resumed["resourceVersion"] == a["metadata"]["resourceVersion"]
    assert int(first["resourceVersion"]) < int(resumed["resourceVersion"])


def test_a_bookmark_moves_the_resume_point(fake: FakeKube) -> None:
    """Bookmarks keep a quiet watch's version fresh, so a resume after compaction
    needs no relist."""
    async def main() -> list[tuple[str, str, Any]]:
        async with store_on(fake) as store:
            events = store.watch("ConfigMap", "ns")
            got = asyncio.ensure_future(take(events, 1))
            await until(lambda: fake.watchers() == 1)
            for i in range(3):  # other kinds move the global version on
                fake.put({"apiVersion": "v1", "kind": "Secret",
                          "metadata": {"name": f"s{i}", "namespace": "ns"}})
            assert await asyncio.to_thread(fake.bookmark) == 1
            await asyncio.sleep(0.2)
            await asyncio.to_thread(fake.compact)
            await asyncio.to_thread(fake.drop_watches)
            await until(lambda: fake.watchers() == 1)
            await store.create(cm("after"))
            result = await got
            await events.aclose()  # type: ignore[attr-defined]
            return result

    assert asyncio.run(main()) == [("ADDED", "after", "1")]
    resumed = watch_requests(fake)[1]
    assert resumed["resourceVersion"] == str(fake.floor)
    lists = [q for m, p, q in fake.requests
             if m == "GET" and p.endswith("configmaps") and "watch" not in q]
    assert len(lists) == 1  # the watch's own starting list; no relist


def test_410_gone_relists_and_emits_what_changed(fake: FakeKube) -> None:
    for name in ("kept", "changed", "removed"):
        fake.put(cm(name))

    async def main() -> list[tuple[str, str, Any]]:
        async with store_on(fake) as store:
            listed = await store.list("ConfigMap", "ns")
            events = store.watch("ConfigMap", "ns", resource_version=listed.resource_version)
            got = asyncio.ensure_future(take(events, 4))
            await until(lambda: fake.watchers() == 1)
            fake.put(cm("seen"))
            await asyncio.sleep(0.2)
            fake.refuse_watches = True
            await asyncio.to_thread(fake.drop_watches)
            # While disconnected: changes, then the history is compacted past them.
            fake.patch("ConfigMap", "changed", "ns", {"data": {"v": "2"}})
            fake.remove("ConfigMap", "removed", "ns")
            fake.put(cm("new"))
            await asyncio.to_thread(fake.compact)
            fake.refuse_watches = False
            result = await got
            # the watch goes on from the relist's version
            more = asyncio.ensure_future(take(events, 1))
            await until(lambda: fake.watchers() == 1)
            await store.create(cm("later"))
            result += await more
            await events.aclose()  # type: ignore[attr-defined]
            return result

    got = asyncio.run(main())
    assert got[0] == ("ADDED", "seen", "1")
    assert got[-1] == ("ADDED", "later", "1")
    assert sorted(got[1:-1]) == [("ADDED", "new", "1"), ("DELETED", "removed", "1"),
                               ("MODIFIED", "changed", "2")]
    lists = [q for m, p, q in fake.requests
             if m == "GET" and p.endswith("configmaps") and "watch" not in q]
    assert len(lists) == 2  # the caller's list, and the relist after 410
    assert watch_requests(fake)[-1]["resourceVersion"] == str(fake.rv - 1)


def test_a_watch_from_an_unknown_old_version_is_gone(fake: FakeKube) -> None:
    fake.put(cm("a"))
    fake.compact()

    async def main() -> None:
        async with store_on(fake) as store:
            events = store.watch("ConfigMap", "ns", resource_version="1")
            with pytest.raises(errors.Gone):
                await asyncio.wait_for(anext(events), 10)

    asyncio.run(main())


def test_the_watch_ends_when_the_store_closes(fake: FakeKube) -> None:
    async def main() -> list[WatchEvent]:
        store: KubeStore = store_on(fake)
        await store.open()
        events = store.watch("ConfigMap", "ns")
        seen: list[WatchEvent] = []

        async def consume() -> None:
            async for e in events:
                seen.append(e)

        task = asyncio.ensure_future(consume())
        await until(lambda: fake.watchers() == 1)
        await store.close()
        await asyncio.wait_for(task, 10)
        return seen

    assert asyncio.run(main()) == []
