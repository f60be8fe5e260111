"""The provisioner and the pod runner, with real subprocesses and real volumes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from cdi.backends.embedded import SQLiteStore
from cdi.backends.embedded.podrunner import PodRunner
from cdi.backends.embedded.storage import (
    DEFAULT_CLASSES,
    SELECTED_NODE,
    Provisioner,
    Volumes,
    ensure_classes,
)

MiB = 1 << 20
SCRIPT = """
import json, os, sys
attempt_file = os.path.join(os.environ["IMPORTER_DATA_DIR"], "attempts")
n = int(open(attempt_file).read()) if os.path.exists(attempt_file) else 0
open(attempt_file, "w").write(str(n + 1))
open(os.environ["IMPORTER_TERMINATION_LOG"], "w").write("attempt %d" % n)
print("env", json.dumps({k: v for k, v in os.environ.items() if k.startswith(("IMPORTER", "X_"))}))
sys.exit(0 if n >= 2 else 7)
"""


def claim(name: str, *, sc: str = "local", block: bool = False) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": name, "namespace": "ns"},
            "spec": {"storageClassName": sc, "accessModes": ["ReadWriteOnce"],
                     "volumeMode": "Block" if block else "Filesystem",
                     "resources": {"requests": {"storage": "8Mi"}}}}


def pod(name: str, claim_name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "ns"},
            "spec": {"restartPolicy": "OnFailure",
                     "volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": claim_name}}],
                     "containers": [{"name": "c", "command": [sys.executable, "-c", SCRIPT],
                                     "env": [{"name": "X_HELLO", "value": "world"}],
                                     "volumeMounts": [{"name": "d", "mountPath": "/data"}]}]}}


async def _wait(store: SQLiteStore, kind: str, name: str, pred: Any, timeout: float = 20) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        obj = await store.get(kind, name, "ns")
        if pred(obj):
            return obj
        assert asyncio.get_running_loop().time() < deadline, obj
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def embedded(tmp_path: Path) -> AsyncIterator[tuple[SQLiteStore, Volumes]]:
    """A store with the default classes, and a running provisioner and pod runner."""
    async with SQLiteStore(tmp_path / "db") as store:
        await ensure_classes(store, DEFAULT_CLASSES)
        volumes = Volumes(tmp_path)
        tasks = [asyncio.create_task(Provisioner(store, volumes).run()),
                 asyncio.create_task(PodRunner(store, data_dir=tmp_path, volumes=volumes,
                                               backoff_base=0.05).run())]
        try:
            yield store, volumes
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def test_claims_bind_and_pods_restart_until_success(tmp_path: Path) -> None:
    async def main() -> None:
        async with embedded(tmp_path) as (store, volumes):
            await store.create(claim("fs"))
            await store.create(claim("blk", block=True))
            fs = await _wait(store, "PersistentVolumeClaim", "fs",
                             lambda o: o.get("status", {}).get("phase") == "Bound")
            blk = await _wait(store, "PersistentVolumeClaim", "blk",
                              lambda o: o.get("status", {}).get("phase") == "Bound")
            assert volumes.path(fs["spec"]["volumeName"], block=False).is_dir()
            raw = volumes.path(blk["spec"]["volumeName"], block=True)
            assert raw.stat().st_size == 8 * MiB
            pv = await store.get("PersistentVolume", fs["spec"]["volumeName"])
            assert pv["spec"]["claimRef"]["name"] == "fs"

            # WaitForFirstConsumer: pending until a pod uses it.
            await store.create(claim("late", sc="local-wffc"))
            await asyncio.sleep(0.3)
            late = await store.get("PersistentVolumeClaim", "late", "ns")
            assert late["status"]["phase"] == "Pending"
            await store.create(pod("worker", "late"))
            done = await _wait(store, "Pod", "worker",
                               lambda o: o.get("status", {}).get("phase") == "Succeeded")
            cs = done["status"]["containerStatuses"][0]
            assert cs["restartCount"] == 2
            assert cs["state"]["terminated"] == {**cs["state"]["terminated"],
                                                 "exitCode": 0, "reason": "Completed",
                                                 "message": "attempt 2"}
            late = await store.get("PersistentVolumeClaim", "late", "ns")
            assert late["metadata"]["annotations"][SELECTED_NODE] == "localhost"
            volume = volumes.path(late["spec"]["volumeName"], block=False)
            assert (volume / "attempts").read_text() == "3"
            log = (tmp_path / "pods" / "ns" / "worker" / "log").read_text()
            env = json.loads(log.strip().splitlines()[-1].removeprefix("env "))
            assert env["X_HELLO"] == "world"
            assert env["IMPORTER_DATA_DIR"] == str(volume)

            # Deleting the claim deletes its volume.
            await store.delete("PersistentVolumeClaim", "fs", "ns")
            await asyncio.sleep(0.3)
            assert not volumes.path(fs["spec"]["volumeName"], block=False).exists()

    asyncio.run(main())


LOCKING = """
import os, signal, sys, time
lock = os.path.join(os.environ["IMPORTER_DATA_DIR"], "lock")
try:
    fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
