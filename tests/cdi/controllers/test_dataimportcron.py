"""The DataImportCron controller on the real SQLite store, with a fake clock and poller:
naming, the persisted schedule, imports and failures, garbage collection, deletion; and
the digest poll against a real docker-registry."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime
import json
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cdi.api import errors
from cdi.backends.embedded.store import SQLiteStore
from cdi.backends.port import Obj
from cdi.controllers import cronnames, cronpoll
from cdi.controllers import dataimportcron as dic
from cdi.controllers.dataimportcron import DataImportCronController
from importer import containerdisk
from tests.support import images
from tests.support.registry import Registry
from tests.support.tls import make_ca, write_tls_files

NS = "ns"
URL = "docker://registry.example:5000/os/fedora:41"
D1 = "sha256:" + "1" * 12 + "a" * 52
D2 = "sha256:" + "2" * 12 + "b" * 52
D3 = "sha256:" + "3" * 12 + "c" * 52


def at(hh: int, mm: int, ss: int = 0) -> datetime.datetime:
    return datetime.datetime(2026, 3, 1, hh, mm, ss, tzinfo=datetime.UTC)


class Env:
    def __init__(self, store: SQLiteStore) -> None:
        self.store = store
        self.now = at(10, 20)
        self.digest = D1
        self.polls: list[cronpoll.PollTarget] = []
        self.controller = self.new_controller()

    def new_controller(self) -> DataImportCronController:
        """A fresh controller, as after a restart of cdi serve: nothing kept in memory."""
        return DataImportCronController(self.store, clock=lambda: self.now, poller=self.poll)

    def poll(self, target: cronpoll.PollTarget) -> str:
        self.polls.append(target)
        if self.digest.startswith("error"):
            raise cronpoll.PollError(self.digest)
        return self.digest

    async def cron(self, name: str = "fedora", *, schedule: str = "0 * * * *",
                   **spec: Any) -> Obj:
        return await self.store.create({
            "apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataImportCron",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"schedule": schedule, "managedDataSource": "fedora-ds",
                     "template": {"metadata": {"labels": {"team": "os"}},
                                  "spec": {"source": {"registry": {"url": URL}},
                                           "storage": {"resources": {
                                               "requests": {"storage": "1Gi"}}}}},
                     **spec}})

    async def reconcile(self, name: str = "fedora") -> float | None:
        result = await self.controller.reconcile((NS, name))
        return None if result is None else result.requeue_after

    async def get(self, kind: str, name: str) -> Obj:
        return await self.store.get(kind, name, NS)

    async def exists(self, kind: str, name: str) -> bool:
        try:
            await self.store.get(kind, name, NS)
        except errors.NotFound:
            return False
        return True

    async def finish(self, name: str, *, phase: str = "Succeeded",
                     running: tuple[str, str] | None = None) -> None:
        """Play the DataVolume controller: a claim like it makes, and the DV's phase."""
        dv = await self.get("DataVolume", name)
        if not await self.exists("PersistentVolumeClaim", name):
            await self.store.create({
                "apiVersion": "v1", "kind": "PersistentVolumeClaim",
                "metadata": {"name": name, "namespace": NS,
                             "labels": dict(dv["metadata"].get("labels") or {}),
                             "annotations": dict(dv["metadata"].get("annotations") or {})},
                "spec": {"resources": {"requests": {"storage": "1Gi"}}},
                "status": {"phase": "Bound"}})
        status: Obj = {"phase": phase}
        if running is not None:
            status["conditions"] = [{"type": "Running", "status": "False",
                                     "reason": running[0], "message": running[1]}]
        dv["status"] = status
        await self.store.replace_status(dv)


def run(test: Callable[[Env], Awaitable[None]], tmp_path: Path) -> None:
    async def main() -> None:
        async with SQLiteStore(tmp_path / "db") as store:
            await test(Env(store))
    asyncio.run(main())


def cond(obj: Obj, ctype: str) -> tuple[str, str, str]:
    for c in obj.get("status", {}).get("conditions", []):
        if c["type"] == ctype:
            return (c["status"], c["reason"], c["message"])
    return ("", "", "")


# -- names ----------------------------------------------------------------------------


