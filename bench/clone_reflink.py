"""Snapshot and CSI clone times on the local-reflink class, for a small and a large source.

What it measures
    A real ``cdi serve`` with ``--reflink-root`` on an XFS (reflink) loop mount made
    for the run.  For each source size (default 1 GiB and 16 GiB, all of it data:
    written once, untimed), a DataVolume cloning it with the ``csi-clone`` strategy,
    then one with ``snapshot``; the time is from creating the DataVolume until it
    is Succeeded, as a user sees it (control plane included), median of ``--runs``.
    The bar: under 1 s and flat in size (the copy shares extents, no data moves).
    Free space on the filesystem before and after shows that no data was copied.

Run as root (loop mount): ``python bench/clone_reflink.py [--runs 3] [--quick]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.e2e.conftest import Server, phase
from tests.e2e.test_datavolume import volume_of
from tests.support import xfs

MiB, GiB = 1 << 20, 1 << 30


def _fill(path: Path, size: int) -> None:
    block = os.urandom(4 * MiB)
    with path.open("r+b" if path.exists() else "wb") as f:
        for _ in range(size // len(block)):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())


def _patch_profile(server: Server, strategy: str) -> None:
    r = server.session.patch(server.path("storageprofile", "local-reflink", ""), timeout=10,
                             json={"spec": {"cloneStrategy": strategy}},
                             headers={"Content-Type": "application/merge-patch+json"})
    r.raise_for_status()
    server.wait_for("storageprofile", "local-reflink",
                    lambda o: o["status"]["cloneStrategy"] == strategy, namespace="")


def _clone(server: Server, name: str, source: str, size: str) -> float:
    dv = {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
          "metadata": {"name": name},
          "spec": {"source": {"pvc": {"name": source, "namespace": "default"}},
                   "storage": {"storageClassName": "local-reflink", "volumeMode": "Block",
                               "resources": {"requests": {"storage": size}}}}}
    started = time.monotonic()
    r = server.create(dv)
    r.raise_for_status()
    server.wait_for("dv", name, lambda o: phase(o) == "Succeeded", timeout=120)
    return time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="64 MiB and 256 MiB sources")
    args = parser.parse_args()
    sizes = [64 * MiB, 256 * MiB] if args.quick else [1 * GiB, 16 * GiB]
    rows = []
    with tempfile.TemporaryDirectory(prefix="clone-reflink-", dir=".") as tmp:
        with xfs.xfs(Path(tmp), size=f"{(sum(sizes) // GiB) + 8}G") as mnt:
            server = Server(Path(tmp) / "serve", "--reflink-root", str(mnt)).start()
            try:
                for size in sizes:
                    gi = f"{size // MiB}Mi"
                    src = f"src-{size // MiB}"
                    claim = {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                             "metadata": {"name": src},
                             "spec": {"accessModes": ["ReadWriteOnce"], "volumeMode": "Block",
                                      "storageClassName": "local-reflink",
                                      "resources": {"requests": {"storage": gi}}}}
                    server.create(claim).raise_for_status()
                    server.wait_for("pvc", src,
                                    lambda o: o.get("status", {}).get("phase") == "Bound")
                    _fill(volume_of(server, src), size)
                    for strategy in ("csi-clone", "snapshot"):
                        _patch_profile(server, strategy)
                        free = xfs.free_bytes(mnt)
                        times = [_clone(server, f"{strategy}-{size // MiB}-{i}", src, gi)
                                 for i in range(args.runs)]
                        used = free - xfs.free_bytes(mnt)
                        rows.append((strategy, size, statistics.median(times), used))
            finally:
                server.session.close()
                server.stop()
    print(f"{'strategy':<10} {'source':>8} {'median s':>9} {'space used':>11}")
    for strategy, size, t, used in rows:
        print(f"{strategy:<10} {size // MiB:>6}Mi {t:>9.2f} {used / MiB:>9.1f}Mi")
    ok = all(t < 1.0 for _, _, t, _ in rows)
    by = {(s, z): t for s, z, t, _ in rows}
    flat = all(by[(s, sizes[-1])] < 2 * by[(s, sizes[0])] + 0.2 for s in ("csi-clone",
                                                                          "snapshot"))
    print(f"bar: under 1 s: {'PASS' if ok else 'FAIL'}; flat in size: "
          f"{'PASS' if flat else 'FAIL'}")
    return 0 if ok and flat else 1


if __name__ == "__main__":
    sys.exit(main())
