"""Throughput and memory of an upload, directly, through the proxy and with the CLI, against cp.

What it measures
    A real ``cdi serve`` (the embedded control plane, started fresh for every
    run of every case, with its data dir under the work directory) takes an
    upload DataVolume; once the DataVolume is ``UploadReady`` the image is sent
    and the wall time until the answer is taken:

    direct   ``POST /v1beta1/upload`` straight to the upload server (the
             address in the pod annotation ``embedded.cdi.kubevirt.io/
             upload-address``) with the proxy's client certificate
             (``<data dir>/uploadserver-client-signer/client/tls.{crt,key}``),
             verified against ``<data dir>/uploadserver-signer/ca.crt``: the
             proxy is bypassed
    proxy    ``POST <uploadProxyURL>/v1beta1/upload`` with a token from an
             ``UploadTokenRequest`` (made before the clock starts), verified
             against CDIConfig ``status.uploadProxyCA``; ``cdi serve``'s proxy
             sends it on to the upload server's Unix socket in plain HTTP
             (``docs/security.md``, local sockets), while ``direct`` keeps
             mutual TLS to the TCP port, as any client of an upload server
             must
    every byte  (extra rows (a0), (b0), raw only) ``direct`` and ``proxy`` with the
             whole file as the body, zeros included, as a KubeVirt CDI client
             (``virtctl image-upload``, curl) sends it
    local    (extra row, raw only; not a baseline) the same POST as ``direct``
             but over the upload server's Unix socket in plain HTTP (the pod
             annotation ``embedded.cdi.kubevirt.io/upload-socket``), the path
             the proxy takes: the upload server's own speed without TLS
    cli      ``cdi image-upload dv NAME --image-path F --size Q``, the whole
             command: it creates the DataVolume, waits for its upload server,
             sends to ``upload-async`` and waits until the DataVolume is
             Succeeded, so it also carries the control plane's latencies
    cp       ``cp SRC DST`` on the same disk, then fsync of DST and its
             directory, inside the timed region

    ``upload`` (sync) is answered once the image is written, converted if it
    has to be, resized and fsynced, so cp is fsynced too.  ``cp`` (coreutils,
    default ``--sparse=auto``) moves only the data of the sparse source.  So
    does ``cdi image-upload`` for a raw image: it sends a sparse stream
    (``importer.upload.sparse``, offered by the upload server in
    ``Accept-Post``), the runs of data with their offsets, and (a), (b) and
    (a') send the raw image the same way; (a0) and (b0) show what a client
    sending every byte (zeros too, over TLS, twice through the proxy) gets.
    A qcow2 image goes as it is everywhere.  A case ``4x proxy`` sends four
    raw uploads at once through one proxy, into four DataVolumes, and reports
    aggregate throughput.

    For (a), (a0), (a'), (b) and (b0) the client is ``curl -T FILE -X POST``
    (streamed, with a Content-Length), one process per upload.  For a sparse
    row FILE is the image's sparse stream, encoded once beforehand
    (``<image>.sparse-stream``, untimed); (c) encodes as it sends.  A client
    would run on another machine; here it shares the two cores, so the lightest
    one is used, and its CPU time is reported.

Memory
    The proxy runs inside ``cdi serve``: its peak RSS is the ``VmHWM`` of the
    ``cdi serve`` process, which includes the whole control plane (REST API,
    controllers, SQLite store, pod runner); a fresh ``cdi serve`` per run
    resets it, and its idle ``VmHWM`` just before the upload is printed too.
    The upload server's peak is the ``VmHWM`` of the worker process (its pid is
    the pod annotation ``embedded.cdi.kubevirt.io/pid``, for the CLI case a
    child of ``cdi serve`` running ``importer.uploadserver``), sampled every
    100 ms while it runs; "tree" adds its children (qemu-img) summed.

The images (built once, cached in ``<workdir>/images``)
    ``upload-2g.raw``    2 GiB virtual, 1 GiB of random data in 4 extents
    ``upload-2g.qcow2``  the same, ``qemu-img convert -O qcow2``
    ``--quick``: ``upload-256m.raw`` (256 MiB, 128 MiB of data) and its qcow2.
    Each run reads its source first (untimed), so every side reads it from the
    page cache.  Content is checked once per case with ``qemu-img compare``.

Bars (a failed bar prints FAIL, the exit status stays 0; a broken run exits 1):
proxy >= 0.9x direct (throughput); raw upload >= 0.7x cp (direct and proxy
each); ``cdi serve`` VmHWM < 150 MiB with 4 concurrent uploads through the proxy.

    python bench/upload.py [--runs N] [--quick] [--cases raw,qcow2,concurrent]
                           [--workdir DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import fcntl
import functools
import json
import os
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from importer.upload import sparse

REPO = Path(__file__).resolve().parent.parent
DEFAULT_WORKDIR = REPO / ".bench"

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

PIECE = 4 * MiB
SAMPLE_INTERVAL = 0.1
CONCURRENT = 4
SERVE_RSS_LIMIT = 150 * MiB
PROXY_BAR = 0.9  # proxy throughput / direct throughput
CP_BAR = 0.7  # raw upload throughput / cp throughput
UPLOAD_TIMEOUT = 3600.0
READY_TIMEOUT = 120.0

PID_ANNOTATION = "embedded.cdi.kubevirt.io/pid"
UPLOAD_ANNOTATION = "embedded.cdi.kubevirt.io/upload-address"
SOCKET_ANNOTATION = "embedded.cdi.kubevirt.io/upload-socket"
PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy",
                   "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")
# Magic bytes the importer recognises; a raw image must not start with one.
_MAGIC: tuple[tuple[int, bytes], ...] = (
    (0, b"\x1f\x8b"), (0, b"\x28\xb5\x2f\xfd"), (0, b"\xfd7zXZ\x00"), (0, b"BZh"),
    (0, b"QFI\xfb"), (0, b"KDMV"), (0x40, b"\x7f\x10\xda\xbe"), (0, b"conectix"),
    (0, b"vhdxfile"),
)
CASE_NAMES = ("raw", "qcow2", "concurrent")


class BenchError(Exception):
    """A run that did not produce a correct upload: the measurement is void."""


# --- the images ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sizes:
    label: str
    virtual: int
    extent: int

    @property
    def offsets(self) -> tuple[int, ...]:
        """Four extents spread over the image: a hole before, between and after them."""
        step = self.virtual // 4
        return tuple(i * step + step // 32 for i in range(4))

    @property
    def data(self) -> int:
        return self.extent * 4

    @property
    def volume(self) -> str:
        """The DataVolume's requested size: room for the image after filesystem overhead."""
        return f"{(self.virtual + self.virtual // 2) // MiB}Mi"


