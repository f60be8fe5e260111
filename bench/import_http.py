"""Wall time and memory of an HTTP import, against the plain tools doing the same job.

What it measures
    The import worker (``python -m importer``, run as a subprocess with its
    environment contract) fetches five kinds of image from a local nginx and
    writes ``<data dir>/disk.img``.  For each case it is run ``--runs`` times,
    alternating with a baseline built from standard tools, each run on a fresh
    target directory; the median wall time of each side is reported, with the
    ratio ours/baseline.  For our runs it also records the peak RSS of the whole
    process tree (the importer plus qemu-img, nbdkit, prlimit...; summed over the
    tree at each 50 ms sample) and the space the target file allocates
    (``st_blocks * 512``), and it checks once per case, with ``qemu-img compare``,
    that the imported disk holds exactly the source's content.

The images (built once, cached in the work directory)
    ``disk.raw``     4 GiB virtual, 1 GiB of random data in 4 extents of 256 MiB
    ``disk.qcow2``   the same, ``qemu-img convert -O qcow2``
    ``disk.raw.gz``  the same, ``gzip -c`` (default level)
    ``disk.raw.xz``  the same, ``xz -c -T1`` (default level, one thread, one block)
    ``random.raw``   1 GiB, all random (nothing to skip, nothing to compress)

Why the baselines are fair
    Each baseline is the shortest pipeline of standard tools that produces the
    same bytes on disk, and, like the importer, it ends with an ``fsync`` of
    the output file and of its directory inside the timed region (the importer
    fsyncs before it exits, so a baseline that stopped at the last ``write``
    would be timing the page cache, not the disk):

    raw      ``curl URL | cp --sparse=always /dev/stdin OUT``  (sparse, like ours)
    raw.gz   the same pipeline on the *uncompressed* file: decompression must
             cost us nothing compared with fetching the raw image
    random   ``curl -o OUT URL``
    qcow2    ``curl -o scratch.qcow2 URL`` then ``qemu-img convert -f qcow2 -O raw``
             (download-then-convert: what one does without nbdkit)
    raw.xz   ``curl URL | xz -dc > OUT``  (xz decompresses single-threaded, as we must)

    The baselines get no credit for the importer's extra work (TLS set-up,
    metrics endpoint, format detection, the final resize to the volume size,
    Python start-up): that overhead is part of what is measured.

    Nothing is dropped from the page cache: each run's source file is read
    (untimed) just before the run, so every run, ours and baseline alike, reads
    it from memory, and the timing is of the transfer and the write, not of the
    source disk.  (On a VM whose kernel pages out cold memory with DAMON the
    script says so: a file can lose part of its cache within seconds, which
    this read-ahead of every run limits.)  The first run of a case is often
    slower than the others; the median of three discards it.  nginx serves
    over 127.0.0.1 with ``sendfile``.

Bars: time ratio <= 1.0 (raw, raw.gz, random, qcow2) and <= 1.2 (raw.xz);
peak RSS < 100 MiB; for the sparse images, allocation within 10 % of the
1024 MiB of source data.  A failed bar prints FAIL but the exit status stays 0
(this is a measurement); a wrong import content or a crashed run exits 1.

    python bench/import_http.py [--workdir DIR] [--runs N] [--cases raw,raw.gz,...]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import fcntl
import getpass
import importlib
import itertools
import json
import os
import re
import shutil
import signal
import socket
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

REPO = Path(__file__).resolve().parent.parent
DEFAULT_WORKDIR = REPO / ".bench"

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

VIRTUAL_SIZE = 4 * GiB
EXTENT_SIZE = 256 * MiB
# Spread over the image: a hole at the start, between extents, and at the end.
EXTENT_OFFSETS = (64 * MiB, 1152 * MiB, 2304 * MiB, 3456 * MiB)
SOURCE_DATA = EXTENT_SIZE * len(EXTENT_OFFSETS)  # 1 GiB
PIECE = 4 * MiB
RANDOM_SIZE = 1 * GiB
IMAGE_SIZE = 5 * GiB  # IMPORTER_IMAGE_SIZE: the volume
RSS_LIMIT = 100 * MiB
SPARSE_TOLERANCE = 0.10
SAMPLE_INTERVAL = 0.05

PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy",
                   "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")
# Magic bytes the importer recognises; a random file must not start with one.
_MAGIC: tuple[tuple[int, bytes], ...] = (
    (0, b"\x1f\x8b"), (0, b"\x28\xb5\x2f\xfd"), (0, b"\xfd7zXZ\x00"), (0, b"BZh"),
    (0, b"QFI\xfb"), (0, b"KDMV"), (0x40, b"\x7f\x10\xda\xbe"), (0, b"conectix"),
    (0, b"vhdxfile"),
)
_LOG_LINE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ ([\w.]+): "
    r"((PHASE|SOURCE|NBDKIT|RUN|WROTE|COMPLETE)\b.*)$"
)


class BenchError(Exception):
    """A run that did not produce a correct import: the measurement is void."""


# --- the cases ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    served: str  # the file the importer fetches
    reference: str  # the raw image its content must equal
    bar: float  # the highest acceptable ratio ours/baseline
    sparse: bool  # allocation must track SOURCE_DATA
    baseline: str  # which baseline (see run_baseline)
    baseline_file: str  # the file the baseline fetches


CASES: dict[str, Case] = {
    c.name: c
    for c in (
        Case("raw", "disk.raw", "disk.raw", 1.0, True, "sparse-copy", "disk.raw"),
        Case("raw.gz", "disk.raw.gz", "disk.raw", 1.0, True, "sparse-copy", "disk.raw"),
        Case("random", "random.raw", "random.raw", 1.0, False, "download", "random.raw"),
        Case("qcow2", "disk.qcow2", "disk.raw", 1.0, True, "download-convert", "disk.qcow2"),
        Case("raw.xz", "disk.raw.xz", "disk.raw", 1.2, True, "xz-pipe", "disk.raw.xz"),
    )
}


# --- building the images ------------------------------------------------------------


def _looks_like_image(head: bytes) -> bool:
    return any(head[off : off + len(magic)] == magic for off, magic in _MAGIC)


def _random_piece(first: bool) -> bytes:
    piece = os.urandom(PIECE)
    while first and _looks_like_image(piece[:512]):  # raw must be detected as raw
        piece = os.urandom(PIECE)
    return piece


def _write_sparse_raw(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for offset in EXTENT_OFFSETS:
            for pos in range(offset, offset + EXTENT_SIZE, PIECE):
                view = memoryview(_random_piece(pos == 0))
                while view:
                    n = os.pwrite(fd, view, pos)
                    view, pos = view[n:], pos + n
        os.ftruncate(fd, VIRTUAL_SIZE)
    finally:
        os.close(fd)


def _write_random_raw(path: Path) -> None:
    with open(path, "wb") as f:
        for pos in range(0, RANDOM_SIZE, PIECE):
            f.write(_random_piece(pos == 0))


def _run_checked(argv: list[str], *, stdout: Path | None = None) -> None:
    if stdout is None:
        p = subprocess.run(argv, capture_output=True, check=False)
    else:
        with open(stdout, "wb") as out:
            p = subprocess.run(argv, stdout=out, stderr=subprocess.PIPE, check=False)
    if p.returncode != 0:
        raise BenchError(f"{' '.join(argv)} exited {p.returncode}: "
                         f"{p.stderr.decode(errors='replace')[-500:]}")


def build_images(images: Path) -> float:
    """Build whatever is missing; returns seconds spent (0.0 if all were cached).

    Files appear atomically (.tmp then rename), and a lock keeps two benchmarks
    sharing a work directory from building the same file at once.
    """
    images.mkdir(parents=True, exist_ok=True)
    with open(images / ".build.lock", "wb") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _build_images(images)


def _build_images(images: Path) -> float:
    started = time.perf_counter()
    raw = images / "disk.raw"
    derived = [images / n for n in ("disk.qcow2", "disk.raw.gz", "disk.raw.xz")]
    built = False
    if not raw.exists():
        for d in derived:  # made from another disk.raw: stale
            d.unlink(missing_ok=True)
        print(f"building {raw} (4 GiB virtual, 1 GiB random data)", flush=True)
        tmp = raw.with_name(raw.name + ".tmp")
        _write_sparse_raw(tmp)
        tmp.rename(raw)
        built = True

    xz = images / "disk.raw.xz"
    xz_tmp = xz.with_name(xz.name + ".tmp")
    xz_proc: subprocess.Popen[bytes] | None = None
    try:
        if not xz.exists():
            # The slowest step (minutes) runs on one core while the rest use the other.
            print(f"building {xz} in the background (xz -T1, a few minutes)", flush=True)
            with open(xz_tmp, "wb") as out:
                xz_proc = subprocess.Popen(["xz", "-c", "-T1", str(raw)], stdout=out,
                                           stderr=subprocess.PIPE)
            built = True
        qcow2 = images / "disk.qcow2"
        if not qcow2.exists():
            print(f"building {qcow2}", flush=True)
            tmp = qcow2.with_name(qcow2.name + ".tmp")
            _run_checked(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(tmp)])
            tmp.rename(qcow2)
            built = True
        gz = images / "disk.raw.gz"
        if not gz.exists():
            print(f"building {gz}", flush=True)
            tmp = gz.with_name(gz.name + ".tmp")
            _run_checked(["gzip", "-c", str(raw)], stdout=tmp)
            tmp.rename(gz)
            built = True
        rnd = images / "random.raw"
        if not rnd.exists():
            print(f"building {rnd} (1 GiB random)", flush=True)
            tmp = rnd.with_name(rnd.name + ".tmp")
            _write_random_raw(tmp)
            tmp.rename(rnd)
            built = True
        if xz_proc is not None:
            _, err = xz_proc.communicate()
            if xz_proc.returncode != 0:
                raise BenchError(f"xz exited {xz_proc.returncode}: {err.decode(errors='replace')}")
            xz_tmp.rename(xz)
    finally:
        if xz_proc is not None and xz_proc.poll() is None:
            xz_proc.kill()
            xz_proc.wait()
            xz_tmp.unlink(missing_ok=True)
    return time.perf_counter() - started if built else 0.0


def prewarm(path: Path) -> None:
    """Read a file so the next run finds it in the page cache (untimed)."""
    buf = bytearray(PIECE)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def kernel_reclaims_cache() -> bool:
    """True if DAMON is paging out cold memory (as on some VMs): cached files do not stay."""
    for state in Path("/sys/kernel/mm/damon/admin/kdamonds").glob("*/state"):
        try:
            if state.read_text().strip() == "on":
                return True
        except OSError:
            pass
    return False


# --- nginx --------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _nginx_config(ngdir: Path, images: Path, port: int) -> str:
    built = subprocess.run(["nginx", "-V"], capture_output=True, check=False).stderr.decode()
    temp_paths = [f"client_body_temp_path {ngdir / 'tmp-body'};"]
    for module in ("proxy", "fastcgi", "uwsgi", "scgi"):
        if f"--without-http_{module}_module" not in built:
            temp_paths.append(f"{module}_temp_path {ngdir / ('tmp-' + module)};")
    user = "user root;" if os.geteuid() == 0 else ""
    temps = "\n    ".join(temp_paths)
    return f"""# generated by bench/import_http.py
