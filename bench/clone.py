"""Wall time and memory of a host-assisted clone, against cp doing the same copy.

What it measures
    ours  the clone source worker (``python -m importer.clonesource``) sends
          ``disk.raw`` to an upload server in clone mode (``python -m
          importer.uploadserver`` with ``UPLOAD_CLONE=true``), which writes
          ``<data dir>/disk.img`` and fsyncs it before it answers, three ways:
          over the server's Unix socket (``LISTEN_SOCKET``/``UPLOAD_SOCKET``
          in a 0700 directory, plain HTTP: what ``cdi serve`` does, and the
          bar), over mutual TLS on 127.0.0.1 (trustme certificates made for
          the run: what the Kubernetes backend will do), and over plain HTTP
          on 127.0.0.1.  The upload server is started and listening before the
          clock starts (its pod is Ready before the source pod runs); the
          clock runs from starting the source until both processes have
          exited.
    cp    ``cp --sparse=always disk.raw <dir>/disk.img`` on the same disk, then
          fsync of the copy and of its directory, inside the timed region.

    Runs alternate (ours, cp), ``--runs`` of each (default 3), each into a
    fresh directory; the medians and their ratio are reported.  Each run's
    source is read (untimed) just before it, so both sides read it from the
    page cache.  The first run's copy is checked with ``qemu-img compare``.

Memory
    Peak RSS (``VmHWM``) of each worker, from ``wait4``'s ``ru_maxrss``, so it
    is exact, not sampled.  CPU seconds (user + system) of each are printed too.

Zero detection
    The source skips all-zero 64 KiB blocks inside data extents.  Its cost is
    measured in process: ``sparse.data_runs`` over 1 GiB of random data
    (the common case: nothing to skip) and over 1 GiB of zeros, 4 MiB at a time.

The image (cached in ``<workdir>/images``, shared with bench/import_http.py)
    ``disk.raw``  4 GiB virtual, 1 GiB of random data in 4 extents of 256 MiB

Bars (a failed bar prints FAIL, the exit status stays 0; a broken run exits 1):
ours over the Unix socket <= 1.3x cp (median wall time); each worker's VmHWM < 100 MiB; the copy
allocates within 10 % of the 1 GiB of data; bytes sent within 1 % of it.

    python bench/clone.py [--runs N] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import fcntl
import json
import multiprocessing
import os
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing.connection import Connection
from pathlib import Path
from types import FrameType

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from importer import clonesend  # noqa: E402 - after the path is set
from importer.upload import sparse  # noqa: E402

DEFAULT_WORKDIR = REPO / ".bench"
MiB = 1 << 20
GiB = 1 << 30
VIRTUAL_SIZE = 4 * GiB
EXTENT_SIZE = 256 * MiB
EXTENT_OFFSETS = (64 * MiB, 1152 * MiB, 2304 * MiB, 3456 * MiB)  # as bench/import_http.py
SOURCE_DATA = EXTENT_SIZE * len(EXTENT_OFFSETS)
PIECE = 4 * MiB
IMAGE_SIZE = "5Gi"
BAR = 1.3
RSS_LIMIT = 100 * MiB
CLIENT_NAME = "default/source-default/target"
PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy",
                   "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")


class BenchError(Exception):
    """A run that did not produce a correct copy: the measurement is void."""


# --- the image and the certificates -------------------------------------------------------


def build_image(images: Path) -> Path:
    """``disk.raw``, built if missing (atomically, under bench/import_http.py's lock)."""
    images.mkdir(parents=True, exist_ok=True)
    raw = images / "disk.raw"
    with open(images / ".build.lock", "wb") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if raw.exists():
            return raw
        print(f"building {raw} (4 GiB virtual, 1 GiB random data)", flush=True)
        tmp = raw.with_name(raw.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for offset in EXTENT_OFFSETS:
                for pos in range(offset, offset + EXTENT_SIZE, PIECE):
                    os.pwrite(fd, os.urandom(PIECE), pos)
            os.ftruncate(fd, VIRTUAL_SIZE)
        finally:
            os.close(fd)
        tmp.rename(raw)
    return raw


@dataclasses.dataclass(frozen=True)
class Certs:
    ca: Path
    server: Path  # key + chain
    client: Path  # key + chain, CN = CLIENT_NAME


def make_certs(directory: Path) -> Certs:
    import trustme  # a dev dependency: only the benchmark needs it

    ca = trustme.CA()
    certs = Certs(directory / "ca.pem", directory / "server.pem", directory / "client.pem")
    ca.cert_pem.write_to_path(str(certs.ca))
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(certs.server))
    ca.issue_cert("clone-source", common_name=CLIENT_NAME
                  ).private_key_and_cert_chain_pem.write_to_path(str(certs.client))
    return certs


def prewarm(path: Path) -> None:
    """Read the data of PATH so the next run finds it in the page cache (untimed)."""
    buf = bytearray(PIECE)
    fd = os.open(path, os.O_RDONLY)
    try:
        with memoryview(buf) as view:
            for start, length in sparse.extents(fd, os.fstat(fd).st_size):
                for pos in range(start, start + length, PIECE):
                    os.preadv(fd, [view[: min(PIECE, start + length - pos)]], pos)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    for p, flags in ((path, os.O_RDONLY), (path.parent, os.O_RDONLY | os.O_DIRECTORY)):
        fd = os.open(p, flags)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def compare(a: Path, b: Path) -> None:
    p = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(a), str(b)],
                       capture_output=True, check=False)
    if p.returncode != 0:
        raise BenchError(f"CONTENT MISMATCH: {b} differs from {a}: "
                         f"{(p.stdout + p.stderr).decode(errors='replace').strip()}")


