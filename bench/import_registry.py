"""Wall time and memory of a registry (containerdisk) import, against curl | tar.

What it measures
    The import worker (``python -m importer``, run as a subprocess with its
    environment contract: ``IMPORTER_SOURCE=registry``,
    ``IMPORTER_ENDPOINT=docker://127.0.0.1:PORT/bench/<repo>:<tag>``,
    ``IMPORTER_INSECURE_REGISTRY=true``, a filesystem target in
    ``IMPORTER_DATA_DIR`` and scratch space in ``IMPORTER_SCRATCH_DIR``) pulls
    a containerdisk from Debian's ``docker-registry`` (distribution 2.8, plain
    HTTP on 127.0.0.1, started by the benchmark with
    ``tests/support/registry.py``) and writes ``<data dir>/disk.img``; the
    worker fsyncs it before it exits.  Each case is run ``--runs`` times,
    alternating with its baseline, each run in a fresh directory; the medians
    of both sides and their ratio are reported.  For our runs it also records
    the worker's peak RSS (``VmHWM``: ``ru_maxrss`` from ``wait4``, exact; it
    also covers qemu-img, which the worker waits for), the summed RSS of the
    worker's process tree sampled every 50 ms (the worker and qemu-img run at
    once), and the space the image allocates (``st_blocks * 512``).  The first
    run of each case is checked with ``qemu-img compare`` against the source.

The images (published once; cached)
    The disks are bench/import_http.py's, in ``<workdir>/images`` (built here
    if missing, under the same lock): ``disk.raw`` (4 GiB virtual, 1 GiB of
    random data in 4 extents of 256 MiB) and ``disk.qcow2`` (the same,
    ``qemu-img convert -O qcow2``).  ``importer.containerdisk.publish`` packs
    them as containerdisks (``disk/<file>``, one layer) and pushes them to the
    registry, whose storage stays in ``<workdir>/registry/storage``: a later
    run republishes only when a disk changed (``published.json`` records the
    disk's size and mtime and the digests).

    raw       ``disk.raw``, gzip layer (the default): a tar of the whole 4 GiB
              (a tar member is not sparse: its holes are stored as zeros)
    raw-tar   ``disk.raw``, uncompressed layer (a 4 GiB blob)
    qcow2     ``disk.qcow2``, gzip layer; the worker streams it to scratch and
              converts it with qemu-img

Why the baselines are fair
    Each baseline fetches the same layer blob, ``GET /v2/<repo>/blobs/<digest>``,
    from the same registry with curl and extracts ``disk/`` with GNU tar into
    a directory on the same disk, then runs ``sync FILE DIR`` (fsync of the
    result and of its directory, as the worker does; a bare ``sync`` would
    also time the dirty pages of whatever else runs on the machine):

    raw       ``curl BLOB | tar -xzf - disk``
    raw-tar   ``curl BLOB | tar -xf - disk``
    qcow2     ``curl BLOB | tar -xzf - disk`` then ``qemu-img convert -f qcow2
              -O raw`` of the extracted file (scratch and target on the same disk)

    Both pipes are two processes (curl and tar, tar with its gzip child), built
    with argv lists.  The baseline gets no credit for the worker's extra work:
    Python start-up, the /v2/ ping, manifest and config, the sha256 of the
    blob, the zero detection, the resize to the volume size, the metrics
    endpoint.  It does write more: tar writes the 3 GiB of holes as zeros (its
    allocation is printed), the worker leaves them as holes.

    Nothing is dropped from the page cache: each run's blob file in the
    registry's storage is read (untimed) just before the run, so both sides
    read it from memory.

Bars: raw and raw-tar within 1.3x of their baseline (median wall time); peak
RSS (the worker's VmHWM and the sampled sum over its process tree) < 100 MiB;
the image allocates within 10 % of the 1 GiB of data (it stays sparse).  The
qcow2 time is reported without a bar.  A failed bar prints FAIL but the exit
status stays 0 (this is a measurement); a wrong import or a crashed run exits 1.

    python bench/import_registry.py [--workdir DIR] [--runs N] [--cases raw,raw-tar,qcow2]
                                    [--quick]

``--quick`` uses a 256 MiB disk with 64 MiB of data, in ``<workdir>/registry-quick``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import fcntl
import itertools
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from importer import containerdisk  # noqa: E402 - after the path is set
from tests.support.registry import Registry  # noqa: E402

DEFAULT_WORKDIR = REPO / ".bench"

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

PIECE = 4 * MiB
TIME_BAR = 1.3
RSS_LIMIT = 100 * MiB
SPARSE_TOLERANCE = 0.10
SAMPLE_INTERVAL = 0.05
PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy",
                   "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
_LOG_LINE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ ([\w.]+): "
    r"((PHASE|IMAGE|DISK|WROTE|RUN|COMPLETE)\b.*)$"
)


class BenchError(Exception):
    """A run that did not produce a correct import: the measurement is void."""


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The disk's geometry: full size, or --quick."""

    virtual: int
    extent: int
    offsets: tuple[int, ...]
    image_size: int  # IMPORTER_IMAGE_SIZE: the volume

    @property
    def data(self) -> int:
        return self.extent * len(self.offsets)