daemon off;
master_process on;
worker_processes 1;
{user}
pid {ngdir / 'nginx.pid'};
error_log {ngdir / 'error.log'} warn;

events {{
    worker_connections 64;
}}

http {{
    access_log {ngdir / 'access.log'};
    {temps}
    sendfile on;
    tcp_nopush on;
    default_type application/octet-stream;
    types {{ }}
    server {{
        listen 127.0.0.1:{port};
        root {images};
        location / {{ }}
    }}
}}
"""


class Nginx:
    """nginx in the foreground as our child, serving IMAGES on a free 127.0.0.1 port."""

    def __init__(self, workdir: Path, images: Path) -> None:
        # One directory per benchmark process: two of them may share a work directory.
        self.dir = Path(tempfile.mkdtemp(prefix="nginx-", dir=workdir))
        self.images = images
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        last = ""
        for _ in range(3):  # the port may be taken between choosing and binding it
            self.port = _free_port()
            conf = self.dir / "nginx.conf"
            conf.write_text(_nginx_config(self.dir, self.images, self.port))
            with open(self.dir / "stderr.log", "wb") as err:
                self._proc = subprocess.Popen(
                    ["nginx", "-p", str(self.dir), "-c", str(conf), "-e",
                     str(self.dir / "error.log")],
                    stdin=subprocess.DEVNULL, stdout=err, stderr=err)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self._proc.poll() is None:
                try:
                    socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                    return
                except OSError:
                    time.sleep(0.05)
            self.stop()
            last = (self.dir / "stderr.log").read_text(errors="replace")
            log = self.dir / "error.log"
            if log.exists():
                last += log.read_text(errors="replace")[-1000:]
        raise BenchError(f"nginx did not start: {last.strip()}")

    def stop(self) -> None:
        p, self._proc = self._proc, None
        if p is not None and p.poll() is None:
            p.terminate()  # SIGTERM: fast shutdown of the master and its worker
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


# --- peak RSS of a process tree ------------------------------------------------------


def _psutil() -> Any:
    try:
        return importlib.import_module("psutil")
    except ImportError:
        return None


def _children_files_work() -> bool:
    me = os.getpid()
    return Path(f"/proc/{me}/task/{me}/children").exists()


def _proc_tree(root: int, use_children_files: bool) -> list[int]:
    """ROOT and all its descendants, from /proc (no psutil)."""
    if use_children_files:
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
    # Without CONFIG_PROC_CHILDREN: build the parent map from every /proc/<pid>/stat.
    kids: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()  # after "pid (comm) "
        kids.setdefault(int(fields[1]), []).append(int(entry.name))
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo += kids.get(pid, [])
    return pids


def _vmrss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1]) * KiB
    except (OSError, ValueError):
        pass
    return 0  # gone, a zombie, or a kernel thread


class TreeRSS(threading.Thread):
    """Samples the summed RSS of a process tree every 50 ms; keeps the maximum."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = 0
        self.peak_processes = 0
        self.samples = 0
        self._stop_event = threading.Event()
        self._psutil = _psutil()
        self._children_files = _children_files_work()

    def sample(self) -> None:
        if self._psutil is not None:
            total, count = self._sample_psutil()
        else:
            pids = _proc_tree(self.pid, self._children_files)
            total, count = sum(_vmrss(p) for p in pids), len(pids)
        self.samples += 1
        if total > self.peak:
            self.peak, self.peak_processes = total, count

    def _sample_psutil(self) -> tuple[int, int]:
        ps = self._psutil
        try:
            root = ps.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except ps.Error:
            return 0, 0
        total = 0
        for p in procs:
            try:
                total += int(p.memory_info().rss)
            except ps.Error:
                pass
        return total, len(procs)

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.sample()
            self._stop_event.wait(SAMPLE_INTERVAL)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