# --- one run of each side -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Exit:
    code: int
    max_rss: int  # bytes (ru_maxrss = VmHWM)
    cpu: float  # user + system seconds


def wait(proc: subprocess.Popen[bytes]) -> Exit:
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return Exit(proc.returncode, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime)


@dataclasses.dataclass(frozen=True)
class OursRun:
    seconds: float
    source: Exit
    target: Exit
    sent: int
    allocated: int


def child_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in PROXY_VARIABLES}


def run_ours(raw: Path, certs: Certs, rundir: Path, *, check: bool, tls: bool = True,
             unix: bool = False) -> OursRun:
    """One clone: over mutual TLS (TLS), plain HTTP on 127.0.0.1, or (UNIX) over the
    server's Unix socket, as cdi serve wires it (the server keeps its mTLS TCP port)."""
    data = rundir / "data"
    data.mkdir(parents=True)
    sockets = rundir / "s"
    sockets.mkdir(mode=0o700)
    (rundir / "source").mkdir()
    (rundir / "source" / "disk.img").symlink_to(raw)  # a filesystem volume's image
    address_file = rundir / "address"
    tls_env = {
        "TLS_CERT_FILE": str(certs.server), "TLS_KEY_FILE": str(certs.server),
        "CLIENT_CERT_FILE": str(certs.ca), "CLIENT_NAME": CLIENT_NAME,
    } if tls else {}
    target_env = child_env() | tls_env | {
        "UPLOAD_CLONE": "true", "LISTEN_ADDRESS": "127.0.0.1", "LISTEN_PORT": "0",
        "UPLOAD_ADDRESS_FILE": str(address_file), "UPLOAD_IMAGE_SIZE": IMAGE_SIZE,
        "IMPORTER_DATA_DIR": str(data), "IMPORTER_BLOCK_PATH": str(rundir / "no-block"),
        "IMPORTER_SCRATCH_DIR": str(rundir / "no-scratch"),
        "IMPORTER_TERMINATION_LOG": str(rundir / "target-termination"),
        "IMPORTER_METRICS_ADDRESS": "",
    } | ({"LISTEN_SOCKET": str(sockets / "u.sock")} if unix else {})
    source_tls = {
        "CLIENT_CERT_FILE": str(certs.client), "CLIENT_KEY_FILE": str(certs.client),
        "SERVER_CA_FILE": str(certs.ca),
    } if tls and not unix else {}
    source_env = child_env() | source_tls | {
        "UPLOAD_URL": "", "CLONE_SOURCE_DIR": str(rundir / "source"),
        "IMPORTER_BLOCK_PATH": str(rundir / "no-block"),
        "IMPORTER_TERMINATION_LOG": str(rundir / "source-termination"),
        "IMPORTER_METRICS_ADDRESS": "127.0.0.1:0",
    }
    with open(rundir / "target.log", "wb") as tlog, open(rundir / "source.log", "wb") as slog:
        target = subprocess.Popen([sys.executable, "-m", "importer.uploadserver"], cwd=REPO,
                                  env=target_env, stdin=subprocess.DEVNULL, stdout=tlog,
                                  stderr=tlog)
        source: subprocess.Popen[bytes] | None = None
        try:
            deadline = time.monotonic() + 30
            while not address_file.exists():
                if target.poll() is not None or time.monotonic() > deadline:
                    raise BenchError("the upload server did not start: "
                                     + (rundir / "target.log").read_text()[-2000:])
                time.sleep(0.01)
            scheme = "https" if tls else "http"
            source_env["UPLOAD_URL"] = (f"{scheme}://{address_file.read_text().strip()}"
                                        "/v1beta1/upload")
            if unix:
                source_env["UPLOAD_SOCKET"] = str(sockets / "u.sock")
            prewarm(raw)
            started = time.perf_counter()
            source = subprocess.Popen([sys.executable, "-m", "importer.clonesource"], cwd=REPO,
                                      env=source_env, stdin=subprocess.DEVNULL, stdout=slog,
                                      stderr=slog)
            source_exit = wait(source)
            target_exit = wait(target)
            seconds = time.perf_counter() - started
        finally:
            for p in (source, target):
                if p is not None and p.returncode is None:
                    p.kill()
                    p.wait()
    if source_exit.code != 0 or target_exit.code != 0:
        raise BenchError(f"the clone failed (source {source_exit.code}, target "
                         f"{target_exit.code}):\n"
                         + (rundir / "source.log").read_text()[-2000:]
                         + (rundir / "target.log").read_text()[-2000:])
    result = json.loads((rundir / "source-termination").read_text())
    disk = data / "disk.img"
    if disk.stat().st_size != VIRTUAL_SIZE:
        raise BenchError(f"the copy is {disk.stat().st_size} bytes, not {VIRTUAL_SIZE}")
    if check:
        compare(raw, disk)
    return OursRun(seconds, source_exit, target_exit, int(result["bytesSent"]), allocated(disk))