FULL = Sizes("2g", 2 * GiB, 256 * MiB)
QUICK = Sizes("256m", 256 * MiB, 32 * MiB)


@dataclasses.dataclass(frozen=True)
class Image:
    kind: str  # "raw" or "qcow2"
    path: Path
    reference: Path  # the raw image its upload must equal

    @property
    def size(self) -> int:
        return self.path.stat().st_size


def _looks_like_image(head: bytes) -> bool:
    return any(head[off : off + len(magic)] == magic for off, magic in _MAGIC)


def _write_sparse_raw(path: Path, sizes: Sizes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for offset in sizes.offsets:
            for pos in range(offset, offset + sizes.extent, PIECE):
                piece = os.urandom(PIECE)
                while pos == 0 and _looks_like_image(piece[:512]):
                    piece = os.urandom(PIECE)
                view = memoryview(piece)
                while view:
                    n = os.pwrite(fd, view, pos)
                    view, pos = view[n:], pos + n
        os.ftruncate(fd, sizes.virtual)
    finally:
        os.close(fd)


def build_images(images: Path, sizes: Sizes) -> tuple[Image, Image, float]:
    """The raw image and its qcow2, built if missing (atomically, under a lock)."""
    images.mkdir(parents=True, exist_ok=True)
    raw = images / f"upload-{sizes.label}.raw"
    qcow2 = images / f"upload-{sizes.label}.qcow2"
    started = time.perf_counter()
    built = False
    with open(images / ".build.lock", "wb") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not raw.exists():
            qcow2.unlink(missing_ok=True)  # made from another raw: stale
            print(f"building {raw} ({sizes.virtual // MiB} MiB virtual, "
                  f"{sizes.data // MiB} MiB random data)", flush=True)
            tmp = raw.with_name(raw.name + ".tmp")
            _write_sparse_raw(tmp, sizes)
            tmp.rename(raw)
            built = True
        if not qcow2.exists():
            print(f"building {qcow2}", flush=True)
            tmp = qcow2.with_name(qcow2.name + ".tmp")
            p = subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw),
                                str(tmp)], capture_output=True, check=False)
            if p.returncode != 0:
                raise BenchError(f"qemu-img convert exited {p.returncode}: "
                                 f"{p.stderr.decode(errors='replace')[-500:]}")
            tmp.rename(qcow2)
            built = True
    seconds = time.perf_counter() - started if built else 0.0
    return Image("raw", raw, raw), Image("qcow2", qcow2, raw), seconds


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


def compare(reference: Path, uploaded: Path) -> None:
    p = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(reference),
                        str(uploaded)], capture_output=True, check=False)
    if p.returncode != 0:
        detail = (p.stdout + p.stderr).decode(errors="replace").strip()
        raise BenchError(f"CONTENT MISMATCH: {uploaded} differs from {reference} "
                         f"(qemu-img compare exited {p.returncode}): {detail}")


# --- /proc --------------------------------------------------------------------------


def child_env() -> dict[str, str]:
    """Our environment without proxy settings: every byte goes to 127.0.0.1 directly."""
    return {k: v for k, v in os.environ.items() if k not in PROXY_VARIABLES}