# --- one run --------------------------------------------------------------------------


def child_env() -> dict[str, str]:
    """Our environment without proxy settings: every byte goes to 127.0.0.1 directly."""
    return {k: v for k, v in os.environ.items() if k not in PROXY_VARIABLES}


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclasses.dataclass
class OursRun:
    seconds: float
    peak_rss: int
    peak_processes: int
    allocated: int
    size: int
    log: str
    started_epoch: float


def run_ours(url: str, rundir: Path) -> OursRun:
    data, scratch = rundir / "data", rundir / "scratch"
    data.mkdir(parents=True)
    scratch.mkdir()
    termination = rundir / "termination-log"
    env = child_env() | {
        "IMPORTER_SOURCE": "http",
        "IMPORTER_ENDPOINT": url,
        "IMPORTER_DATA_DIR": str(data),
        "IMPORTER_IMAGE_SIZE": str(IMAGE_SIZE),
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
            rc = proc.wait()
            seconds = time.perf_counter() - started
        finally:
            if proc.poll() is None:  # interrupted: SIGTERM lets it stop qemu-img and nbdkit
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            monitor.stop()
    text = log_path.read_text(errors="replace")
    if rc != 0:
        raise BenchError(f"importer exited {rc} for {url}:\n{text[-2000:]}")
    message = termination.read_text() if termination.exists() else ""
    try:
        ok = json.loads(message).get("message") == "Import Complete"
    except ValueError:
        ok = False
    if not ok:
        raise BenchError(f"importer did not complete for {url}: {message!r}\n{text[-2000:]}")
    st = (data / "disk.img").stat()
    return OursRun(seconds, monitor.peak, monitor.peak_processes, st.st_blocks * 512,
                   st.st_size, text, epoch)


def _curl(url: str, *extra: str) -> list[str]:
    return ["curl", "-s", "-f", "--noproxy", "*", *extra, url]


def _pipeline(first: list[str], second: list[str], *, stdout: Path | None = None) -> None:
    """FIRST | SECOND, optionally with SECOND's stdout in a file we open."""
    out = open(stdout, "wb") if stdout is not None else None
    try:
        p1 = subprocess.Popen(first, stdout=subprocess.PIPE, env=child_env())
        try:
            assert p1.stdout is not None
            p2 = subprocess.Popen(second, stdin=p1.stdout,
                                  stdout=out if out is not None else subprocess.DEVNULL)
            p1.stdout.close()  # p2 holds the read end; p1 gets SIGPIPE if p2 dies
            rc2 = p2.wait()
            rc1 = p1.wait()
        finally:
            if p1.poll() is None:
                p1.kill()
                p1.wait()
    finally:
        if out is not None:
            out.close()
    if rc1 != 0 or rc2 != 0:
        raise BenchError(f"baseline {first[0]}|{second[0]} exited {rc1}/{rc2}")


def _single(argv: list[str]) -> None:
    rc = subprocess.run(argv, env=child_env(), check=False).returncode
    if rc != 0:
        raise BenchError(f"baseline {argv[0]} exited {rc}")


def run_baseline(case: Case, url: str, rundir: Path, expected_size: int) -> float:
    """The baseline pipeline of CASE, ending with fsync; returns its wall time."""
    rundir.mkdir(parents=True)
    out = rundir / "disk.img"
    started = time.perf_counter()
    if case.baseline == "sparse-copy":
        _pipeline(_curl(url), ["cp", "--sparse=always", "/dev/stdin", str(out)])
    elif case.baseline == "download":
        _single(_curl(url, "-o", str(out)))
    elif case.baseline == "download-convert":
        scratch = rundir / "scratch.qcow2"
        _single(_curl(url, "-o", str(scratch)))
        _single(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(scratch), str(out)])
    elif case.baseline == "xz-pipe":
        _pipeline(_curl(url), ["xz", "-dc"], stdout=out)
    else:
        raise ValueError(case.baseline)
    fsync_file(out)
    seconds = time.perf_counter() - started
    size = out.stat().st_size
    if size != expected_size:
        raise BenchError(f"baseline {case.name} wrote {size} bytes, expected {expected_size}")
    return seconds