# As bench/import_http.py: holes at the start, between the extents and at the end.
FULL = Sizes(4 * GiB, 256 * MiB, (64 * MiB, 1152 * MiB, 2304 * MiB, 3456 * MiB), 5 * GiB)
QUICK = Sizes(256 * MiB, 16 * MiB, (4 * MiB, 72 * MiB, 144 * MiB, 216 * MiB), 320 * MiB)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    disk: str  # file in the images directory
    compression: str  # of the layer
    bar: float | None  # highest acceptable ratio ours/baseline; None: reported only

    @property
    def repository(self) -> str:
        return f"bench/disk-{Path(self.disk).suffix.lstrip('.')}"

    @property
    def tag(self) -> str:
        return self.compression


CASES: dict[str, Case] = {
    c.name: c
    for c in (
        Case("raw", "disk.raw", "gzip", TIME_BAR),
        Case("raw-tar", "disk.raw", "none", TIME_BAR),
        Case("qcow2", "disk.qcow2", "gzip", None),
    )
}


# --- the disks ------------------------------------------------------------------------------


def _write_sparse_raw(path: Path, sizes: Sizes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for offset in sizes.offsets:
            for pos in range(offset, offset + sizes.extent, PIECE):
                piece = os.urandom(min(PIECE, offset + sizes.extent - pos))
                while pos == 0 and piece[:2] in (b"\x1f\x8b", b"QF"):  # must be seen as raw
                    piece = os.urandom(len(piece))
                view = memoryview(piece)
                while view:
                    n = os.pwrite(fd, view, pos)
                    view, pos = view[n:], pos + n
        os.ftruncate(fd, sizes.virtual)
    finally:
        os.close(fd)


def _run_checked(argv: list[str]) -> None:
    p = subprocess.run(argv, capture_output=True, check=False)
    if p.returncode != 0:
        raise BenchError(f"{argv[0]} exited {p.returncode}: "
                         f"{p.stderr.decode(errors='replace')[-500:]}")


def build_disks(images: Path, sizes: Sizes) -> float:
    """disk.raw and disk.qcow2, built if missing (atomically, under import_http.py's lock)."""
    images.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    built = False
    with open(images / ".build.lock", "wb") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        raw, qcow2 = images / "disk.raw", images / "disk.qcow2"
        if not raw.exists():
            qcow2.unlink(missing_ok=True)  # made from another disk.raw
            print(f"building {raw} ({sizes.virtual // MiB} MiB virtual, "
                  f"{sizes.data // MiB} MiB random data)", flush=True)
            tmp = raw.with_name(raw.name + ".tmp")
            _write_sparse_raw(tmp, sizes)
            tmp.rename(raw)
            built = True
        if not qcow2.exists():
            print(f"building {qcow2}", flush=True)
            tmp = qcow2.with_name(qcow2.name + ".tmp")
            _run_checked(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(tmp)])
            tmp.rename(qcow2)
            built = True
    return time.perf_counter() - started if built else 0.0