def test_names_follow_cdi() -> None:
    assert cronnames.dv_name("fedora-ds", D1) == "fedora-ds-111111111111"
    assert cronnames.dv_name("golden", "uid:0123456789abcdef") == "golden-0123456789ab"
    with pytest.raises(ValueError, match="no supported prefix"):
        cronnames.dv_name("golden", "md5:0123456789abcdef")
    with pytest.raises(ValueError, match="too short"):
        cronnames.dv_name("golden", "sha256:0123")
    long = cronnames.resource_name("b" * 250, "111111111111")
    assert len(long) == 253 and long.endswith("-111111111111")
    assert long.split("-")[-2] == cronnames._fnv32a("b" * 250)
    assert cronnames.digested_url(URL, D1) == f"docker://registry.example:5000/os/fedora@{D1}"
    assert cronnames.digested_url("docker://localhost:5000/cirros", D1) == \
        f"docker://localhost:5000/cirros@{D1}"
    assert cronnames.digested_url(f"docker://quay.io/os/x@{D2}", D1) == f"docker://quay.io/os/x@{D1}"


def test_garbage_keeps_the_newest_by_last_use_time() -> None:
    def vol(name: str, used: str | None) -> Obj:
        ann = {} if used is None else {cronnames.ANN_LAST_USE_TIME: used}
        return {"metadata": {"name": name, "annotations": ann}}

    volumes = [vol("a", "2026-03-01T10:00:00.000001Z"), vol("b", "2026-03-01T12:00:00.000000Z"),
               vol("c", None), vol("d", "2026-03-01T11:00:00.000000Z"),
               # a DataVolume and its claim: the newer stamp of the two counts
               vol("a", "2026-03-01T13:00:00.000000Z")]
    assert cronnames.garbage(volumes, 3) == ["c"]
    assert cronnames.garbage(volumes, 1) == ["b", "d", "c"]
    assert cronnames.garbage(volumes, 0) == ["a", "b", "d", "c"]
    assert cronnames.garbage(volumes, 10) == []


# -- schedule -------------------------------------------------------------------------


def test_first_poll_imports_and_the_schedule_survives_a_restart(tmp_path: Path) -> None:
    async def test(env: Env) -> None:
        await env.cron()
        assert await env.reconcile() == 40 * 60  # next run at 11:00
        assert len(env.polls) == 1 and env.polls[0].url == URL
        cron = await env.get("DataImportCron", "fedora")
        ann = cron["metadata"]["annotations"]
        assert ann[dic.ANN_NEXT_CRON_TIME] == "2026-03-01T11:00:00Z"
        assert ann[dic.ANN_LAST_CRON_TIME] == "2026-03-01T10:20:00Z"
        assert ann[dic.ANN_DESIRED_DIGEST] == D1
        assert cron["status"]["lastExecutionTimestamp"] == "2026-03-01T10:20:00Z"
        assert cron["status"]["currentImports"] == [
            {"DataVolumeName": "fedora-ds-111111111111", "Digest": D1}]
        assert cond(cron, "UpToDate") == ("False", "Outdated",
                                          "Source digest updated since last import")
        assert cond(cron, "Progressing") == ("False", "NoImport", "No current import")

        dv = await env.get("DataVolume", "fedora-ds-111111111111")
        assert dv["spec"]["source"]["registry"]["url"] == \
            f"docker://registry.example:5000/os/fedora@{D1}"
        assert dv["metadata"]["labels"] == {"team": "os", dic.LABEL_CRON: "fedora"}
        assert dv["metadata"]["annotations"][dic.ANN_IMMEDIATE_BIND] == "true"
        assert dv["metadata"]["annotations"][cronnames.ANN_LAST_USE_TIME] == \
            "2026-03-01T10:20:00.000000Z"
        assert "ownerReferences" not in dv["metadata"]  # labelled, not owned (CDI)
        ds = await env.get("DataSource", "fedora-ds")
        assert ds["metadata"]["labels"] == {dic.LABEL_CRON: "fedora"}
        assert ds["spec"]["source"] == {}  # nothing imported yet

        # A restart before the next run: no poll, the same next run.
        env.controller = env.new_controller()
        env.now = at(10, 30)
        assert await env.reconcile() == 30 * 60
        assert len(env.polls) == 1
        # The run is due: exactly one poll, however often the cron is reconciled.
        env.now = at(11, 0, 30)
        env.controller = env.new_controller()
        assert await env.reconcile() == 59 * 60 + 30
        assert await env.reconcile() == 59 * 60 + 30
        assert len(env.polls) == 2
        cron = await env.get("DataImportCron", "fedora")
        assert cron["metadata"]["annotations"][dic.ANN_NEXT_CRON_TIME] == "2026-03-01T12:00:00Z"
        assert cron["status"]["lastExecutionTimestamp"] == "2026-03-01T11:00:30Z"
        # A next run set in the past (what a user does to force a poll) polls now.
        await env.store.patch("DataImportCron", "fedora", NS, {"metadata": {"annotations": {
            dic.ANN_NEXT_CRON_TIME: "2026-03-01T00:00:00Z"}}})
        assert await env.reconcile() == 59 * 60 + 30
        assert len(env.polls) == 3
    run(test, tmp_path)