def compare(reference: Path, imported: Path) -> None:
    p = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(reference),
                        str(imported)], capture_output=True, check=False)
    if p.returncode != 0:
        detail = (p.stdout + p.stderr).decode(errors="replace").strip()
        raise BenchError(f"CONTENT MISMATCH: {imported} differs from {reference} "
                         f"(qemu-img compare exited {p.returncode}): {detail}")


# --- where the importer spends its time ---------------------------------------------------


def phase_breakdown(run: OursRun) -> str:
    """From the importer's log: start-up, each PHASE, and the exit, in seconds."""
    events: list[tuple[float, str]] = []
    for line in run.log.splitlines():
        m = _LOG_LINE.match(line)
        # The processor's PHASE lines name its phases; progress.py's name the metric's.
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
    notes = [msg for _, msg in events if msg.startswith(("SOURCE", "WROTE", "COMPLETE"))]
    return " | ".join(parts) + "\n      " + "\n      ".join(notes)


# --- the report ---------------------------------------------------------------------------


@dataclasses.dataclass
class CaseResult:
    case: Case
    ours: list[OursRun]
    baseline: list[float]

    @property
    def ours_median(self) -> float:
        return statistics.median(r.seconds for r in self.ours)

    @property
    def baseline_median(self) -> float:
        return statistics.median(self.baseline)

    @property
    def ratio(self) -> float:
        return self.ours_median / self.baseline_median

    @property
    def peak_rss(self) -> int:
        return max(r.peak_rss for r in self.ours)

    @property
    def allocated(self) -> int:
        return max(r.allocated for r in self.ours)

    @property
    def median_run(self) -> OursRun:
        return sorted(self.ours, key=lambda r: r.seconds)[(len(self.ours) - 1) // 2]

    def failures(self) -> list[str]:
        failed = []
        if self.ratio > self.case.bar:
            failed.append("time")
        if self.peak_rss >= RSS_LIMIT:
            failed.append("rss")
        if self.case.sparse and abs(self.allocated - SOURCE_DATA) > SPARSE_TOLERANCE * SOURCE_DATA:
            failed.append("alloc")
        return failed

    def row(self) -> list[str]:
        failed = self.failures()
        alloc = f"{self.allocated / MiB:.0f}"
        if self.case.sparse or self.case.name == "random":
            alloc += f" ({(self.allocated - SOURCE_DATA) / SOURCE_DATA:+.1%} vs 1024)"
        return [
            self.case.name,
            f"{self.ours_median:.2f}",
            f"{self.baseline_median:.2f}",
            f"{self.ratio:.2f}",
            f"<= {self.case.bar:.1f}",
            "PASS" if not failed else f"FAIL ({', '.join(failed)})",
            f"{self.peak_rss / MiB:.1f}",
            alloc,
        ]


HEADER = ["case", "ours median s", "baseline median s", "ratio ours/baseline", "bar",
          "pass/fail", "peak RSS MiB", "allocated MiB"]


def text_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [HEADER, *rows]) for i in range(len(HEADER))]
    def fmt(r: list[str]) -> str:
        return " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True))
    return "\n".join([fmt(HEADER), "-+-".join("-" * w for w in widths), *map(fmt, rows)])


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


