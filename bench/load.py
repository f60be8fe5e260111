"""``cdi serve`` under load: many uploads, many imports, many DataVolumes with watches.

What it measures
    Three phases, each against a fresh ``cdi serve`` (``bench/upload.py``'s
    ``Serve``, its data dir under the work directory):

    uploads  N upload DataVolumes (64Mi) are created; once every one is
             ``UploadReady`` N tokens are taken and all N images (8 MiB of
             random data, raw, every byte) are POSTed at once through the one
             upload proxy (``curl -T``, one process each); then until every
             DataVolume is Succeeded.  Every upload server must be up at once,
             so ``cdi serve`` runs with ``--max-workers`` N + 4 (its default,
             twice the CPUs but at least 4, would keep the rest Pending)
    imports  the same kind of image served by a local ``ThreadingHTTPServer``;
             N DataVolumes with ``source.http.url`` are created at once, with
             ``--max-workers`` N + 4 so the N importers do run at once
    dvs      M (1,000) blank 1Mi DataVolumes in one namespace, created from 16
             threads as fast as the API takes them, while 10 watch streams
             (``?watch=true`` from the LIST's resourceVersion) are open on the
             namespace; default ``--max-workers``.  Every watch must see every
             DataVolume reach Succeeded: a missed event is a lost DataVolume

    Content is checked with ``qemu-img compare`` against the source image.
    Every REST request this script makes during a phase is timed (creates,
    token requests, the LIST that waits for the phase, and a GET plus a LIST
    every 0.5 s from a sampler thread); p50/p99 are over all of them, and
    split into creates and reads.  ``cdi serve`` peak RSS is its ``VmHWM``
    (fresh per phase, so the peak of the phase, the upload proxy and the REST
    API included); the workers' is the peak over 100 ms samples of the RSS of
    every worker process tree of ``cdi serve``, summed.

    Why: a control plane that is fast for one DataVolume can still lose watch
    events, fail uploads or grow without bound when a hundred things happen
    at once; this finds out on one machine.

Bars (exit 1 if any fails): per phase, every DataVolume Succeeded, no create or
upload failed, no watch lost an event, no content mismatch.

    python bench/load.py [--uploads 100] [--imports 100] [--dvs 1000] [--quick]
                         [--workdir DIR]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import datetime
import functools
import http.server
import json
import os
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests
from requests.adapters import HTTPAdapter

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import upload as up

MiB = up.MiB
IMAGE_SIZE = 8 * MiB
VOLUME = "64Mi"
BLANK_VOLUME = "1Mi"
CREATORS = 16  # threads creating DataVolumes at once
WATCHES = 10
SAMPLE_EVERY = 0.5  # seconds between the sampler's GET + LIST
PHASE_TIMEOUT = 900.0
WATCH_GRACE = 30.0  # seconds the watches get, after the LIST shows all Succeeded
DV_API = "/apis/cdi.kubevirt.io/v1beta1/namespaces/default/datavolumes"


def serving(root: Path, max_workers: int | None) -> contextlib.AbstractContextManager[up.Serve]:
    """``up.serving`` with a worker limit (``cdi serve``'s default when None)."""
    return up.serving(root, *(["--max-workers", str(max_workers)] if max_workers else []))


class AllWorkers(up.WorkerWatch):
    """WorkerWatch over every child of ``cdi serve`` (importers too, not just upload servers)."""

    def __init__(self, serve_pid: int) -> None:
        super().__init__(serve_pid, [])
        self.most = 0  # the most workers seen alive at once

    def sample(self) -> None:
        children = up._children(self.serve_pid)
        self.most = max(self.most, len(children))
        for pid in children:
            self.hwm.setdefault(pid, 0)
            self.cpu.setdefault(pid, 0.0)
        super().sample()


class Api:
    """The REST API, every request timed; thread-safe (one pooled session)."""

    def __init__(self, serve: up.Serve) -> None:
        self.url = serve.url
        self.session = requests.Session()
        self.session.trust_env = False
        self.session.headers["Authorization"] = serve.session.headers["Authorization"]
        self.session.mount("http://", HTTPAdapter(pool_connections=4, pool_maxsize=64))
        self.latency: dict[str, list[float]] = {"create": [], "get": [], "list": []}

    def call(self, kind: str, method: str, path: str, **kw: Any) -> requests.Response:
        started = time.perf_counter()
        r = self.session.request(method, self.url + path, timeout=60, verify=True, **kw)
        self.latency[kind].append((time.perf_counter() - started) * 1000)
        return r

    def create_dv(self, name: str, source: dict[str, Any], size: str) -> str:
        """'' if created, else the error."""
        dv = {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
              "metadata": {"name": name, "namespace": "default"},
              "spec": {"source": source, "storage": {"resources": {"requests": {"storage": size}}}}}
        try:
            r = self.call("create", "POST", DV_API, json=dv)
        except requests.RequestException as e:
            return f"{name}: {e}"
        return "" if r.status_code == 201 else f"{name}: {r.status_code} {r.text[:300]}"

    def token(self, pvc: str) -> str:
        body = {"apiVersion": "upload.cdi.kubevirt.io/v1beta1", "kind": "UploadTokenRequest",
                "metadata": {"name": pvc, "namespace": "default"}, "spec": {"pvcName": pvc}}
        r = self.call("create", "POST", "/apis/upload.cdi.kubevirt.io/v1beta1/namespaces/default/"
                      "uploadtokenrequests", json=body)
        if r.status_code != 201:
            raise up.BenchError(f"UploadTokenRequest {pvc}: {r.status_code} {r.text[:300]}")
        return str(r.json()["status"]["token"])

    def phases(self) -> tuple[dict[str, str], str]:
        """Each DataVolume's phase, by name, and the LIST's resourceVersion."""
        r = self.call("list", "GET", DV_API)
        if r.status_code != 200:
            raise up.BenchError(f"LIST datavolumes: {r.status_code} {r.text[:300]}")
        data = r.json()
        return ({d["metadata"]["name"]: (d.get("status") or {}).get("phase", "")
                 for d in data["items"]}, str(data["metadata"].get("resourceVersion", "")))

    def wait_all(self, names: list[str], phase: str, timeout: float = PHASE_TIMEOUT
                 ) -> dict[str, str]:
        """LIST every second until every one of NAMES is PHASE (or Failed, or time is up)."""
        deadline = time.monotonic() + timeout
        while True:
            seen, _ = self.phases()
            now = {n: seen.get(n, "") for n in names}
            if all(p in (phase, "Failed") for p in now.values()) or time.monotonic() > deadline:
                return now
            time.sleep(1.0)


class Sampler(threading.Thread):
    """A GET of one DataVolume and a LIST every SAMPLE_EVERY seconds: the API's latency."""

    def __init__(self, api: Api, pick: Callable[[], str | None]) -> None:
        super().__init__(daemon=True)
        self.api, self.pick = api, pick
        self.errors: list[str] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(SAMPLE_EVERY):
            try:
                name = self.pick()
                if name is not None:
                    self.api.call("get", "GET", f"{DV_API}/{name}")
                self.api.call("list", "GET", DV_API)
            except requests.RequestException as e:
                self.errors.append(str(e))

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


class Watcher(threading.Thread):
    """One ``?watch=true`` stream on the namespace's DataVolumes; re-opened from the last
    resourceVersion if the server ends it (counted)."""

    def __init__(self, api: Api, resource_version: str) -> None:
        super().__init__(daemon=True)
        self.api, self.rv = api, resource_version
        self.succeeded: set[str] = set()
        self.reopened = 0
        self.errors: list[str] = []
        self.opened = threading.Event()
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                self._stream()
            except (requests.RequestException, ValueError) as e:
                self.errors.append(str(e))
                time.sleep(0.5)
            if not self.done.is_set():
                self.reopened += 1

    def _stream(self) -> None:
        params = {"watch": "true", "resourceVersion": self.rv, "allowWatchBookmarks": "true"}
        with self.api.session.get(self.api.url + DV_API, params=params, stream=True,
                                  timeout=(10, None), verify=True) as r:
            if r.status_code != 200:
                raise ValueError(f"watch: {r.status_code} {r.text[:300]}")
            self.opened.set()
            for line in r.iter_lines():
                if not line:
                    continue
                event = json.loads(line)
                if event.get("type") == "ERROR":
                    raise ValueError(f"watch ERROR event: {json.dumps(event)[:300]}")
                obj = event.get("object") or {}
                self.rv = str(obj.get("metadata", {}).get("resourceVersion", self.rv))
                if (obj.get("status") or {}).get("phase") == "Succeeded":
                    self.succeeded.add(obj["metadata"]["name"])
                if self.done.is_set():
                    return


@dataclasses.dataclass
class Result:
    phase: str
    requested: int
    max_workers: str
    succeeded: int = 0
    failed: int = 0  # not Succeeded, or its create / upload failed
    lost: int = 0  # (watch, DataVolume) pairs where the watch never saw Succeeded
    mismatches: int = 0
    seconds: float = 0.0
    serve_hwm: int = 0
    serve_idle: int = 0  # cdi serve's VmHWM when the phase starts
    workers_most: int = 0
    workers_peak: int = 0
    latency: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (self.succeeded == self.requested and not self.failed and not self.lost
                and not self.mismatches)


def percentiles(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.0f}/{values[0]:.0f}"
    q = statistics.quantiles(values, n=100, method="inclusive")
    return f"{statistics.median(values):.0f}/{q[98]:.0f}"


def make_image(path: Path) -> Path:
    """IMAGE_SIZE random bytes whose start the importer takes for no known format."""
    if path.exists() and path.stat().st_size == IMAGE_SIZE:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    data = os.urandom(IMAGE_SIZE)
    while up._looks_like_image(data[:512]):
        data = os.urandom(IMAGE_SIZE)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.rename(path)
    return path


def create_all(api: Api, names: list[str], source: dict[str, Any], size: str,
               created: list[str] | None = None) -> list[str]:
    """Create the DataVolumes from CREATORS threads; the errors."""
    def one(name: str) -> str:
        error = api.create_dv(name, source, size)
        if not error and created is not None:
            created.append(name)
        return error

    with concurrent.futures.ThreadPoolExecutor(CREATORS) as pool:
        return [e for e in pool.map(one, names) if e]


def verify(serve: up.Serve, names: list[str], phases: dict[str, str], image: Path,
           result: Result) -> None:
    """Count the Succeeded, the rest as failed, and compare every Succeeded volume."""
    for name in names:
        if phases.get(name) != "Succeeded":
            result.failed += 1
            continue
        result.succeeded += 1
        try:
            up.compare(image, serve.volume(name))
        except up.BenchError as e:
            result.mismatches += 1
            result.notes.append(str(e)[:300])


def finish(result: Result, serve: up.Serve, api: Api, workers: AllWorkers, sampler: Sampler,
           started: float) -> None:
    result.seconds = time.perf_counter() - started
    sampler.stop()
    workers.stop()
    result.serve_hwm = serve.hwm()
    result.workers_peak = workers.tree_peak
    result.workers_most = workers.most
    result.latency = api.latency
    if sampler.errors:
        result.notes.append(f"sampler errors: {len(sampler.errors)}, first: {sampler.errors[0]}")


def note_failures(result: Result, what: str, errors: list[str]) -> None:
    if errors:
        result.notes.append(f"{len(errors)} {what} failed; first: {errors[0][:400]}")


def phase_uploads(root: Path, count: int, image: Path, say: Callable[[str], None]) -> Result:
    workers = count + 4
    result = Result("uploads", count, str(workers))
    names = [f"up-{i:04d}" for i in range(count)]
    with serving(root / "uploads", workers) as serve:
        api = Api(serve)
        result.serve_idle = serve.hwm()
        watch = AllWorkers(serve.pid)
        sampler = Sampler(api, lambda: names[0])
        watch.start()
        sampler.start()
        started = time.perf_counter()
        errors = create_all(api, names, {"upload": {}}, VOLUME)
        note_failures(result, "creates", errors)
        ready = api.wait_all(names, "UploadReady")
        up_ready = [n for n in names if ready[n] == "UploadReady"]
        say(f"  {len(up_ready)}/{count} UploadReady after {time.perf_counter() - started:.1f} s")
        url, ca = serve.proxy()
        jobs = {n: up.Job(f"{url}/v1beta1/upload", image, tls=("--cacert", str(ca)),
                          headers=("Content-Type: application/octet-stream",
                                   f"Authorization: Bearer {api.token(n)}"))
                for n in up_ready}
        result.notes.append(f"cdi serve VmHWM with every upload server up, before the POSTs: "
                            f"{serve.hwm() / MiB:.0f} MiB")
        answers: dict[str, up.Posted | BaseException] = {}
        barrier = threading.Barrier(len(jobs) + 1)

        def post(name: str) -> None:
            barrier.wait()
            try:
                answers[name] = up.post_file(jobs[name])
            except BaseException as e:
                answers[name] = e

        threads = [threading.Thread(target=post, args=(n,), daemon=True) for n in jobs]
        for t in threads:
            t.start()
        barrier.wait()
        posted = time.perf_counter()
        for t in threads:
            t.join()
        say(f"  {len(jobs)} uploads answered in {time.perf_counter() - posted:.1f} s")
        bad = [f"{n}: {a!r}" if not isinstance(a, up.Posted) else f"{n}: {a.status} {a.text}"
               for n, a in answers.items() if not isinstance(a, up.Posted) or a.status != 200]
        note_failures(result, "uploads", bad)
        phases = api.wait_all(names, "Succeeded")
        finish(result, serve, api, watch, sampler, started)
        verify(serve, names, phases, image, result)
    return result


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def http_server(directory: Path) -> Iterator[str]:
    handler = functools.partial(_Quiet, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def phase_imports(root: Path, count: int, image: Path, say: Callable[[str], None]) -> Result:
    workers = count + 4
    result = Result("imports", count, str(workers))
    names = [f"imp-{i:04d}" for i in range(count)]
    with http_server(image.parent) as base, serving(root / "imports", workers) as serve:
        api = Api(serve)
        result.serve_idle = serve.hwm()
        watch = AllWorkers(serve.pid)
        sampler = Sampler(api, lambda: names[0])
        watch.start()
        sampler.start()
        started = time.perf_counter()
        errors = create_all(api, names, {"http": {"url": f"{base}/{image.name}"}}, VOLUME)
        note_failures(result, "creates", errors)
        say(f"  {count - len(errors)} created in {time.perf_counter() - started:.1f} s")
        phases = api.wait_all(names, "Succeeded")
        finish(result, serve, api, watch, sampler, started)
        verify(serve, names, phases, image, result)
    return result


def phase_dvs(root: Path, count: int, say: Callable[[str], None]) -> Result:
    result = Result("dvs", count, "default")
    names = [f"dv-{i:05d}" for i in range(count)]
    created: list[str] = []
    with serving(root / "dvs", None) as serve:
        api = Api(serve)
        result.serve_idle = serve.hwm()
        _, rv = api.phases()
        watchers = [Watcher(api, rv) for _ in range(WATCHES)]
        for w in watchers:
            w.start()
        for w in watchers:
            if not w.opened.wait(30):
                raise up.BenchError(f"a watch did not open: {w.errors}")
        watch = AllWorkers(serve.pid)
        sampler = Sampler(api, lambda: created[0] if created else None)
        watch.start()
        sampler.start()
        started = time.perf_counter()
        errors = create_all(api, names, {"blank": {}}, BLANK_VOLUME, created)
        note_failures(result, "creates", errors)
        say(f"  {len(created)} created in {time.perf_counter() - started:.1f} s")
        phases = api.wait_all(names, "Succeeded")
        finish(result, serve, api, watch, sampler, started)
        done = {n for n, p in phases.items() if p == "Succeeded"}
        result.succeeded = len(done)
        result.failed = count - len(done)
        deadline = time.monotonic() + WATCH_GRACE
        while time.monotonic() < deadline and any(done - w.succeeded for w in watchers):
            time.sleep(0.2)
        for i, w in enumerate(watchers):
            w.done.set()
            missed = sorted(done - w.succeeded)
            result.lost += len(missed)
            if missed:
                result.notes.append(f"watch {i} missed {len(missed)} Succeeded, e.g. "
                                    f"{missed[:5]}; errors {w.errors[:2]}")
            if w.reopened:
                result.notes.append(f"watch {i} was ended by the server and re-opened "
                                    f"{w.reopened} times")
    return result


HEADER = ["phase", "requested", "Succeeded", "failed", "watch lost", "mismatches",
          "wall s", "max workers (most at once)", "cdi serve VmHWM MiB (idle)",
          "workers peak RSS MiB", "REST reqs", "REST p50/p99 ms", "creates p50/p99",
          "GET p50/p99", "LIST p50/p99", "result"]


def row(r: Result) -> list[str]:
    every = [x for values in r.latency.values() for x in values]
    return [r.phase, str(r.requested), str(r.succeeded), str(r.failed), str(r.lost),
            str(r.mismatches), f"{r.seconds:.1f}", f"{r.max_workers} ({r.workers_most})",
            f"{r.serve_hwm / MiB:.0f} ({r.serve_idle / MiB:.0f})",
            f"{r.workers_peak / MiB:.0f}", str(len(every)), percentiles(every),
            *(percentiles(r.latency.get(k, [])) for k in ("create", "get", "list")),
            "PASS" if r.ok else "FAIL"]


NOTES = (
    "wall s: from the first create until the LIST shows every DataVolume Succeeded (uploads: "
    "creates, UploadReady, tokens, the N POSTs at once, Succeeded). failed: not Succeeded, "
    "or its create or upload failed. watch lost: (watch, DataVolume) pairs where the watch "
    f"never saw Succeeded ({WATCHES} watches). REST latency: every request this script made "
    "to the API during the phase (creates: DataVolumes and upload tokens; the waiting LIST "
    f"every 1 s; a sampler's GET of one DataVolume + LIST every {SAMPLE_EVERY} s). cdi serve "
    "VmHWM includes the upload proxy (idle: when the phase starts); workers peak RSS: every "
    "worker tree of cdi serve, summed, sampled every 100 ms, as is 'most at once'. Bars: "
    "failed, watch lost and mismatches all 0."
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--uploads", type=int, default=100)
    parser.add_argument("--imports", type=int, default=100)
    parser.add_argument("--dvs", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="10 uploads, 10 imports, 100 DVs")
    parser.add_argument("--workdir", type=Path, default=up.DEFAULT_WORKDIR,
                        help="images, run directories, load-results.md (default .bench/)")
    args = parser.parse_args(argv)
    if args.quick:
        args.uploads, args.imports, args.dvs = 10, 10, 100
    for tool in ("qemu-img", "curl"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed")
    workdir: Path = args.workdir.resolve()
    root = workdir / "load"
    shutil.rmtree(root, ignore_errors=True)
    image = make_image(workdir / "images" / "load-8m.raw")

    def say(line: str) -> None:
        print(line, flush=True)

    say(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
        f"({os.cpu_count()} CPUs); image {image} ({IMAGE_SIZE // MiB} MiB random)")
    results: list[Result] = []
    try:
        for label, n, fn in (
                ("uploads", args.uploads, functools.partial(phase_uploads, root, args.uploads,
                                                            image, say)),
                ("imports", args.imports, functools.partial(phase_imports, root, args.imports,
                                                            image, say)),
                ("dvs", args.dvs, functools.partial(phase_dvs, root, args.dvs, say))):
            if n <= 0:
                continue
            say(f"phase {label}: {n}")
            r = fn()
            results.append(r)
            say(f"  {r.succeeded}/{r.requested} Succeeded in {r.seconds:.1f} s, "
                f"{'PASS' if r.ok else 'FAIL'}")
    except up.BenchError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 1
    rows = [row(r) for r in results]
    notes = [f"{r.phase}: {n}" for r in results for n in r.notes]
    failed = [r.phase for r in results if not r.ok]
    verdict = f"FAIL: {', '.join(failed)}" if failed else "PASS: every bar held"
    say("")
    say(up.text_table(HEADER, rows))
    say("")
    for n in notes:
        say(n)
    say(NOTES)
    say(verdict)
    md = workdir / ("load-results-quick.md" if args.quick else "load-results.md")
    md.write_text(
        f"# Load benchmark\n\n{datetime.datetime.now().isoformat(timespec='seconds')}, "
        f"{os.cpu_count()} CPUs\n\n{up.markdown_table(HEADER, rows)}\n\n"
        + "".join(f"- {n}\n" for n in notes) + f"\n{NOTES}\n\n**{verdict}**\n")
    say(f"written: {md}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