def test_an_empty_schedule_never_polls_but_a_set_digest_imports(tmp_path: Path) -> None:
    async def test(env: Env) -> None:
        await env.cron(schedule="")
        assert await env.reconcile() is None
        assert env.polls == []
        cron = await env.get("DataImportCron", "fedora")
        assert dic.ANN_NEXT_CRON_TIME not in (cron["metadata"].get("annotations") or {})
        assert cond(cron, "UpToDate") == ("False", "NoDigest", "No source digest")
        await env.store.patch("DataImportCron", "fedora", NS, {"metadata": {"annotations": {
            dic.ANN_DESIRED_DIGEST: D2}}})
        assert await env.reconcile() is None
        assert await env.exists("DataVolume", "fedora-ds-222222222222")
        assert env.polls == []
    run(test, tmp_path)


def test_a_failed_poll_is_retried_without_losing_the_run(tmp_path: Path) -> None:
    async def test(env: Env) -> None:
        await env.cron(schedule="* * * * *")
        env.digest = "error: connection refused"
        assert await env.reconcile() == 30.0  # the next minute is 60 s away
        cron = await env.get("DataImportCron", "fedora")
        assert dic.ANN_NEXT_CRON_TIME not in (cron["metadata"].get("annotations") or {})
        assert cond(cron, "UpToDate") == ("False", "NoDigest", "No source digest")
        evs = (await env.store.list("Event", NS)).items
        assert [e["reason"] for e in evs] == ["PollFailed"]
        assert "connection refused" in evs[0]["message"]
        env.now = at(10, 20, 30)
        assert await env.reconcile() == 30.0  # the same failure again: no second event
        assert len((await env.store.list("Event", NS)).items) == 1
        env.digest = D1
        assert await env.reconcile() == 30.0
        assert await env.exists("DataVolume", "fedora-ds-111111111111")
    run(test, tmp_path)


# -- imports --------------------------------------------------------------------------


def test_the_data_source_moves_only_to_a_succeeded_import(tmp_path: Path) -> None:
    async def test(env: Env) -> None:
        await env.cron(importsToKeep=1)
        await env.reconcile()
        first = "fedora-ds-111111111111"
        await env.finish(first, phase="ImportInProgress")
        await env.reconcile()
        cron = await env.get("DataImportCron", "fedora")
        assert cond(cron, "Progressing") == ("True", "ImportProgressing", "Import is progressing")
        assert cond(cron, "UpToDate") == ("False", "ImportProgressing", "Import is progressing")
        assert (await env.get("DataSource", "fedora-ds"))["spec"]["source"] == {}

        env.now = at(10, 21)
        await env.finish(first)
        await env.reconcile()
        cron = await env.get("DataImportCron", "fedora")
        assert cond(cron, "UpToDate") == ("True", "UpToDate", "Latest import is up to date")
        assert cond(cron, "Progressing") == ("False", "NoImport", "No current import")
        assert cron["status"]["lastImportedPVC"] == {"namespace": NS, "name": first}
        assert cron["status"]["lastImportTimestamp"] == "2026-03-01T10:21:00Z"
        assert cron["status"]["sourceFormat"] == "pvc"
        ds = await env.get("DataSource", "fedora-ds")
        assert ds["spec"]["source"] == {"pvc": {"namespace": NS, "name": first}}
        pvc = await env.get("PersistentVolumeClaim", first)
        assert pvc["metadata"]["annotations"][cronnames.ANN_LAST_USE_TIME] == \
            "2026-03-01T10:21:00.000000Z"
        rv = cron["metadata"]["resourceVersion"]
        await env.reconcile()  # nothing new: nothing written
        assert (await env.get("DataImportCron", "fedora"))["metadata"]["resourceVersion"] == rv

        # A new digest whose import fails: the DataSource stays, the import retries.
        env.digest, env.now = D2, at(11, 0)
        await env.reconcile()
        second = "fedora-ds-222222222222"
        await env.finish(second, phase="ImportInProgress",
                         running=("Error", "Unable to process data: no disk"))
        await env.reconcile()
        cron = await env.get("DataImportCron", "fedora")
        assert cron["status"]["currentImports"] == [{"DataVolumeName": second, "Digest": D2}]
        assert cond(cron, "UpToDate")[0] == "False"
        assert (await env.get("DataSource", "fedora-ds"))["spec"]["source"]["pvc"]["name"] == \
            first
        assert await env.exists("DataVolume", second)

        # A newer digest replaces the failed import; its success collects the old ones.
        env.digest, env.now = D3, at(12, 0)
        await env.reconcile()
        third = "fedora-ds-333333333333"
        assert not await env.exists("DataVolume", second)
        assert (await env.get("DataImportCron", "fedora"))["status"]["currentImports"] == [
            {"DataVolumeName": third, "Digest": D3}]
        env.now = at(12, 5)
        await env.finish(third)
        await env.reconcile()
        assert (await env.get("DataSource", "fedora-ds"))["spec"]["source"]["pvc"]["name"] == \
            third
        assert not await env.exists("DataVolume", first)  # importsToKeep: 1
        assert await env.exists("DataVolume", third)
    run(test, tmp_path)