def _status_kib(pid: int, field: bytes) -> int:
    """A ``VmXXX:`` line of /proc/PID/status in bytes; 0 if the process is gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) * KiB
    except (OSError, ValueError):
        pass
    return 0


CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int, *, children: bool = False) -> float:
    """utime + stime of PID (plus its waited-for children's); 0.0 if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return 0.0
    fields = stat[stat.rfind(b")") + 2 :].split()  # field 3 (state) is fields[0]
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLK_TCK


def machine_cpu() -> float:
    """CPU seconds the whole machine has been busy (all cores, all processes: /proc/stat)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[:7])
    return (user + nice + system + irq + softirq) / CLK_TCK


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return kids
    for task in tasks:
        try:
            kids += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return kids


def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        todo += _children(p)
    return pids


def _is_upload_server(pid: int) -> bool:
    try:
        return b"importer.uploadserver" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


class WorkerWatch(threading.Thread):
    """Samples upload-server workers every 100 ms: VmHWM, summed tree RSS, CPU.

    Workers are the PIDS given (pod annotations), or, with none, the children of
    SERVE_PID that run ``importer.uploadserver`` (found as they appear).
    """

    def __init__(self, serve_pid: int, pids: list[int] | None = None) -> None:
        super().__init__(daemon=True)
        self.serve_pid = serve_pid
        self.discover = pids is None
        self.hwm: dict[int, int] = dict.fromkeys(pids or [], 0)
        self.cpu: dict[int, float] = dict.fromkeys(pids or [], 0.0)
        self.tree_peak = 0  # max over samples of the RSS of every worker's tree, summed
        self._stop_event = threading.Event()

    def sample(self) -> None:
        if self.discover:
            for pid in _children(self.serve_pid):
                if pid not in self.hwm and _is_upload_server(pid):
                    self.hwm[pid], self.cpu[pid] = 0, 0.0
        total = 0
        for pid in self.hwm:
            hwm = _status_kib(pid, b"VmHWM:")
            if not hwm:
                continue  # exited (or a zombie): keep the last values
            self.hwm[pid] = max(self.hwm[pid], hwm)
            self.cpu[pid] = cpu_seconds(pid, children=True)
            total += sum(_status_kib(p, b"VmRSS:") for p in _tree(pid))
        self.tree_peak = max(self.tree_peak, total)

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.sample()
            self._stop_event.wait(SAMPLE_INTERVAL)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()

    @property
    def peak(self) -> int:
        return max(self.hwm.values(), default=0)

    @property
    def cpu_total(self) -> float:
        return sum(self.cpu.values())


# --- cdi serve ----------------------------------------------------------------------


class Serve:
    """A fresh ``cdi serve`` on 127.0.0.1 with its data dir under ROOT."""

    def __init__(self, root: Path, *args: str) -> None:
        self.root = root
        self.args = args  # more `cdi serve` options, e.g. --max-workers N
        self.data_dir = root / "data"
        self.env = child_env() | {"XDG_CONFIG_HOME": str(root / "config"),
                                  "CDI_DATA_DIR": str(self.data_dir)}
        self.proc: subprocess.Popen[bytes] | None = None
        self.session = requests.Session()
        self.session.trust_env = False
        self.url = ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> Serve:
        self.root.mkdir(parents=True, exist_ok=True)
        info = self.data_dir / "server.json"
        with (self.root / "serve.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cdi.cli.main", "serve", "--data-dir", str(self.data_dir),
                 "--address", "127.0.0.1:0", *self.args],
                cwd=REPO, env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + 60
        while not info.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError("cdi serve did not start:\n" + self.log())
            time.sleep(0.05)
        data = json.loads(info.read_text())
        self.url = data["url"]
        token = Path(data["token_file"]).read_text().strip()
        self.session.headers["Authorization"] = f"Bearer {token}"
        return self

    def log(self) -> str:
        p = self.root / "serve.log"
        return p.read_text(errors="replace")[-3000:] if p.exists() else ""

    def stop(self) -> None:
        self.session.close()
        p, self.proc = self.proc, None
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    # -- the REST API (plain HTTP on loopback) ---------------------------------------

    def _path(self, plural: str, name: str | None = None, group: str = "cdi.kubevirt.io",
              namespace: str | None = "default") -> str:
        base = "/api/v1" if group == "" else f"/apis/{group}/v1beta1"
        ns = f"/namespaces/{namespace}" if namespace else ""
        return f"{self.url}{base}{ns}/{plural}" + (f"/{name}" if name else "")

    def get(self, plural: str, name: str, group: str = "cdi.kubevirt.io",
            namespace: str | None = "default") -> dict[str, Any]:
        r = self.session.get(self._path(plural, name, group, namespace), timeout=30,
                             verify=True)
        if r.status_code != 200:
            raise BenchError(f"GET {plural}/{name}: {r.status_code} {r.text[:300]}")
        data: dict[str, Any] = r.json()
        return data

    def create_dv(self, name: str, size: str) -> None:
        dv = {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
              "metadata": {"name": name, "namespace": "default"},
              "spec": {"source": {"upload": {}},
                       "storage": {"resources": {"requests": {"storage": size}}}}}
        r = self.session.post(self._path("datavolumes"), json=dv, timeout=30, verify=True)
        if r.status_code != 201:
            raise BenchError(f"creating DataVolume {name}: {r.status_code} {r.text[:300]}")

    def wait_phase(self, name: str, phase: str, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            status = self.get("datavolumes", name).get("status", {})
            last = status.get("phase", "")
            if last == phase:
                return
            if last == "Failed":
                break
            time.sleep(0.1)
        raise BenchError(f"DataVolume {name} is {last or 'Pending'}, not {phase}: "
                         f"{json.dumps(status)[:1000]}\n{self.log()}")

    def token(self, pvc: str) -> str:
        body = {"apiVersion": "upload.cdi.kubevirt.io/v1beta1", "kind": "UploadTokenRequest",
                "metadata": {"name": pvc, "namespace": "default"}, "spec": {"pvcName": pvc}}
        r = self.session.post(self._path("uploadtokenrequests", group="upload.cdi.kubevirt.io"),
                              json=body, timeout=30, verify=True)
        if r.status_code != 201:
            raise BenchError(f"UploadTokenRequest {pvc}: {r.status_code} {r.text[:300]}")
        return str(r.json()["status"]["token"])

    def upload_pod(self, pvc: str) -> tuple[str, int]:
        """(host:port, pid) of the upload server of PVC, from its pod's annotations."""
        ann = self.get("pods", f"cdi-upload-{pvc}", group="")["metadata"].get("annotations", {})
        if UPLOAD_ANNOTATION not in ann or PID_ANNOTATION not in ann:
            raise BenchError(f"pod cdi-upload-{pvc} has no address or pid: {ann}")
        return str(ann[UPLOAD_ANNOTATION]), int(ann[PID_ANNOTATION])

    def upload_socket(self, pvc: str) -> str:
        """The upload server's Unix socket (cdi serve's local hop), from its annotation."""
        ann = self.get("pods", f"cdi-upload-{pvc}", group="")["metadata"].get("annotations", {})
        if SOCKET_ANNOTATION not in ann:
            raise BenchError(f"pod cdi-upload-{pvc} has no Unix socket: {ann}")
        return str(ann[SOCKET_ANNOTATION])

    def proxy(self) -> tuple[str, Path]:
        """The upload proxy's URL and a file holding its CA (CDIConfig status)."""
        status = self.get("cdiconfigs", "config", namespace=None).get("status", {})
        ca = self.root / "uploadproxy-ca.pem"
        ca.write_text(status["uploadProxyCA"])
        return str(status["uploadProxyURL"]), ca

    def volume(self, pvc: str) -> Path:
        pv = str(self.get("persistentvolumeclaims", pvc, group="")["spec"]["volumeName"])
        return self.data_dir / "volumes" / pv / "disk.img"

    def hwm(self) -> int:
        return _status_kib(self.pid, b"VmHWM:")

    def cpu(self) -> float:
        return cpu_seconds(self.pid)


@contextmanager
def serving(root: Path, *args: str) -> Iterator[Serve]:
    server = Serve(root, *args)
    try:
        yield server.start()
    except BaseException:
        log = server.log()
        server.stop()
        print(f"cdi serve log kept in {root}: ...\n{log[-1500:]}", file=sys.stderr)
        raise
    server.stop()
    shutil.rmtree(root, ignore_errors=True)


# --- the client ---------------------------------------------------------------------


@dataclasses.dataclass
class Posted:
    status: int
    text: str
    seconds: float
    cpu: float  # the sending thread's CPU time


def sparse_file(image: Path) -> Path:
    """IMAGE's sparse stream (``importer.upload.sparse``), written once next to it.

    The client then only streams a file: what the upload costs the proxy and
    the upload server is measured, not the cost of scanning the image, which
    ``cdi image-upload`` pays in (c).
    """
    out = image.with_name(image.name + ".sparse-stream")
    if out.exists() and out.stat().st_mtime >= image.stat().st_mtime:
        return out
    tmp = out.with_name(out.name + ".tmp")
    fd = os.open(image, os.O_RDONLY)
    try:
        with open(tmp, "wb") as f:
            for piece in sparse.encode(fd, image.stat().st_size):
                f.write(piece)
    finally:
        os.close(fd)
    tmp.rename(out)
    return out


@dataclasses.dataclass(frozen=True)
class Job:
    """One ``curl -T FILE -X POST`` (streamed, with a Content-Length)."""

    url: str
    path: Path  # the body
    tls: tuple[str, ...] = ()  # curl's --cacert/--cert/--key arguments
    headers: tuple[str, ...] = ()
    unix_socket: str | None = None


def post_file(job: Job) -> Posted:
    """POST JOB's file with curl; its CPU time comes from wait4's rusage."""
    cmd = ["curl", "-sS", "-X", "POST", "-T", str(job.path), "-o", "-",
           "-w", "\n%{http_code}", "-H", "Expect:", *job.tls]
    for h in job.headers:
        cmd += ["-H", h]
    if job.unix_socket:
        cmd += ["--unix-socket", job.unix_socket]
    cmd.append(job.url)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=child_env())
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        text, _, code = out.read().decode(errors="replace").rpartition("\n")
        if proc.returncode != 0 or not code.isdigit():
            raise BenchError(f"curl exited {proc.returncode}: "
                             f"{err.read().decode(errors='replace')[-500:]}")
    return Posted(int(code), text, seconds, usage.ru_utime + usage.ru_stime)