NOTES = (
    "Page cache: nothing was dropped; each run's source file was read (untimed) just before "
    "the run, so runs read their source from memory. Every run (ours and baseline) ends with "
    "fsync of the target inside the timed region. Bars: time ratio <= 1.0 (raw, raw.gz, "
    "random, qcow2), <= 1.2 (raw.xz); peak RSS of the importer's process tree < 100 MiB; "
    "sparse cases allocate within 10% of the 1024 MiB of source data."
)


# --- main ---------------------------------------------------------------------------------


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(f"terminated by signal {signum}")


@contextmanager
def exclusive(path: Path, say: Callable[[str], None]) -> Iterator[None]:
    """One measurement at a time per work directory: two would share 2 cores and a disk."""
    with open(path, "wb") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for another benchmark holding {path} to finish")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@contextmanager
def serving(workdir: Path, images: Path) -> Iterator[Nginx]:
    """nginx for the duration; its directory is removed after a clean run, kept after an error."""
    server = Nginx(workdir, images)
    try:
        server.start()
        yield server
    except BaseException:
        server.stop()
        print(f"nginx files kept in {server.dir}", file=sys.stderr)
        raise
    server.stop()
    shutil.rmtree(server.dir, ignore_errors=True)


def measure_case(case: Case, server: Nginx, images: Path, runs_dir: Path, runs: int,
                 say: Callable[[str], None]) -> CaseResult:
    expected = (images / case.reference).stat().st_size
    result = CaseResult(case, [], [])
    for i in range(runs):
        rundir = runs_dir / f"{case.name}-ours-{i}"
        shutil.rmtree(rundir, ignore_errors=True)
        prewarm(images / case.served)
        try:
            run = run_ours(f"{server.base_url}/{case.served}", rundir)
            if i == 0:
                compare(images / case.reference, rundir / "data" / "disk.img")
        finally:
            shutil.rmtree(rundir, ignore_errors=True)
        result.ours.append(run)
        say(f"  {case.name} run {i + 1}/{runs} ours     {run.seconds:7.2f} s  "
            f"peak RSS {run.peak_rss / MiB:6.1f} MiB ({run.peak_processes} processes)  "
            f"allocated {run.allocated / MiB:.0f} MiB" + ("  content OK" if i == 0 else ""))
        rundir = runs_dir / f"{case.name}-baseline-{i}"
        shutil.rmtree(rundir, ignore_errors=True)
        prewarm(images / case.baseline_file)
        try:
            seconds = run_baseline(case, f"{server.base_url}/{case.baseline_file}", rundir,
                                   expected)
        finally:
            shutil.rmtree(rundir, ignore_errors=True)
        result.baseline.append(seconds)
        say(f"  {case.name} run {i + 1}/{runs} baseline {seconds:7.2f} s")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                        help="images, nginx files, run directories, results.md (default .bench/)")
    parser.add_argument("--runs", type=int, default=3, help="runs per side and case (default 3)")
    parser.add_argument("--cases", default=",".join(CASES),
                        help=f"comma-separated subset of {','.join(CASES)}")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown or not names or args.runs < 1:
        parser.error(f"unknown cases {unknown}" if unknown else "nothing to run")
    for tool in ("nginx", "curl", "xz", "gzip", "qemu-img", "cp"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed")
    signal.signal(signal.SIGTERM, _terminate)

    workdir: Path = args.workdir.resolve()
    images = workdir / "images"
    workdir.mkdir(parents=True, exist_ok=True)
    runs_dir = Path(tempfile.mkdtemp(prefix="runs-", dir=workdir))  # ours alone

    def say(line: str) -> None:
        print(line, flush=True)

    run_seconds = 0.0
    try:
        build_seconds = build_images(images)
        built = f"built in {build_seconds:.0f} s" if build_seconds else "cached"
        say(f"images: {images} ({built})")
        say(f"RSS sampling: {'psutil' if _psutil() else '/proc VmRSS'} every "
            f"{SAMPLE_INTERVAL * 1000:.0f} ms, summed over the importer's process tree")
        say("page cache: nothing dropped; each run's source file is read just before it")
        if kernel_reclaims_cache():
            say("note: the kernel's DAMON reclaim is on: cold page cache is paged out within "
                "seconds, so part of a source may still be read from disk")
        results: list[CaseResult] = []
        with exclusive(workdir / ".measure.lock", say), serving(workdir, images) as server:
            say(f"nginx: {server.base_url} as {getpass.getuser()}, files in {server.dir}")
            started = time.perf_counter()
            for name in names:
                say(f"case {name}:")
                results.append(measure_case(CASES[name], server, images, runs_dir,
                                            args.runs, say))
            run_seconds = time.perf_counter() - started
    except BenchError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(runs_dir, ignore_errors=True)

    rows = [r.row() for r in results]
    failed = [r.case.name for r in results if r.failures()]
    verdict = (f"FAIL: {', '.join(failed)} missed a bar" if failed else "PASS: every bar met")
    phases = "\n".join(f"  {r.case.name}: {phase_breakdown(r.median_run)}" for r in results)
    per_run = "\n".join(
        f"  {r.case.name}: ours {' '.join(f'{o.seconds:.2f}' for o in r.ours)}; "
        f"baseline {' '.join(f'{b:.2f}' for b in r.baseline)}" for r in results)
    say("")
    say(text_table(rows))
    say("")
    say(NOTES)
    say(f"build {build_seconds:.0f} s, measurement {run_seconds:.0f} s, "
        f"{args.runs} runs per side")
    say("wall times per run (s):\n" + per_run)
    say("our median run, from the importer's log:\n" + phases)
    say("")
    say(verdict)
    (workdir / "results.md").write_text(
        f"# HTTP import benchmark\n\n{datetime.datetime.now().isoformat(timespec='seconds')}, "
        f"{args.runs} runs per side, median wall time\n\n{markdown_table(rows)}\n\n"
        f"{NOTES}\n\n**{verdict}**\n\n## Wall times per run (s)\n\n```\n{per_run}\n```\n\n"
        f"## Our median run, from the importer's log\n\n```\n{phases}\n```\n"
    )
    say(f"written: {workdir / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