def test_an_existing_claim_of_the_digest_is_reused(tmp_path: Path) -> None:
    async def test(env: Env) -> None:
        await env.store.create({
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": "fedora-ds-111111111111", "namespace": NS},
            "spec": {"resources": {"requests": {"storage": "1Gi"}}},
            "status": {"phase": "Bound"}})
        await env.cron()
        await env.reconcile()
        assert not await env.exists("DataVolume", "fedora-ds-111111111111")
        pvc = await env.get("PersistentVolumeClaim", "fedora-ds-111111111111")
        assert pvc["metadata"]["labels"][dic.LABEL_CRON] == "fedora"
        await env.reconcile()
        ds = await env.get("DataSource", "fedora-ds")
        assert ds["spec"]["source"]["pvc"]["name"] == "fedora-ds-111111111111"
        cron = await env.get("DataImportCron", "fedora")
        assert cond(cron, "UpToDate") == ("True", "UpToDate", "Latest import is up to date")
    run(test, tmp_path)


@pytest.mark.parametrize(("spec", "left"), [
    ({}, 3),  # garbageCollect Outdated and importsToKeep 3 by default
    ({"importsToKeep": 2}, 2),
    ({"garbageCollect": "Never", "importsToKeep": 1}, 4),
])
def test_garbage_collection(tmp_path: Path, spec: Obj, left: int) -> None:
    async def test(env: Env) -> None:
        await env.cron(**spec)
        for i in range(4):
            env.digest = f"sha256:{i:012d}" + "f" * 52
            env.now = at(10 + i, 0, 1)
            await env.reconcile()
            name = f"fedora-ds-{i:012d}"
            await env.finish(name)
            await env.reconcile()
        dvs = (await env.store.list("DataVolume", NS)).items
        names = sorted(d["metadata"]["name"] for d in dvs)
        assert names == [f"fedora-ds-{i:012d}" for i in range(4 - left, 4)]
    run(test, tmp_path)


# -- ownership and deletion -------------------------------------------------------------


@pytest.mark.parametrize(("policy", "kept"), [(None, True), ("All", True), ("None", False)])
def test_deletion_follows_the_retention_policy(tmp_path: Path, policy: str | None,
                                               kept: bool) -> None:
    async def test(env: Env) -> None:
        await env.cron(**({} if policy is None else {"retentionPolicy": policy}))
        await env.reconcile()
        await env.finish("fedora-ds-111111111111")
        await env.reconcile()
        await env.store.delete("DataImportCron", "fedora", NS)
        await env.reconcile()
        for kind, name in (("DataSource", "fedora-ds"), ("DataVolume", "fedora-ds-111111111111"),
                           ("PersistentVolumeClaim", "fedora-ds-111111111111")):
            assert await env.exists(kind, name) is kept, kind
    run(test, tmp_path)


def test_a_data_source_managed_by_another_cron_is_left_alone(tmp_path: Path) -> None:
    async def test(env: Env) -> None:
        await env.cron("first")
        await env.reconcile("first")
        await env.cron("second")
        assert await env.reconcile("second") is None
        assert len(env.polls) == 1
        evs = (await env.store.list("Event", NS)).items
        assert [(e["reason"], e["message"]) for e in evs] == [
            ("ErrDataSourceAlreadyManaged",
             "DataSource fedora-ds is already managed by DataImportCron first")]
        ds = await env.get("DataSource", "fedora-ds")
        assert ds["metadata"]["labels"][dic.LABEL_CRON] == "first"
    run(test, tmp_path)