def post_all(jobs: list[Job]) -> tuple[float, list[Posted]]:
    """Run the POSTs at once, one thread each; (wall seconds until the last answer, answers)."""
    results: list[Posted | BaseException | None] = [None] * len(jobs)
    barrier = threading.Barrier(len(jobs) + 1)

    def one(i: int) -> None:
        barrier.wait()
        try:
            results[i] = post_file(jobs[i])
        except BaseException as e:
            results[i] = e

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(jobs))]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - started
    answers: list[Posted] = []
    for r in results:
        if not isinstance(r, Posted):
            raise BenchError(f"upload failed: {r!r}")
        if r.status != 200:
            raise BenchError(f"upload answered {r.status}: {r.text[:500]}")
        answers.append(r)
    return seconds, answers


# --- one run of each kind -----------------------------------------------------------


@dataclasses.dataclass
class Run:
    seconds: float
    bytes: int  # file bytes sent (all uploads of the run)
    serve_idle: int = 0  # cdi serve VmHWM just before the upload
    serve_hwm: int = 0  # cdi serve VmHWM after it (includes the control plane)
    worker_hwm: int = 0  # the largest upload-server VmHWM
    worker_tree: int = 0  # peak RSS of the workers' trees (qemu-img included), summed
    cpu_client: float = 0.0
    cpu_serve: float = 0.0
    cpu_worker: float = 0.0
    cpu_machine: float = 0.0  # the whole machine's busy CPU seconds during the timed region

    @property
    def others(self) -> float:
        """Cores kept busy by everything but this run (other jobs, this script's sampler)."""
        ours = self.cpu_client + self.cpu_serve + self.cpu_worker
        return max(0.0, self.cpu_machine - ours) / self.seconds

    @property
    def mibps(self) -> float:
        return self.bytes / MiB / self.seconds