# --- the registry and what is published in it ----------------------------------------------


@dataclasses.dataclass(frozen=True)
class Published:
    case: str
    manifest: str
    layer: str  # digest of the layer blob
    layer_size: int


def _session() -> requests.Session:
    s = requests.Session()
    s.trust_env = False  # 127.0.0.1: no proxy
    return s


def _layer_of(registry: Registry, case: Case, manifest: str) -> tuple[str, int] | None:
    """The layer of CASE's manifest in the registry, or None if the registry lacks it."""
    with _session() as s:
        r = s.get(f"http://{registry.host}/v2/{case.repository}/manifests/{manifest}",
                  headers={"Accept": OCI_MANIFEST}, timeout=30, verify=True)
        if r.status_code != 200:
            return None
        layers = r.json()["layers"]
        digest, size = str(layers[0]["digest"]), int(layers[0]["size"])
        head = s.head(f"http://{registry.host}/v2/{case.repository}/blobs/{digest}",
                      timeout=30, verify=True)
        return (digest, size) if head.status_code == 200 else None


def publish(registry: Registry, cases: list[Case], images: Path,
            say: Callable[[str], None]) -> tuple[dict[str, Published], float]:
    """Push each case's containerdisk unless the registry already has it for this disk."""
    stamps_file = registry.root / "published.json"
    stamps: dict[str, Any] = json.loads(stamps_file.read_text()) if stamps_file.exists() else {}
    out: dict[str, Published] = {}
    started = time.perf_counter()
    pushed = False
    for case in cases:
        st = (images / case.disk).stat()
        source = [st.st_size, st.st_mtime_ns]
        stamp = stamps.get(case.name)
        if stamp is not None and stamp["source"] == source:
            found = _layer_of(registry, case, stamp["manifest"])
            if found is not None and found[0] == stamp["layer"]:
                out[case.name] = Published(case.name, stamp["manifest"], found[0], found[1])
                continue
        say(f"publishing {case.disk} as {case.repository}:{case.tag} "
            f"({case.compression} layer)")
        t0 = time.perf_counter()
        manifest = containerdisk.publish(images / case.disk,
                                         registry.ref(case.repository, case.tag),
                                         compression=case.compression, insecure=True)
        found = _layer_of(registry, case, manifest)
        if found is None:
            raise BenchError(f"{case.repository}:{case.tag} not in the registry after the push")
        out[case.name] = Published(case.name, manifest, found[0], found[1])
        say(f"  pushed in {time.perf_counter() - t0:.0f} s: layer {found[0]} "
            f"({found[1] / MiB:.0f} MiB)")
        stamps[case.name] = {"source": source, "manifest": manifest, "layer": found[0]}
        stamps_file.write_text(json.dumps(stamps, indent=1))
        pushed = True
    return out, time.perf_counter() - started if pushed else 0.0


@contextmanager
def serving(root: Path) -> Iterator[Registry]:
    registry = Registry(root)
    registry.log.unlink(missing_ok=True)  # one run's log, not every run's
    registry.start()
    try:
        yield registry
    finally:
        registry.stop()


def prewarm(path: Path) -> None:
    """Read a file so the next run finds it in the page cache (untimed)."""
    buf = bytearray(PIECE)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


# --- peak RSS --------------------------------------------------------------------------------


def _tree(root: int) -> list[int]:
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        try:
            tasks = list(Path(f"/proc/{pid}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return pids


def _vmrss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1]) * KiB
    except (OSError, ValueError):
        pass
    return 0


