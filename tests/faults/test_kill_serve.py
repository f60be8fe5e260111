"""``kill -9`` of ``cdi serve`` at random points while imports and clones run.

A real ``cdi serve`` takes six DataVolumes at once: HTTP imports of a raw, a
qcow2 (converted through scratch space) and a gzip-compressed raw image, a
blank disk, and a host-assisted clone of each of two of the imports; the
HTTP server stalls the large downloads for a moment so the kills land in
the middle of work.  Then, ``ROUNDS`` times, after a random pause (seeded, so
a failure replays), ``cdi serve`` is killed with SIGKILL and started again on
the same data dir.  Afterwards every DataVolume must be Succeeded with
content equal to its source, no worker may be left running, and the volumes
directory must hold exactly the volumes of the claims that exist (no
scratch, temp or orphaned volume).  The counts are printed for
``docs/reliability.md``.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from importer import qemu_img
from tests.e2e.conftest import Server, phase
from tests.e2e.test_datavolume import _workers_of, http_dv, volume_of
from tests.support import images
from tests.support.httpserver import FileServer

MiB = 1 << 20
ROUNDS = 4
SEED = int(os.environ.get("CDI_FAULT_SEED", "20261122"))


def _clone_dv(name: str, source: str) -> dict[str, Any]:
    return {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"source": {"pvc": {"namespace": "default", "name": source}},
                     "storage": {"resources": {"requests": {"storage": "200Mi"}}}}}


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Server]:
    s = Server(tmp_path / "serve").start()
    try:
        yield s
    finally:
        s.session.close()
        s.stop(signal.SIGKILL)


def test_kill_9_at_random_points(serve: Server, http_server: FileServer) -> None:
    rng = random.Random(SEED)
    www = http_server.root
    raw = images.make_raw(www / "big.raw", virtual_size=160 * MiB,
                          extents=[(0, 24 * MiB), (100 * MiB, 24 * MiB)])
    images.convert(raw, www / "big.qcow2", "qcow2")
    images.compress(raw, "gz")
    for name in ("big.raw", "big.qcow2", "big.raw.gz"):
        http_server.configure(name, stall_after=8 * MiB, stall_seconds=1)
    sources = {"raw": raw, "qcow2": raw, "gz": raw}
    dvs = [http_dv("raw", http_server.url("big.raw"), size="200Mi"),
           http_dv("qcow2", http_server.url("big.qcow2"), size="200Mi"),
           http_dv("gz", http_server.url("big.raw.gz"), size="200Mi"),
           {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
            "metadata": {"name": "blank", "namespace": "default"},
            "spec": {"source": {"blank": {}},
                     "storage": {"resources": {"requests": {"storage": "64Mi"}}}}},
           _clone_dv("raw-clone", "raw"), _clone_dv("qcow2-clone", "qcow2")]
    for dv in dvs:
        assert serve.create(dv).status_code == 201

    injected = survived = 0
    for _ in range(ROUNDS):
        time.sleep(rng.uniform(0.3, 2.5))
        serve.stop(signal.SIGKILL)
        injected += 1
        deadline = time.monotonic() + 15
        while _workers_of(serve.data_dir) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _workers_of(serve.data_dir) == [], "a worker outlived its cdi serve"
        serve.start()
        survived += 1

    mismatches = restarts = 0
    for dv in dvs:
        name = dv["metadata"]["name"]
        done = serve.wait_for("dv", name, lambda o: phase(o) == "Succeeded", timeout=240)
        restarts += int(done["status"].get("restartCount", 0))
        source = sources.get(name.removesuffix("-clone"))
        if source is not None and not qemu_img.compare(str(source), str(volume_of(serve, name))):
            mismatches += 1
    blank = volume_of(serve, "blank")
    assert images.allocated_bytes(blank) <= MiB and blank.stat().st_size >= 64 * MiB
    assert not blank.read_bytes().strip(b"\0"), "the blank disk holds data"

    # Nothing left behind: no worker, no volume without its claim.
    deadline = time.monotonic() + 15
    while _workers_of(serve.data_dir) and time.monotonic() < deadline:
        time.sleep(0.1)
    claims = serve.session.get(serve.path("pvc"), timeout=10).json()["items"]
    wanted = {c["spec"]["volumeName"] for c in claims}
    present = {p.name.removesuffix(".img") for p in (serve.data_dir / "volumes").iterdir()}
    leaks = len(present - wanted) + len(_workers_of(serve.data_dir))
    print(f"\nseed {SEED}: faults injected {injected}, survived {survived}, DataVolumes "
          f"{len(dvs)} (workers restarted {restarts} times), data mismatches {mismatches}, "
          f"leaks {leaks}")
    assert (survived, mismatches, leaks) == (injected, 0, 0), present - wanted
    assert len(claims) == len(dvs)