def run_cp(image: Image, rundir: Path) -> Run:
    rundir.mkdir(parents=True)
    out = rundir / image.path.name
    prewarm(image.path)
    try:
        machine0 = machine_cpu()
        started = time.perf_counter()
        proc = subprocess.Popen(["cp", str(image.path), str(out)])
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise BenchError(f"cp exited {proc.returncode}")
        fsync_file(out)
        seconds = time.perf_counter() - started
        machine = machine_cpu() - machine0
    finally:
        shutil.rmtree(rundir, ignore_errors=True)
    return Run(seconds, image.size, cpu_client=usage.ru_utime + usage.ru_stime,
               cpu_machine=machine)


def run_http(image: Image, sizes: Sizes, rundir: Path, *, via: str, count: int,
             check: bool, every_byte: bool = False) -> Run:
    """COUNT uploads of IMAGE at once, VIA "direct", "local" or "proxy", into fresh
    DataVolumes.  A raw image goes as a sparse stream, as ``cdi image-upload``
    sends it, unless EVERY_BYTE (as a CDI client sends it)."""
    sparse_stream = image.kind == "raw" and not every_byte
    with serving(rundir) as serve:
        names = [f"up-{i}" for i in range(count)]
        for name in names:
            serve.create_dv(name, sizes.volume)
        for name in names:
            serve.wait_phase(name, "UploadReady")
        pods = {name: serve.upload_pod(name) for name in names}
        body = sparse_file(image.path) if sparse_stream else image.path
        kind = (f"Content-Type: {sparse.MEDIA_TYPE}" if sparse_stream
                else "Content-Type: application/octet-stream")
        jobs: list[Job] = []
        if via == "local":
            for name in names:
                jobs.append(Job("http://localhost/v1beta1/upload", body, headers=(kind,),
                                unix_socket=serve.upload_socket(name)))
        elif via == "direct":
            client = serve.data_dir / "uploadserver-client-signer" / "client"
            tls = ("--cacert", str(serve.data_dir / "uploadserver-signer" / "ca.crt"),
                   "--cert", str(client / "tls.crt"), "--key", str(client / "tls.key"))
            for name in names:
                jobs.append(Job(f"https://{pods[name][0]}/v1beta1/upload", body, tls=tls,
                                headers=(kind,)))
        else:
            url, ca = serve.proxy()
            for name in names:
                jobs.append(Job(f"{url}/v1beta1/upload", body, tls=("--cacert", str(ca)),
                                headers=(kind, f"Authorization: Bearer {serve.token(name)}")))
        prewarm(body)
        idle, cpu0 = serve.hwm(), serve.cpu()
        watch = WorkerWatch(serve.pid, [pid for _, pid in pods.values()])
        watch.start()
        machine0 = machine_cpu()
        try:
            seconds, answers = post_all(jobs)
        finally:
            machine = machine_cpu() - machine0
            watch.stop()
        run = Run(seconds, image.size * count, serve_idle=idle, serve_hwm=serve.hwm(),
                  worker_hwm=watch.peak, worker_tree=watch.tree_peak,
                  cpu_client=sum(a.cpu for a in answers), cpu_serve=serve.cpu() - cpu0,
                  cpu_worker=watch.cpu_total, cpu_machine=machine)
        for name in names:
            serve.wait_phase(name, "Succeeded")
        if check:
            for name in names:
                compare(image.reference, serve.volume(name))
    return run