def run_cp(raw: Path, rundir: Path) -> tuple[float, int]:
    rundir.mkdir(parents=True)
    out = rundir / "disk.img"
    prewarm(raw)
    started = time.perf_counter()
    p = subprocess.run(["cp", "--sparse=always", str(raw), str(out)], check=False)
    if p.returncode != 0:
        raise BenchError(f"cp exited {p.returncode}")
    fsync_file(out)
    return time.perf_counter() - started, allocated(out)


def _sink(conn: Connection, server: str, tls: bool) -> None:
    """Receive one connection's bytes into one buffer, as fast as Python can (no disk)."""
    listener = socket.create_server(("127.0.0.1", 0))
    conn.send(listener.getsockname()[1])
    sock, _ = listener.accept()
    if tls:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(server)
        sock = ctx.wrap_socket(sock, server_side=True)
    buf = bytearray(PIECE)
    with memoryview(buf) as view:
        try:
            while sock.recv_into(view):
                pass
        except ssl.SSLEOFError:  # the sender closed without close_notify: the end
            pass
    conn.send(time.process_time())


def pipe_floor(certs: Certs, *, tls: bool) -> tuple[float, float]:
    """Wall seconds and receiver CPU seconds to push SOURCE_DATA bytes through one
    connection on 127.0.0.1 between two Python processes (TLS as the workers use it, or
    plain TCP), reading and writing nothing but memory: the floor under any transfer."""
    parent, child = multiprocessing.get_context("fork").Pipe()
    proc = multiprocessing.get_context("fork").Process(target=_sink,
                                                       args=(child, str(certs.server), tls))
    proc.start()
    port = parent.recv()
    data = memoryview(os.urandom(PIECE))
    started = time.perf_counter()
    sock = socket.create_connection(("127.0.0.1", port))
    if tls:
        ctx = ssl.create_default_context(cafile=str(certs.ca))
        sock = ctx.wrap_socket(sock, server_hostname="127.0.0.1")
    for _ in range(SOURCE_DATA // PIECE):
        sock.sendall(data)
    sock.close()
    cpu = parent.recv()
    proc.join()
    return time.perf_counter() - started, cpu


def zero_scan_cost() -> tuple[float, float]:
    """Seconds per GiB of data_runs over random data and over zeros (4 MiB at a time)."""
    room = clonesend.ROOM
    buf = bytearray(room + clonesend.CHUNK)
    buf[room:] = os.urandom(clonesend.CHUNK)
    zeros = bytearray(room + clonesend.CHUNK)
    rounds = GiB // clonesend.CHUNK
    out = []
    for b in (buf, zeros):
        started = time.perf_counter()
        for i in range(rounds):
            sparse.data_runs(b, room, clonesend.CHUNK, i * clonesend.CHUNK)
        out.append(time.perf_counter() - started)
    return out[0], out[1]


# --- main ---------------------------------------------------------------------------------


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(f"terminated by signal {signum}")


@contextmanager
def exclusive(path: Path, say: Callable[[str], None]) -> Iterator[None]:
    """One measurement at a time per work directory (the other benchmarks take it too)."""
    with open(path, "wb") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for another benchmark holding {path} to finish")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _say_ours(say: Callable[[str], None], label: str, run: OursRun, checked: bool) -> None:
    say(f"  {label:<10} {run.seconds:6.2f} s  sent {run.sent / MiB:.1f} MiB  allocated "
        f"{run.allocated / MiB:.0f} MiB  VmHWM source {run.source.max_rss / MiB:.1f} / target "
        f"{run.target.max_rss / MiB:.1f} MiB  CPU source {run.source.cpu:.2f} s / target "
        f"{run.target.cpu:.2f} s" + ("  content OK" if checked else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("nothing to run")
    for tool in ("cp", "qemu-img"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed")
    signal.signal(signal.SIGTERM, _terminate)
    workdir: Path = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)

    def say(line: str) -> None:
        print(line, flush=True)

    runs_dir = Path(tempfile.mkdtemp(prefix="clone-runs-", dir=workdir))
    ours: list[OursRun] = []
    local: list[OursRun] = []
    plain: list[OursRun] = []
    cps: list[tuple[float, int]] = []
    floors: list[tuple[float, float]] = []
    plain_floors: list[tuple[float, float]] = []
    try:
        raw = build_image(workdir / "images")
        say(f"image: {raw} (4 GiB virtual, {SOURCE_DATA // MiB} MiB of data)")
        certs = make_certs(runs_dir)
        with exclusive(workdir / ".measure.lock", say):
            say(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
            for i in range(args.runs):
                say(f"run {i + 1}/{args.runs}:")
                run = run_ours(raw, certs, runs_dir / f"unix-{i}", check=i == 0, unix=True)
                shutil.rmtree(runs_dir / f"unix-{i}")
                local.append(run)
                _say_ours(say, "ours unix", run, i == 0)
                run = run_ours(raw, certs, runs_dir / f"ours-{i}", check=False)
                shutil.rmtree(runs_dir / f"ours-{i}")
                ours.append(run)
                _say_ours(say, "ours mTLS", run, False)
                seconds, alloc = run_cp(raw, runs_dir / f"cp-{i}")
                shutil.rmtree(runs_dir / f"cp-{i}")
                cps.append((seconds, alloc))
                say(f"  {'cp':<10} {seconds:6.2f} s  allocated {alloc / MiB:.0f} MiB")
                run = run_ours(raw, certs, runs_dir / f"plain-{i}", check=False, tls=False)
                shutil.rmtree(runs_dir / f"plain-{i}")
                plain.append(run)
                _say_ours(say, "ours HTTP", run, False)
                floors.append(pipe_floor(certs, tls=True))
                plain_floors.append(pipe_floor(certs, tls=False))
                say(f"  {'pipe TLS':<10} {floors[-1][0]:6.2f} s  (receiver CPU "
                    f"{floors[-1][1]:.2f} s)   pipe TCP {plain_floors[-1][0]:.2f} s")
            scan_random, scan_zeros = zero_scan_cost()
            say(f"load average after: {os.getloadavg()[0]:.2f}")
    except BenchError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(runs_dir, ignore_errors=True)

    ours_median = statistics.median(r.seconds for r in ours)
    local_median = statistics.median(r.seconds for r in local)
    cp_median = statistics.median(s for s, _ in cps)
    plain_median = statistics.median(r.seconds for r in plain)
    floor_median = statistics.median(f for f, _ in floors)
    plain_floor_median = statistics.median(f for f, _ in plain_floors)
    ratio = local_median / cp_median
    every = ours + local + plain
    source_rss = max(r.source.max_rss for r in every)
    target_rss = max(r.target.max_rss for r in every)
    alloc = max(r.allocated for r in every)
    sent = max(r.sent for r in every)
    bars = [
        ("time ours (Unix socket, cdi serve) / cp", f"{ratio:.2f}", f"<= {BAR}", ratio <= BAR),
        ("VmHWM clone source", f"{source_rss / MiB:.1f} MiB", "< 100 MiB",
         source_rss < RSS_LIMIT),
        ("VmHWM upload server (clone mode)", f"{target_rss / MiB:.1f} MiB", "< 100 MiB",
         target_rss < RSS_LIMIT),
        ("allocated by the copy", f"{alloc / MiB:.0f} MiB", "1024 MiB +- 10 %",
         abs(alloc - SOURCE_DATA) <= 0.1 * SOURCE_DATA),
        ("bytes sent", f"{sent / MiB:.1f} MiB", "1024 MiB + 1 %",
         SOURCE_DATA <= sent <= 1.01 * SOURCE_DATA),
    ]
    failed = [name for name, _, _, ok in bars if not ok]
    verdict = f"FAIL: {', '.join(failed)}" if failed else "PASS: every bar met"
    table = ["| measure | value | bar | result |", "|---|---|---|---|"]
    table += [f"| {n} | {v} | {b} | {'PASS' if ok else 'FAIL'} |" for n, v, b, ok in bars]
    sides = ["| side (median of the runs) | seconds | vs cp |", "|---|---|---|"]
    for name, value in (("ours, Unix socket (cdi serve; the bar)", local_median),
                        ("ours, mutual TLS (Kubernetes)", ours_median),
                         ("ours, plain HTTP on loopback", plain_median),
                         ("cp --sparse=always + fsync", cp_median),
                         ("floor: 1 GiB through Python TLS, no disk", floor_median),
                         ("floor: 1 GiB through Python TCP, no disk", plain_floor_median)):
        sides.append(f"| {name} | {value:.2f} | {value / cp_median:.2f} |")
    per_run = (f"unix {' '.join(f'{r.seconds:.2f}' for r in local)}; "
               f"mTLS {' '.join(f'{r.seconds:.2f}' for r in ours)}; "
               f"http {' '.join(f'{r.seconds:.2f}' for r in plain)}; "
               f"cp {' '.join(f'{s:.2f}' for s, _ in cps)}; "
               f"tls pipe {' '.join(f'{f:.2f}' for f, _ in floors)}")
    cpu = (f"CPU (median, user+system): Unix socket source "
           f"{statistics.median(r.source.cpu for r in local):.2f} s, target "
           f"{statistics.median(r.target.cpu for r in local):.2f} s; mTLS source "
           f"{statistics.median(r.source.cpu for r in ours):.2f} s, target "
           f"{statistics.median(r.target.cpu for r in ours):.2f} s; plain HTTP source "
           f"{statistics.median(r.source.cpu for r in plain):.2f} s, target "
           f"{statistics.median(r.target.cpu for r in plain):.2f} s; TLS pipe receiver "
           f"{statistics.median(c for _, c in floors):.2f} s")
    scan = (f"zero detection (sparse.data_runs, in process): {scan_random * 1000:.1f} ms "
            f"per GiB of random data, {scan_zeros * 1000:.1f} ms per GiB of zeros")
    say("")
    say("\n".join(sides))
    say("")
    say("\n".join(table))
    say(f"wall times per run (s): {per_run}")
    say(cpu)
    say(scan)
    say(verdict)
    (workdir / "clone-results.md").write_text(
        f"# Host-assisted clone benchmark\n\n"
        f"{datetime.datetime.now().isoformat(timespec='seconds')}, {args.runs} runs per side, "
        f"{os.cpu_count()} CPUs. Source: a filesystem volume's disk.img, 4 GiB virtual, "
        f"1 GiB of data in 4 extents; target: a filesystem volume; a Unix socket or "
        f"127.0.0.1.\n\n"
        + "\n".join(sides) + "\n\n" + "\n".join(table)
        + f"\n\nWall times per run (s): {per_run}\n\n{cpu}\n\n{scan}\n\n**{verdict}**\n")
    say(f"written: {workdir / 'clone-results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