class TreeRSS(threading.Thread):
    """The summed RSS of a process tree every 50 ms; keeps the maximum."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = 0
        self.peak_processes = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            pids = _tree(self.pid)
            total = sum(_vmrss(p) for p in pids)
            if total > self.peak:
                self.peak, self.peak_processes = total, len(pids)
            self._stop_event.wait(SAMPLE_INTERVAL)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


# --- one run of each side --------------------------------------------------------------------


def child_env() -> dict[str, str]:
    """Our environment without proxy settings: every byte goes to 127.0.0.1 directly."""
    return {k: v for k, v in os.environ.items() if k not in PROXY_VARIABLES}


@dataclasses.dataclass
class OursRun:
    seconds: float
    vmhwm: int  # the worker's ru_maxrss (the largest of it and the children it reaped)
    tree_peak: int  # sampled sum over the tree
    tree_processes: int
    cpu: float  # user + system of the worker and its children
    allocated: int
    size: int
    log: str
    started_epoch: float


def run_ours(endpoint: str, rundir: Path, sizes: Sizes) -> OursRun:
    data, scratch = rundir / "data", rundir / "scratch"
    data.mkdir(parents=True)
    scratch.mkdir()
    termination = rundir / "termination-log"
    env = child_env() | {
        "IMPORTER_SOURCE": "registry",
        "IMPORTER_ENDPOINT": endpoint,
        "IMPORTER_INSECURE_REGISTRY": "true",
        "IMPORTER_DATA_DIR": str(data),
        "IMPORTER_IMAGE_SIZE": str(sizes.image_size),
        "IMPORTER_SCRATCH_DIR": str(scratch),
        "IMPORTER_BLOCK_PATH": str(rundir / "no-block-device"),
        "IMPORTER_TERMINATION_LOG": str(termination),
        "IMPORTER_METRICS_ADDRESS": "127.0.0.1:0",
    }
    log_path = rundir / "importer.log"
    with open(log_path, "wb") as log:
        epoch = time.time()
        started = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "importer"], cwd=REPO, env=env,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        monitor = TreeRSS(proc.pid)
        monitor.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
            seconds = time.perf_counter() - started
            proc.returncode = rc = os.waitstatus_to_exitcode(status)
        finally:
            if proc.returncode is None:  # interrupted: SIGTERM lets it stop qemu-img
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            monitor.stop()
    text = log_path.read_text(errors="replace")
    if rc != 0:
        raise BenchError(f"importer exited {rc} for {endpoint}:\n{text[-2000:]}")
    message = termination.read_text() if termination.exists() else ""
    try:
        ok = json.loads(message).get("message") == "Import Complete"
    except ValueError:
        ok = False
    if not ok:
        raise BenchError(f"importer did not complete for {endpoint}: {message!r}\n"
                         f"{text[-2000:]}")
    st = (data / "disk.img").stat()
    return OursRun(seconds, usage.ru_maxrss * KiB, monitor.peak, monitor.peak_processes,
                   usage.ru_utime + usage.ru_stime, st.st_blocks * 512, st.st_size, text, epoch)


def _pipeline(first: list[str], second: list[str]) -> None:
    """FIRST | SECOND."""
    p1 = subprocess.Popen(first, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                          env=child_env())
    try:
        assert p1.stdout is not None
        p2 = subprocess.Popen(second, stdin=p1.stdout)
        p1.stdout.close()  # p2 holds the read end; p1 gets SIGPIPE if p2 dies
        rc2 = p2.wait()
        rc1 = p1.wait()
    finally:
        if p1.poll() is None:
            p1.kill()
            p1.wait()
    if rc1 != 0 or rc2 != 0:
        raise BenchError(f"baseline {first[0]} | {second[0]} exited {rc1}/{rc2}")


@dataclasses.dataclass
class BaselineRun:
    seconds: float
    allocated: int


def run_baseline(case: Case, blob_url: str, rundir: Path, sizes: Sizes) -> BaselineRun:
    rundir.mkdir(parents=True)
    extract = rundir / "extract"
    extract.mkdir()
    curl = ["curl", "-s", "-f", "--noproxy", "*", blob_url]
    tar = ["tar", "-xzf" if case.compression == "gzip" else "-xf", "-", "-C", str(extract),
           "disk"]
    extracted = extract / "disk" / case.disk
    started = time.perf_counter()
    _pipeline(curl, tar)
    if case.disk.endswith(".qcow2"):
        out = rundir / "disk.img"
        _run_checked(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(extracted),
                      str(out)])
    else:
        out = extracted
    _run_checked(["sync", str(out), str(out.parent)])
    seconds = time.perf_counter() - started
    st = out.stat()
    if st.st_size != sizes.virtual:
        raise BenchError(f"baseline {case.name} wrote {st.st_size} bytes, "
                         f"expected {sizes.virtual}")
    return BaselineRun(seconds, st.st_blocks * 512)


def compare(reference: Path, imported: Path) -> None:
    p = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(reference),
                        str(imported)], capture_output=True, check=False)
    if p.returncode != 0:
        detail = (p.stdout + p.stderr).decode(errors="replace").strip()
        raise BenchError(f"CONTENT MISMATCH: {imported} differs from {reference} "
                         f"(qemu-img compare exited {p.returncode}): {detail}")


def _rmtree(path: Path) -> None:
    """Remove a run directory (tar restores disk/ as mode 0555)."""
    if path.exists():
        for d in path.rglob("*"):
            if d.is_dir() and not d.is_symlink():
                d.chmod(0o755)
    shutil.rmtree(path, ignore_errors=True)


def phase_breakdown(run: OursRun) -> str:
    """From the worker's log: start-up, each PHASE, and the exit, in seconds."""
    events: list[tuple[float, str]] = []
    for line in run.log.splitlines():
        m = _LOG_LINE.match(line)
        if m and (m.group(4) != "PHASE" or m.group(2) == "importer.processor"):
            ts = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            events.append((ts - run.started_epoch, m.group(3)))
    if not events:
        return "(no log lines)"
    parts = [f"start-up {events[0][0]:.2f}s"]
    marks = [(t, msg) for t, msg in events if msg.startswith(("PHASE", "COMPLETE"))]
    for (t, msg), (t_next, _) in itertools.pairwise(marks):
        parts.append(f"{msg.split()[1]} {t_next - t:.2f}s")
    if marks:
        parts.append(f"exit {run.seconds - marks[-1][0]:.2f}s")
    return " | ".join(parts) + f" | cpu {run.cpu:.1f}s"


