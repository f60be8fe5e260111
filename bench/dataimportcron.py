"""What 1,000 DataImportCrons on a one-minute schedule cost `cdi serve` when nothing changes.

The steady state of a fleet of golden images: every cron polls its tag each
minute and the digest is the one already imported.  Set-up (not measured): a
real docker-registry (Debian's, ``tests/support/registry.py``) with one tiny
containerdisk; a real ``cdi serve``; for each cron its import claim
``<managedDataSource>-<12 hex of the digest>`` is created first, so when the
cron's first poll finds the digest it reuses that claim (as CDI reuses an
existing claim of the import's name) instead of running 1,000 identical
imports; then the crons (``* * * * *``) are created and every one is waited for
until UpToDate.  Measured, over whole cycles from one half-minute to the next:

- manifest requests at the registry per cron per cycle, from the registry's
  access log (the cron polls with ``HEAD /v2/<repo>/manifests/<tag>``; bar:
  exactly 1);
- ``cdi serve`` CPU seconds per cycle, its own utime+stime from /proc (bar: under
  5 % of one core averaged over the minute, i.e. < 3 s);
- ``cdi serve`` peak RSS (VmHWM), and how long after the minute the last poll of
  the cycle reached the registry (the cycle's spread);
- that no DataVolume was created and every cron is still UpToDate.

    python bench/dataimportcron.py [--crons 1000] [--cycles 3] [--quick]
        [--workdir .bench/dataimportcron] [--py-spy]

``--quick``: 50 crons, one cycle.  ``--py-spy``: profile ``cdi serve`` with
py-spy during the measured cycles (collapsed stacks, ``<workdir>/profile.txt``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from importer import containerdisk  # noqa: E402 - after the path is set
from tests.support import images  # noqa: E402
from tests.support.registry import Registry  # noqa: E402

MiB = 1 << 20
CLK_TCK = os.sysconf("SC_CLK_TCK")
REPOSITORY = "bench/golden"
CPU_BAR = 3.0  # CPU seconds per one-minute cycle: 5 % of one core
_HEAD_LINE = re.compile(r'\[([^\]]+)\] "HEAD /v2/' + re.escape(REPOSITORY)
                        + r'/manifests/latest HTTP/[\d.]+" (\d{3}) ')


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def polls(registry: Registry) -> list[datetime.datetime]:
    """Times of the manifest HEADs the registry answered (its access log, 1 s resolution)."""
    text = registry.log.read_text(errors="replace")
    return [datetime.datetime.strptime(t, "%d/%b/%Y:%H:%M:%S %z")
            for t, status in _HEAD_LINE.findall(text) if status == "200"]


class Serve:
    def __init__(self, workdir: Path) -> None:
        self.data_dir = workdir / "data"
        env = dict(os.environ, XDG_CONFIG_HOME=str(workdir / "config"))
        log = (workdir / "serve.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cdi.cli.main", "serve", "--data-dir", str(self.data_dir),
             "--address", "127.0.0.1:0"], env=env, stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + 60
        while not (self.data_dir / "server.json").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"cdi serve did not start; see {workdir / 'serve.log'}")
            time.sleep(0.05)
        info = json.loads((self.data_dir / "server.json").read_text())
        self.url = info["url"]
        self.session = requests.Session()
        self.session.headers["Authorization"] = \
            "Bearer " + Path(info["token_file"]).read_text().strip()
        self.session.verify = False if self.url.startswith("https") else True

    def path(self, group: str, plural: str, name: str = "", ns: str | None = "default") -> str:
        base = "/api/v1" if group == "" else f"/apis/{group}"
        where = f"/namespaces/{ns}" if ns else ""
        return f"{self.url}{base}{where}/{plural}" + (f"/{name}" if name else "")

    def create(self, group: str, plural: str, obj: dict[str, Any]) -> None:
        r = self.session.post(self.path(group, plural), json=obj, timeout=60)
        if r.status_code not in (201, 409):
            raise SystemExit(f"creating {plural}: {r.status_code} {r.text[:300]}")

    def items(self, group: str, plural: str) -> list[dict[str, Any]]:
        r = self.session.get(self.path(group, plural), timeout=120)
        r.raise_for_status()
        items: list[dict[str, Any]] = r.json()["items"]
        return items

    def stop(self) -> None:
        self.session.close()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _up_to_date(cron: dict[str, Any]) -> bool:
    return any(c.get("type") == "UpToDate" and c.get("status") == "True"
               for c in (cron.get("status") or {}).get("conditions") or [])


def _wait(what: str, check: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        done, total = check()
        if done == total:
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out: {what}: {done}/{total}")
        time.sleep(2)


def set_up(serve: Serve, registry: Registry, digest: str, crons: int) -> float:
    """Claims first, then crons; returns the seconds until every cron is UpToDate."""
    started = time.monotonic()
    r = serve.session.patch(serve.path("cdi.kubevirt.io/v1beta1", "cdiconfigs", "config", None),
                            json={"spec": {"insecureRegistries": [registry.host]}},
                            headers={"Content-Type": "application/merge-patch+json"}, timeout=30)
    r.raise_for_status()
    suffix = digest.removeprefix("sha256:")[:12]
    url = f"docker://{registry.ref(REPOSITORY)}"

    def claim(i: int) -> None:
        serve.create("", "persistentvolumeclaims", {
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": f"golden-{i:04d}-{suffix}", "namespace": "default"},
            "spec": {"accessModes": ["ReadWriteOnce"],
                     "resources": {"requests": {"storage": "1Mi"}}}})

    def cron(i: int) -> None:
        serve.create("cdi.kubevirt.io/v1beta1", "dataimportcrons", {
            "apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataImportCron",
            "metadata": {"name": f"cron-{i:04d}", "namespace": "default"},
            "spec": {"schedule": "* * * * *", "managedDataSource": f"golden-{i:04d}",
                     "template": {"spec": {"source": {"registry": {"url": url}},
                                           "storage": {"resources": {
                                               "requests": {"storage": "1Mi"}}}}}}})

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(claim, range(crons)))
    _wait("claims Bound", lambda: (sum(
        1 for p in serve.items("", "persistentvolumeclaims")
        if (p.get("status") or {}).get("phase") == "Bound"), crons), 600)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(cron, range(crons)))
    _wait("crons UpToDate", lambda: (sum(
        1 for c in serve.items("cdi.kubevirt.io/v1beta1", "dataimportcrons")
        if _up_to_date(c)), crons), 900)
    return time.monotonic() - started


def sleep_until(t: float) -> None:
    while (left := t - time.time()) > 0:
        time.sleep(min(left, 5))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--crons", type=int, default=1000)
    ap.add_argument("--cycles", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="50 crons, one cycle")
    ap.add_argument("--workdir", type=Path, default=Path(".bench/dataimportcron"))
    ap.add_argument("--py-spy", action="store_true", help="profile cdi serve with py-spy")
    args = ap.parse_args()
    if args.quick:
        args.crons, args.cycles = 50, 1
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    load_before = os.getloadavg()

    registry = Registry(args.workdir / "registry").start()
    serve: Serve | None = None
    spy: subprocess.Popen[bytes] | None = None
    try:
        disk = images.make_raw(args.workdir / "disk.raw", virtual_size=MiB,
                               extents=[(0, 64 << 10)])
        digest = containerdisk.publish(disk, registry.ref(REPOSITORY), insecure=True)
        serve = Serve(args.workdir)
        setup = set_up(serve, registry, digest, args.crons)

        # Whole cycles, from a half-minute to a half-minute (runs fire on the minute),
        # after one whole cycle left to settle (the set-up's last writes, first GCs).
        now = time.time()
        t0 = (now // 60 + 1) * 60 + 30
        while t0 - now < 60 + 30 * (not args.quick):
            t0 += 60
        sleep_until(t0)
        if args.py_spy:
            spy = subprocess.Popen(["py-spy", "record", "-f", "raw",
                                    "-o", str(args.workdir / "profile.txt"),
                                    "-p", str(serve.proc.pid), "-d", str(args.cycles * 60)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cpu0 = cpu_seconds(serve.proc.pid)
        start = datetime.datetime.fromtimestamp(t0, datetime.UTC)
        sleep_until(t0 + args.cycles * 60)
        cpu = cpu_seconds(serve.proc.pid) - cpu0
        end = datetime.datetime.fromtimestamp(t0 + args.cycles * 60, datetime.UTC)
        rss = peak_rss_mib(serve.proc.pid)
        times = [t for t in polls(registry) if start <= t < end]
        spread = max((t.second for t in times), default=0)  # seconds after the minute
        dvs = len(serve.items("cdi.kubevirt.io/v1beta1", "datavolumes"))
        current = sum(1 for c in serve.items("cdi.kubevirt.io/v1beta1", "dataimportcrons")
                      if _up_to_date(c))
    finally:
        if spy is not None:
            spy.wait(timeout=120)
        if serve is not None:
            serve.stop()
        registry.stop()
    load_after = os.getloadavg()

    per_cron = len(times) / (args.crons * args.cycles)
    per_cycle = cpu / args.cycles
    rows = [
        ("crons", f"{args.crons}, schedule '* * * * *', one tag, digest unchanged"),
        ("set-up (claims, crons, first polls)", f"{setup:.0f} s"),
        ("cycles measured", f"{args.cycles} ({start:%H:%M:%S}-{end:%H:%M:%S} UTC)"),
        ("manifest requests per cron per cycle",
         f"{per_cron:.3f} ({len(times)} in all) (bar: 1) "
         f"{'PASS' if len(times) == args.crons * args.cycles else 'FAIL'}"),
        ("cdi serve CPU per cycle",
         f"{per_cycle:.2f} s = {per_cycle / 60 * 100:.1f} % of a core (bar < {CPU_BAR:.0f} s) "
         f"{'PASS' if per_cycle < CPU_BAR else 'FAIL'}"),
        ("cdi serve CPU per poll", f"{cpu / max(len(times), 1) * 1000:.2f} ms"),
        ("last poll of a cycle", f"{spread} s after the minute"),
        ("cdi serve peak RSS", f"{rss:.0f} MiB"),
        ("DataVolumes created", str(dvs)),
        ("crons UpToDate at the end", f"{current}/{args.crons}"),
        ("load average before / after",
         f"{load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f} / "
         f"{load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()