# -- the poll, against a real registry ----------------------------------------------------


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    reg = Registry(tmp_path_factory.mktemp("reg")).start()
    try:
        yield reg
    finally:
        reg.stop()


def test_poll_reads_the_manifest_and_the_index_digest(tmp_path: Path,
                                                       registry: Registry) -> None:
    disk = images.make_raw(tmp_path / "disk.raw", virtual_size=1 << 20, extents=[(0, 4096)])
    single = containerdisk.publish(disk, registry.ref("os/single"), insecure=True)
    multi = containerdisk.publish({"amd64": disk, "arm64": disk}, registry.ref("os/multi"),
                                  insecure=True)
    target = cronpoll.PollTarget(url=f"docker://{registry.ref('os/single')}", insecure=True)
    assert cronpoll.poll_digest(target) == single
    target = cronpoll.PollTarget(url=f"docker://{registry.ref('os/multi')}", insecure=True)
    assert cronpoll.poll_digest(target) == multi  # the index, not this machine's manifest
    # HEAD only: the poll never downloads the manifest when the registry names its digest.
    reads = [a.method for a in registry.accesses()
             if "/manifests/" in a.path and a.method in ("HEAD", "GET")]
    assert reads == ["HEAD", "HEAD"]
    with pytest.raises(cronpoll.PollError, match="manifest unknown"):
        cronpoll.poll_digest(cronpoll.PollTarget(
            url=f"docker://{registry.ref('os/none')}", insecure=True))
    # Not on the insecure list: HTTPS only, which a plain registry does not speak.
    with pytest.raises(cronpoll.PollError, match="pinging container registry"):
        cronpoll.poll_digest(cronpoll.PollTarget(url=f"docker://{registry.ref('os/single')}"))


def test_poll_with_a_pull_secret_and_a_ca_config_map(tmp_path: Path) -> None:
    tls = write_tls_files(tmp_path / "tls", make_ca())
    reg = Registry(tmp_path / "reg", tls=tls, htpasswd={"alice": "s3cret"}).start()
    try:
        disk = images.make_raw(tmp_path / "disk.raw", virtual_size=1 << 20,
                               extents=[(0, 4096)])
        pusher = containerdisk.Pusher(reg.ref("os/private"), username="alice",
                                      password="s3cret", cert_dir=tls.ca_dir)
        layer = containerdisk.layer(tmp_path / "work", containerdisk.disk_entries(disk))
        try:
            digest = pusher.push([containerdisk.image([layer])])
        finally:
            pusher.close()
        url = f"docker://{reg.ref('os/private')}"
        auth = base64.b64encode(b"alice:s3cret").decode()

        async def main() -> list[cronpoll.PollTarget]:
            async with SQLiteStore(tmp_path / "db") as store:
                def b64(text: str) -> str:
                    return base64.b64encode(text.encode()).decode()
                await store.create({
                    "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                    "metadata": {"name": "keys", "namespace": NS},
                    "data": {"accessKeyId": b64("alice"), "secretKey": b64("s3cret")}})
                await store.create({
                    "apiVersion": "v1", "kind": "Secret",
                    "type": "kubernetes.io/dockerconfigjson",
                    "metadata": {"name": "pull", "namespace": NS},
                    "data": {".dockerconfigjson": b64(json.dumps(
                        {"auths": {reg.host: {"auth": auth}}}))}})
                await store.create({
                    "apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": "ca", "namespace": NS},
                    "data": {"ca.crt": Path(tls.ca_cert).read_text()}})
                return [await cronpoll.gather(store, NS, {"url": url, "secretRef": s,
                                                          "certConfigMap": "ca"})
                        for s in ("keys", "pull")]

        keys, pull = asyncio.run(main())
        assert (keys.username, keys.password, keys.insecure) == ("alice", "s3cret", False)
        assert pull.docker_config is not None and pull.username is None
        assert cronpoll.poll_digest(keys) == digest
        assert cronpoll.poll_digest(pull) == digest
        with pytest.raises(cronpoll.PollError, match="unauthorized"):
            cronpoll.poll_digest(dataclasses.replace(keys, password="wrong"))
        with pytest.raises(cronpoll.PollError, match="certificate verification failed"):
            cronpoll.poll_digest(dataclasses.replace(keys, ca_pems=()))
    finally:
        reg.stop()