# --- the report ------------------------------------------------------------------------------


@dataclasses.dataclass
class CaseResult:
    case: Case
    published: Published
    sizes: Sizes
    ours: list[OursRun]
    baseline: list[BaselineRun]

    @property
    def ours_median(self) -> float:
        return statistics.median(r.seconds for r in self.ours)

    @property
    def baseline_median(self) -> float:
        return statistics.median(r.seconds for r in self.baseline)

    @property
    def ratio(self) -> float:
        return self.ours_median / self.baseline_median

    @property
    def vmhwm(self) -> int:
        return max(r.vmhwm for r in self.ours)

    @property
    def tree_peak(self) -> int:
        return max(r.tree_peak for r in self.ours)

    @property
    def allocated(self) -> int:
        return max(r.allocated for r in self.ours)

    @property
    def median_run(self) -> OursRun:
        return sorted(self.ours, key=lambda r: r.seconds)[(len(self.ours) - 1) // 2]

    def time_ok(self) -> bool | None:
        return None if self.case.bar is None else self.ratio <= self.case.bar

    def rss_ok(self) -> bool:
        return max(self.vmhwm, self.tree_peak) < RSS_LIMIT

    def alloc_ok(self) -> bool:
        return abs(self.allocated - self.sizes.data) <= SPARSE_TOLERANCE * self.sizes.data

    def failures(self) -> list[str]:
        return [name for name, ok in (("time", self.time_ok()), ("rss", self.rss_ok()),
                                      ("alloc", self.alloc_ok())) if ok is False]

    def row(self) -> list[str]:
        def verdict(ok: bool | None) -> str:
            return "-" if ok is None else "PASS" if ok else "FAIL"
        bar = f"<= {self.case.bar:.1f}" if self.case.bar is not None else "none"
        return [
            f"{self.case.name} ({self.case.compression} layer)",
            f"{self.published.layer_size / MiB:.0f}",
            f"{self.ours_median:.2f}",
            f"{self.baseline_median:.2f}",
            f"{self.ratio:.2f}",
            f"{bar} {verdict(self.time_ok())}",
            f"{self.vmhwm / MiB:.1f}",
            f"{self.tree_peak / MiB:.1f}",
            verdict(self.rss_ok()),
            f"{self.allocated / MiB:.0f} {verdict(self.alloc_ok())}",
            f"{max(r.allocated for r in self.baseline) / MiB:.0f}",
        ]


HEADER = ["case", "layer MiB", "ours s", "baseline s", "ratio ours/baseline", "time bar",
          "peak RSS MiB (VmHWM)", "tree RSS MiB (sum)", "RSS < 100 MiB", "allocated MiB",
          "baseline allocated MiB"]


def text_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [HEADER, *rows]) for i in range(len(HEADER))]

    def fmt(r: list[str]) -> str:
        return " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True))

    return "\n".join([fmt(HEADER), "-+-".join("-" * w for w in widths), *map(fmt, rows)])


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def notes(sizes: Sizes) -> str:
    return (
        f"Disk: {sizes.virtual // MiB} MiB virtual, {sizes.data // MiB} MiB of random data; "
        f"volume {sizes.image_size // MiB} MiB. Times are medians of the runs; ours and the "
        "baseline alternate in the same run, so the ratio holds even if the machine is busy. "
        "Every run ends with an fsync of its result inside the timed region; each run's blob "
        "was read (untimed) just before it. Bars: raw cases <= 1.3x the baseline; VmHWM and "
        "the sampled tree sum < 100 MiB; the image allocates within 10% of the data."
    )