def run_cli(image: Image, sizes: Sizes, rundir: Path, *, check: bool) -> Run:
    """``cdi image-upload`` of IMAGE into a new DataVolume, the whole command timed."""
    with serving(rundir) as serve:
        prewarm(image.path)
        idle, cpu0 = serve.hwm(), serve.cpu()
        watch = WorkerWatch(serve.pid)
        watch.start()
        argv = [sys.executable, "-m", "cdi.cli.main", "image-upload", "dv", "up-cli",
                "--image-path", str(image.path), "--size", sizes.volume, "--wait-secs", "3600"]
        out_path = rundir / "image-upload.log"
        try:
            with out_path.open("wb") as out:
                machine0 = machine_cpu()
                started = time.perf_counter()
                proc = subprocess.Popen(argv, cwd=REPO, env=serve.env, stdin=subprocess.DEVNULL,
                                        stdout=out, stderr=out)
                _, status, usage = os.wait4(proc.pid, 0)
                seconds = time.perf_counter() - started
                machine = machine_cpu() - machine0
                proc.returncode = os.waitstatus_to_exitcode(status)
        finally:
            watch.stop()
        if proc.returncode != 0:
            raise BenchError(f"cdi image-upload exited {proc.returncode}:\n"
                             f"{out_path.read_text(errors='replace')[-2000:]}")
        run = Run(seconds, image.size, serve_idle=idle, serve_hwm=serve.hwm(),
                  worker_hwm=watch.peak, worker_tree=watch.tree_peak,
                  cpu_client=usage.ru_utime + usage.ru_stime, cpu_serve=serve.cpu() - cpu0,
                  cpu_worker=watch.cpu_total, cpu_machine=machine)
        if check:
            compare(image.reference, serve.volume("up-cli"))
    return run


# --- the report ---------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    label: str  # "raw (a) direct"...
    image: str
    side: str  # cp, direct, proxy, cli, 4x proxy
    runs: list[Run]

    @property
    def seconds(self) -> float:
        return statistics.median(r.seconds for r in self.runs)

    @property
    def mibps(self) -> float:
        """Throughput of the median run (MiB of file per second)."""
        return self.runs[0].bytes / MiB / self.seconds

    def peak(self, attr: str) -> int:
        return max(int(getattr(r, attr)) for r in self.runs)

    def cpu(self, attr: str) -> float:
        return float(statistics.median(float(getattr(r, attr)) for r in self.runs))


HEADER = ["case", "file MiB", "median s", "MiB/s", "vs cp", "cdi serve VmHWM MiB (idle)",
          "worker VmHWM MiB", "workers' tree MiB", "CPU s client/serve/worker",
          "others, cores"]


def _mib(n: int) -> str:
    return f"{n / MiB:.0f}" if n else "-"


def row(r: Result, cp: Result | None) -> list[str]:
    if r.side == "cp":
        mem = ["-", "-", "-"]
        cpu = f"{r.cpu('cpu_client'):.1f} (cp)"
    else:
        mem = [f"{_mib(r.peak('serve_hwm'))} ({_mib(r.peak('serve_idle'))})",
               _mib(r.peak("worker_hwm")), _mib(r.peak("worker_tree"))]
        cpu = (f"{r.cpu('cpu_client'):.1f}/{r.cpu('cpu_serve'):.1f}/"
               f"{r.cpu('cpu_worker'):.1f}")
    vs = f"{r.mibps / cp.mibps:.2f}" if cp is not None and r.side != "cp" else "-"
    others = statistics.median(x.others for x in r.runs)
    return [r.label, f"{r.runs[0].bytes / MiB:.0f}", f"{r.seconds:.2f}", f"{r.mibps:.0f}", vs,
            *mem, cpu, f"{others:.2f}"]


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def fmt(r: list[str]) -> str:
        return " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True))

    return "\n".join([fmt(header), "-+-".join("-" * w for w in widths), *map(fmt, rows)])


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


@dataclasses.dataclass
class Bar:
    name: str
    value: str
    bar: str
    ok: bool

    def row(self) -> list[str]:
        return [self.name, self.value, self.bar, "PASS" if self.ok else "FAIL"]