except FileExistsError:
    open(os.path.join(os.environ["IMPORTER_DATA_DIR"], "overlap"), "w").write("two workers")
    sys.exit(9)
os.write(fd, str(os.getpid()).encode())
def bye(*_):
    time.sleep(0.5)  # a slow shutdown, like a worker closing its connections
    os.unlink(lock)
    sys.exit(0)
signal.signal(signal.SIGTERM, bye)
time.sleep(60)
"""


def test_a_replaced_pod_never_overlaps_and_nothing_outlives_its_pod(tmp_path: Path) -> None:
    async def main() -> None:
        async with embedded(tmp_path) as (store, volumes):
            await store.create(claim("vol"))
            spec = pod("w", "vol")
            spec["spec"]["containers"][0]["command"] = [sys.executable, "-c", LOCKING]
            bound = await _wait(store, "PersistentVolumeClaim", "vol",
                                lambda o: o.get("status", {}).get("phase") == "Bound")
            volume = volumes.path(bound["spec"]["volumeName"], block=False)
            for _ in range(3):  # delete and recreate under the same name, quickly
                await store.create(spec)
                await _wait(store, "Pod", "w",
                            lambda o: o.get("status", {}).get("phase") == "Running")
                for _ in range(100):
                    if (volume / "lock").exists():
                        break
                    await asyncio.sleep(0.02)
                pid = int((volume / "lock").read_text())
                await store.delete("Pod", "w", "ns")
            await asyncio.sleep(1.5)
            assert not (volume / "overlap").exists()
            assert not Path(f"/proc/{pid}").exists(), "the last worker stopped with its pod"

    asyncio.run(main())


def test_missing_secret_waits_and_says_so(tmp_path: Path) -> None:
    async def main() -> None:
        async with embedded(tmp_path) as (store, _volumes):
            await store.create(claim("vol"))
            spec = pod("w", "vol")
            spec["spec"]["containers"][0]["env"].append(
                {"name": "X_SECRET", "valueFrom": {"secretKeyRef": {"name": "creds",
                                                                    "key": "k"}}})
            await store.create(spec)
            waiting = await _wait(store, "Pod", "w", lambda o: bool(
                o.get("status", {}).get("containerStatuses")))
            state = waiting["status"]["containerStatuses"][0]["state"]["waiting"]
            assert state == {"reason": "CreateContainerConfigError",
                             "message": 'secret "creds" not found'}
            await store.create({"apiVersion": "v1", "kind": "Secret",
                                "metadata": {"name": "creds", "namespace": "ns"},
                                "data": {"k": "aGlkZGVu"}})
            await _wait(store, "Pod", "w",
                        lambda o: o.get("status", {}).get("phase") == "Succeeded")
            log = (tmp_path / "pods" / "ns" / "w" / "log").read_text()
            env = json.loads(log.strip().splitlines()[-1].removeprefix("env "))
            assert env["X_SECRET"] == "hidden"

    asyncio.run(main())