# --- main ------------------------------------------------------------------------------------


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(f"terminated by signal {signum}")


@contextmanager
def exclusive(path: Path, say: Callable[[str], None]) -> Iterator[None]:
    """One measurement at a time per work directory (the lock bench/import_http.py takes)."""
    with open(path, "wb") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for another benchmark holding {path} to finish")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def measure_case(case: Case, pub: Published, registry: Registry, images: Path, sizes: Sizes,
                 runs_dir: Path, runs: int, say: Callable[[str], None]) -> CaseResult:
    result = CaseResult(case, pub, sizes, [], [])
    blob_file = registry.blob_path(pub.layer)
    endpoint = f"docker://{registry.ref(case.repository, case.tag)}"
    blob_url = f"http://{registry.host}/v2/{case.repository}/blobs/{pub.layer}"
    for i in range(runs):
        rundir = runs_dir / f"{case.name}-ours-{i}"
        _rmtree(rundir)
        prewarm(blob_file)
        try:
            run = run_ours(endpoint, rundir, sizes)
            if i == 0:
                compare(images / "disk.raw", rundir / "data" / "disk.img")
        finally:
            _rmtree(rundir)
        result.ours.append(run)
        say(f"  {case.name} run {i + 1}/{runs} ours     {run.seconds:7.2f} s  "
            f"VmHWM {run.vmhwm / MiB:6.1f} MiB  tree {run.tree_peak / MiB:6.1f} MiB "
            f"({run.tree_processes} processes)  cpu {run.cpu:5.1f} s  "
            f"allocated {run.allocated / MiB:.0f} MiB" + ("  content OK" if i == 0 else ""))
        rundir = runs_dir / f"{case.name}-baseline-{i}"
        _rmtree(rundir)
        prewarm(blob_file)
        try:
            base = run_baseline(case, blob_url, rundir, sizes)
        finally:
            _rmtree(rundir)
        result.baseline.append(base)
        say(f"  {case.name} run {i + 1}/{runs} baseline {base.seconds:7.2f} s  "
            f"allocated {base.allocated / MiB:.0f} MiB")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                        help="disks, registry storage, run directories, results (default .bench/)")
    parser.add_argument("--runs", type=int, default=3, help="runs per side and case (default 3)")
    parser.add_argument("--cases", default=",".join(CASES),
                        help=f"comma-separated subset of {','.join(CASES)}")
    parser.add_argument("--quick", action="store_true",
                        help="a 256 MiB disk with 64 MiB of data (a smoke test)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown or not names or args.runs < 1:
        parser.error(f"unknown cases {unknown}" if unknown else "nothing to run")
    for tool in ("curl", "tar", "gzip", "qemu-img", "sync", "docker-registry"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed")
    signal.signal(signal.SIGTERM, _terminate)

    sizes = QUICK if args.quick else FULL
    workdir: Path = args.workdir.resolve()
    base = workdir / "registry-quick" if args.quick else workdir
    images = base / "images"
    registry_root = base / "registry"
    suffix = "-quick" if args.quick else ""
    workdir.mkdir(parents=True, exist_ok=True)
    runs_dir = Path(tempfile.mkdtemp(prefix="registry-runs-", dir=workdir))
    cases = [CASES[n] for n in names]

    def say(line: str) -> None:
        print(line, flush=True)

    run_seconds = publish_seconds = 0.0
    results: list[CaseResult] = []
    try:
        build_seconds = build_disks(images, sizes)
        built = f"built in {build_seconds:.0f} s" if build_seconds else "cached"
        say(f"disks: {images} ({built})")
        say("peak RSS: the worker's VmHWM from wait4, and its process tree's summed VmRSS "
            f"every {SAMPLE_INTERVAL * 1000:.0f} ms")
        with exclusive(workdir / ".measure.lock", say), serving(registry_root) as registry:
            say(f"docker-registry: http://{registry.host}, storage {registry.storage}")
            published, publish_seconds = publish(registry, cases, images, say)
            pushed = f"pushed in {publish_seconds:.0f} s" if publish_seconds else "cached"
            say(f"images: {pushed}")
            started = time.perf_counter()
            for case in cases:
                say(f"case {case.name} ({case.repository}:{case.tag}, layer "
                    f"{published[case.name].layer_size / MiB:.0f} MiB):")
                results.append(measure_case(case, published[case.name], registry, images, sizes,
                                            runs_dir, args.runs, say))
            run_seconds = time.perf_counter() - started
    except BenchError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        _rmtree(runs_dir)

    rows = [r.row() for r in results]
    failed = [f"{r.case.name} ({', '.join(r.failures())})" for r in results if r.failures()]
    verdict = f"FAIL: {'; '.join(failed)}" if failed else "PASS: every bar met"
    per_run = "\n".join(
        f"  {r.case.name}: ours {' '.join(f'{o.seconds:.2f}' for o in r.ours)}; "
        f"baseline {' '.join(f'{b.seconds:.2f}' for b in r.baseline)}" for r in results)
    phases = "\n".join(f"  {r.case.name}: {phase_breakdown(r.median_run)}" for r in results)
    say("")
    say(text_table(rows))
    say("")
    say(notes(sizes))
    say(f"build {build_seconds:.0f} s, publish {publish_seconds:.0f} s, measurement "
        f"{run_seconds:.0f} s, {args.runs} runs per side; {os.cpu_count()} CPUs, load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    say("wall times per run (s):\n" + per_run)
    say("our median run, from the worker's log:\n" + phases)
    say("")
    say(verdict)
    out = workdir / f"registry-results{suffix}.md"
    out.write_text(
        f"# Registry import benchmark\n\n"
        f"{datetime.datetime.now().isoformat(timespec='seconds')}, {args.runs} runs per side, "
        f"median wall time\n\n{markdown_table(rows)}\n\n{notes(sizes)}\n\n**{verdict}**\n\n"
        f"## Wall times per run (s)\n\n```\n{per_run}\n```\n\n"
        f"## Our median run, from the worker's log\n\n```\n{phases}\n```\n"
    )
    say(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
