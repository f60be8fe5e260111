"""The registry poll keeps its client between polls: against a real docker-registry, a
steady poll is one manifest request (no new ping, no new TLS context), and a client
whose poll failed is not kept.  And a cron in the steady state (``cronquiet``)
costs a poll and a write per run."""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Iterator
from pathlib import Path

import pytest

from cdi.api import errors
from cdi.backends.embedded.store import SQLiteStore
from cdi.controllers import cronpoll, cronquiet
from cdi.controllers import dataimportcron as dic
from cdi.controllers.dataimportcron import DataImportCronController
from importer import containerdisk
from tests.support import images
from tests.support.registry import Registry


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    reg = Registry(tmp_path / "registry").start()
    try:
        yield reg
    finally:
        reg.stop()


def _publish(registry: Registry, tmp_path: Path, seed: int) -> str:
    disk = images.make_raw(tmp_path / f"disk{seed}.raw", virtual_size=1 << 20,
                           extents=[(0, 4096)], seed=seed)
    return containerdisk.publish(disk, registry.ref("os/kept"), insecure=True)


def _requests(registry: Registry) -> list[tuple[str, str]]:
    return [(a.method, a.path) for a in registry.accesses()
            if a.path == "/v2/" or a.path.startswith("/v2/os/kept/manifests/")]


def test_steady_polls_are_one_manifest_request_each(registry: Registry,
                                                    tmp_path: Path) -> None:
    digest = _publish(registry, tmp_path, 1)
    before = len(_requests(registry))
    target = cronpoll.PollTarget(url=f"docker://{registry.ref('os/kept')}", insecure=True)
    assert [cronpoll.poll_digest(target) for _ in range(3)] == [digest] * 3
    head = ("HEAD", "/v2/os/kept/manifests/latest")
    assert _requests(registry)[before:] == [("GET", "/v2/"), head, head, head]
    # A new image on the tag is seen by the kept client.
    second = _publish(registry, tmp_path, 2)
    assert cronpoll.poll_digest(target) == second != digest


def test_a_failed_poll_drops_the_kept_client(registry: Registry, tmp_path: Path) -> None:
    digest = _publish(registry, tmp_path, 1)
    target = cronpoll.PollTarget(url=f"docker://{registry.ref('os/kept')}", insecure=True)
    assert cronpoll.poll_digest(target) == digest
    assert target in cronpoll._clients
    registry.stop()
    with pytest.raises(cronpoll.PollError, match="connection refused"):
        cronpoll.poll_digest(target)
    assert target not in cronpoll._clients


# -- the steady state (cronquiet) -----------------------------------------------------


D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64


def test_a_steady_cron_is_polled_without_rereading_what_did_not_move(tmp_path: Path) -> None:
    """Under a runtime (events counted through ``watches``), an UpToDate cron's passes
    only poll and write; an event for the cron, or a new digest, brings a full pass."""
    now = [datetime.datetime(2026, 3, 1, 10, 0, 30, tzinfo=datetime.UTC)]
    digest = [D1]
    polls: list[str] = []

    def poller(target: cronpoll.PollTarget) -> str:
        polls.append(target.url)
        return digest[0]

    async def main() -> None:
        async with SQLiteStore(tmp_path / "db") as store:
            controller = DataImportCronController(store, clock=lambda: now[0], poller=poller)
            mappers = controller.watches()
            key = ("ns", "c")
            await store.create({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                                "metadata": {"name": "ds-111111111111", "namespace": "ns"},
                                "spec": {"resources": {"requests": {"storage": "1Mi"}}},
                                "status": {"phase": "Bound"}})
            await store.create({
                "apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataImportCron",
                "metadata": {"name": "c", "namespace": "ns"},
                "spec": {"schedule": "* * * * *", "managedDataSource": "ds",
                         "template": {"spec": {
                             "source": {"registry": {"url": "docker://r.example/a/b:1"}},
                             "storage": {"resources": {"requests": {"storage": "1Mi"}}}}}}})
            for _ in range(3):  # full passes: polled, the claim reused, UpToDate
                await controller.reconcile(key)
            cron = await store.get("DataImportCron", "c", "ns")
            assert cronquiet.up_to_date(cron) and polls == ["docker://r.example/a/b:1"]
            # Quiet: a DataSource deleted behind the controller's back (no event) is
            # not noticed, which shows the pass read nothing but the cron...
            ds = await store.get("DataSource", "ds", "ns")
            await store.delete("DataSource", "ds", "ns")
            result = await controller.reconcile(key)
            assert result is not None and result.requeue_after == 30.0
            assert not await _exists(store, "DataSource", "ds")
            # ...and its event brings the full pass that recreates it.
            assert list(mappers["DataSource"](ds)) == [key]
            await controller.reconcile(key)
            assert await _exists(store, "DataSource", "ds")
            # The next run: one poll, one write of the times; then quiet again.
            await controller.reconcile(key)
            now[0] += datetime.timedelta(minutes=1)
            await controller.reconcile(key)
            assert len(polls) == 2
            cron = await store.get("DataImportCron", "c", "ns")
            ann = cron["metadata"]["annotations"]
            assert ann[dic.ANN_NEXT_CRON_TIME] == "2026-03-01T10:02:00Z"
            assert ann[dic.ANN_LAST_CRON_TIME] == cron["status"]["lastExecutionTimestamp"] \
                == "2026-03-01T10:01:30Z"
            await controller.reconcile(key)  # its own write's event: not due
            assert len(polls) == 2
            # A new digest: written by the short pass, imported by the full one it brings.
            digest[0] = D2
            now[0] += datetime.timedelta(minutes=1)
            await controller.reconcile(key)
            assert (await store.get("DataImportCron", "c", "ns"))["metadata"][
                "annotations"][dic.ANN_DESIRED_DIGEST] == D2
            await controller.reconcile(key)
            assert await _exists(store, "DataVolume", "ds-222222222222")
            assert len(polls) == 3

    asyncio.run(main())


async def _exists(store: SQLiteStore, kind: str, name: str) -> bool:
    try:
        await store.get(kind, name, "ns")
    except errors.NotFound:
        return False
    return True