def ratios_and_bars(results: dict[tuple[str, str], Result]) -> tuple[list[list[str]], list[Bar]]:
    ratio_rows: list[list[str]] = []
    bars: list[Bar] = []
    for image in ("raw", "qcow2"):
        sides = {side: results.get((image, side)) for side in ("cp", "direct", "proxy", "cli")}
        cp, direct, proxy, cli = (sides[s] for s in ("cp", "direct", "proxy", "cli"))
        if not (cp and direct and proxy and cli):
            continue

        def ratio(a: Result, b: Result) -> float:
            return a.mibps / b.mibps

        ratio_rows.append([image, f"{ratio(proxy, direct):.2f}", f"{ratio(direct, cp):.2f}",
                           f"{ratio(proxy, cp):.2f}", f"{ratio(cli, cp):.2f}"])
        r = ratio(proxy, direct)
        bars.append(Bar(f"{image}: proxy / direct throughput", f"{r:.2f}",
                        f">= {PROXY_BAR}", r >= PROXY_BAR))
        if image == "raw":
            for side in (direct, proxy):
                r = ratio(side, cp)
                bars.append(Bar(f"raw: {side.side} / cp throughput", f"{r:.2f}",
                                f">= {CP_BAR}", r >= CP_BAR))
    cp, direct0, proxy0 = (results.get(("raw", side)) for side in ("cp", "direct0", "proxy0"))
    if cp and direct0 and proxy0:  # no bar: what a CDI client (every byte) gets
        ratio_rows.append(["raw, every byte (extra)",
                           f"{proxy0.mibps / direct0.mibps:.2f}",
                           f"{direct0.mibps / cp.mibps:.2f}", f"{proxy0.mibps / cp.mibps:.2f}",
                           "-"])
    conc = results.get(("raw", "4x proxy"))
    if conc is not None:
        hwm = conc.peak("serve_hwm")
        bars.append(Bar(f"cdi serve VmHWM, {CONCURRENT} uploads at once (incl. control plane)",
                        f"{hwm / MiB:.0f} MiB", f"< {SERVE_RSS_LIMIT // MiB} MiB",
                        hwm < SERVE_RSS_LIMIT))
    return ratio_rows, bars


RATIO_HEADER = ["image", "(b) proxy / (a) direct", "(a) direct / cp", "(b) proxy / cp",
                "(c) cli / cp"]
BAR_HEADER = ["bar", "measured", "needed", "result"]

NOTES = (
    "Throughput is MiB of the uploaded file per second (the raw file's size counts its holes), "
    "of the median run. Ratios are of throughput, measured in the same run. (a)/(b) time a "
    "sync POST /v1beta1/upload from its first byte to its 200 (written, converted, fsynced); "
    "(c) times the whole cdi image-upload command (DataVolume creation, upload server start, "
    "upload-async, until Succeeded); cp is cp + fsync of the copy and its directory. "
    "cdi serve VmHWM is the whole control plane, the upload proxy included (a fresh cdi serve "
    "per run; idle = just before the upload); worker = the upload server's VmHWM, sampled "
    "every 100 ms; tree = the workers and their children (qemu-img), summed. The (a)/(b) "
    "client is curl -T, one process per upload, sending a raw image as a sparse stream "
    "encoded beforehand (its data only, as cdi image-upload sends it; (a0)/(b0): every byte, "
    "as a CDI client does); "
    "CPU seconds are medians. "
    "'others' is the CPU the rest of the machine used during the run (from /proc/stat, less "
    "the CPU of the client, cdi serve and the workers), in cores: other jobs on the machine."
)


# --- main ---------------------------------------------------------------------------


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


def _describe(run: Run) -> str:
    others = f"  others {run.others:.2f} cores"
    if not run.serve_hwm:
        return f"  CPU cp {run.cpu_client:.1f} s" + others
    return (f"  serve VmHWM {run.serve_hwm / MiB:5.0f} MiB (idle {run.serve_idle / MiB:.0f})"
            f"  worker VmHWM {run.worker_hwm / MiB:4.0f} MiB  tree {run.worker_tree / MiB:4.0f}"
            f"  CPU client/serve/worker {run.cpu_client:.1f}/{run.cpu_serve:.1f}/"
            f"{run.cpu_worker:.1f} s" + others)


def measure(images: tuple[Image, Image], sizes: Sizes, cases: list[str], runs: int,
            runs_dir: Path, say: Callable[[str], None]) -> dict[tuple[str, str], Result]:
    results: dict[tuple[str, str], Result] = {}
    by_kind = {i.kind: i for i in images}

    def record(image: Image, side: str, label: str, i: int, fn: Callable[[Path], Run]) -> None:
        rundir = runs_dir / f"{image.kind}-{side.replace(' ', '')}-{i}"
        shutil.rmtree(rundir, ignore_errors=True)
        run = fn(rundir)
        res = results.setdefault((image.kind, side), Result(label, image.kind, side, []))
        res.runs.append(run)
        check = "  content OK" if i == 0 and side != "cp" else ""
        say(f"  {label:<22} run {i + 1}/{runs} {run.seconds:7.2f} s {run.mibps:6.0f} MiB/s"
            f"{_describe(run)}{check}")

    for kind in ("raw", "qcow2"):
        if kind not in cases:
            continue
        image = by_kind[kind]
        say(f"case {kind} ({image.path.name}, {image.size / MiB:.0f} MiB):")
        for i in range(runs):
            # Alternated within each run, so drift of the machine hits every side alike.
            check = i == 0
            record(image, "cp", f"{kind} cp", i, functools.partial(run_cp, image))
            record(image, "direct", f"{kind} (a) direct", i, functools.partial(
                run_http, image, sizes, via="direct", count=1, check=check))
            record(image, "proxy", f"{kind} (b) proxy", i, functools.partial(
                run_http, image, sizes, via="proxy", count=1, check=check))
            if kind == "raw":
                record(image, "direct0", f"{kind} (a0) direct, every byte (extra)", i,
                       functools.partial(run_http, image, sizes, via="direct", count=1,
                                         check=check, every_byte=True))
                record(image, "proxy0", f"{kind} (b0) proxy, every byte (extra)", i,
                       functools.partial(run_http, image, sizes, via="proxy", count=1,
                                         check=check, every_byte=True))
                record(image, "local", f"{kind} (a') direct, Unix socket (extra)", i,
                       functools.partial(run_http, image, sizes, via="local", count=1,
                                         check=check))
            record(image, "cli", f"{kind} (c) cdi image-upload", i, functools.partial(
                run_cli, image, sizes, check=check))
    if "concurrent" in cases:
        image = by_kind["raw"]
        say(f"case concurrent ({CONCURRENT} x {image.path.name} through the proxy at once):")
        for i in range(runs):
            record(image, "4x proxy", f"raw {CONCURRENT}x (b) proxy", i, functools.partial(
                run_http, image, sizes, via="proxy", count=CONCURRENT, check=i == 0))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                        help="images, run directories, upload-results.md (default .bench/)")
    parser.add_argument("--runs", type=int, default=3, help="runs per side and case (default 3)")
    parser.add_argument("--quick", action="store_true",
                        help=f"a {QUICK.virtual // MiB} MiB image instead of "
                             f"{FULL.virtual // GiB} GiB (a smoke run)")
    parser.add_argument("--cases", default=",".join(CASE_NAMES),
                        help=f"comma-separated subset of {','.join(CASE_NAMES)}")
    args = parser.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASE_NAMES]
    if unknown or not cases or args.runs < 1:
        parser.error(f"unknown cases {unknown}" if unknown else "nothing to run")
    for tool in ("qemu-img", "cp", "setpriv"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed")
    signal.signal(signal.SIGTERM, _terminate)
    sizes = QUICK if args.quick else FULL

    workdir: Path = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "upload").mkdir(exist_ok=True)
    runs_dir = Path(tempfile.mkdtemp(prefix="runs-", dir=workdir / "upload"))

    def say(line: str) -> None:
        print(line, flush=True)

    try:
        raw, qcow2, build_seconds = build_images(workdir / "images", sizes)
        say(f"images: {raw.path} and {qcow2.path.name} "
            f"({f'built in {build_seconds:.0f} s' if build_seconds else 'cached'}); "
            f"DataVolume size {sizes.volume}")
        say(f"runs in {runs_dir}; client: curl -T (a sparse stream encoded beforehand); "
            "cdi serve fresh for every run")
        say("page cache: nothing dropped; each run's source file is read just before it")
        if kernel_reclaims_cache():
            say("note: the kernel's DAMON reclaim is on: cold page cache is paged out within "
                "seconds, so part of a source may still be read from disk")
        with exclusive(workdir / ".measure.lock", say):
            say(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
                f"({os.cpu_count()} CPUs)")
            started = time.perf_counter()
            results = measure((raw, qcow2), sizes, cases, args.runs, runs_dir, say)
            run_seconds = time.perf_counter() - started
    except BenchError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(runs_dir, ignore_errors=True)

    rows = [row(r, results.get((r.image, "cp"))) for r in results.values()]
    ratio_rows, bars = ratios_and_bars(results)
    failed = [b.name for b in bars if not b.ok]
    verdict = f"FAIL: {'; '.join(failed)}" if failed else "PASS: every bar met"
    per_run = "\n".join(f"  {r.label}: {' '.join(f'{x.seconds:.2f}' for x in r.runs)}"
                        for r in results.values())
    say("")
    say(text_table(HEADER, rows))
    say("")
    if ratio_rows:
        say("throughput ratios (same run):")
        say(text_table(RATIO_HEADER, ratio_rows))
        say("")
    say(text_table(BAR_HEADER, [b.row() for b in bars]))
    say("")
    say(NOTES)
    say(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    say(f"measurement {run_seconds:.0f} s, {args.runs} runs per side, "
        f"image {sizes.virtual // MiB} MiB virtual / {sizes.data // MiB} MiB data")
    say("wall times per run (s):\n" + per_run)
    say("")
    say(verdict)
    md = workdir / ("upload-results-quick.md" if args.quick else "upload-results.md")
    md.write_text(
        f"# Upload benchmark\n\n{datetime.datetime.now().isoformat(timespec='seconds')}, "
        f"{args.runs} runs per side, median\n\n{markdown_table(HEADER, rows)}\n\n"
        + (f"{markdown_table(RATIO_HEADER, ratio_rows)}\n\n" if ratio_rows else "")
        + f"{markdown_table(BAR_HEADER, [b.row() for b in bars])}\n\n{NOTES}\n\n"
        f"**{verdict}**\n\n## Wall times per run (s)\n\n```\n{per_run}\n```\n")
    say(f"written: {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
