"""What the embedded control plane costs on top of its workers.

Creates N blank 1 MiB DataVolumes in one ``cdi apply`` against a real
``cdi serve`` and times until every one is Succeeded; then runs the same N
blank worker processes directly, with the same number at once as the pod
runner allows, and prints the ratio, the per-DataVolume overhead, the CPU
seconds and the peak RSS of ``cdi serve`` itself.  Bars: the control plane
adds under 2x on top of the workers; ``cdi serve`` stays under 300 MiB RSS.

    python bench/control_plane.py [--count 500] [--workdir .bench/control-plane]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

MiB = 1 << 20
CLK_TCK = os.sysconf("SC_CLK_TCK")


def start_server(data_dir: Path, config_home: Path, max_workers: int) -> subprocess.Popen[bytes]:
    env = dict(os.environ, XDG_CONFIG_HOME=str(config_home))
    log = (data_dir.parent / "serve.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "cdi.cli.main", "serve", "--data-dir",
                             str(data_dir), "--address", "127.0.0.1:0", "--max-workers",
                             str(max_workers)], env=env, stdout=log, stderr=log)
    log.close()
    deadline = time.monotonic() + 60
    while not (data_dir / "server.json").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("cdi serve did not start; see serve.log")
        time.sleep(0.05)
    return proc


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime of the process itself


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def manifests(count: int) -> str:
    docs = [{"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
             "metadata": {"name": f"blank-{i:04d}", "namespace": "default"},
             "spec": {"source": {"blank": {}},
                      "storage": {"resources": {"requests": {"storage": "1Mi"}}}}}
            for i in range(count)]
    return "\n---\n".join(json.dumps(d) for d in docs)


def control_plane(workdir: Path, count: int, max_workers: int) -> tuple[float, float, float]:
    data_dir = workdir / "data"
    proc = start_server(data_dir, workdir / "config", max_workers)
    try:
        info = json.loads((data_dir / "server.json").read_text())
        session = requests.Session()
        session.headers["Authorization"] = "Bearer " + Path(info["token_file"]).read_text().strip()
        file = workdir / "dvs.yaml"
        file.write_text(manifests(count))
        env = dict(os.environ, XDG_CONFIG_HOME=str(workdir / "config"), CDI_DATA_DIR=str(data_dir))
        cpu0 = cpu_seconds(proc.pid)
        started = time.monotonic()
        subprocess.run(["cdi", "apply", "-f", str(file)], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        url = info["url"] + "/apis/cdi.kubevirt.io/v1beta1/namespaces/default/datavolumes"
        while True:
            items = session.get(url, timeout=30).json()["items"]
            done = sum(1 for d in items if d.get("status", {}).get("phase") == "Succeeded")
            if done == count:
                break
            time.sleep(0.5)
        elapsed = time.monotonic() - started
        return elapsed, cpu_seconds(proc.pid) - cpu0, peak_rss_mib(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def one_worker(root: Path, i: int) -> None:
    d = root / f"w{i}"
    (d / "data").mkdir(parents=True)
    env = dict(os.environ, IMPORTER_SOURCE="none", IMPORTER_IMAGE_SIZE=str(MiB + MiB // 16),
               FILESYSTEM_OVERHEAD="0.06", IMPORTER_DATA_DIR=str(d / "data"),
               IMPORTER_BLOCK_PATH=str(d / "none"), IMPORTER_SCRATCH_DIR=str(d / "none"),
               IMPORTER_TERMINATION_LOG=str(d / "msg"), IMPORTER_METRICS_ADDRESS="127.0.0.1:0",
               IMPORTER_METRICS_ADDRESS_FILE=str(d / "addr"))
    subprocess.run(["setpriv", "--pdeathsig", "TERM", "--", sys.executable, "-m", "importer"],
                   env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def direct(workdir: Path, count: int, max_workers: int) -> float:
    root = workdir / "direct"
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers) as pool:
        list(pool.map(lambda i: one_worker(root, i), range(count)))
    return time.monotonic() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=500)
    ap.add_argument("--workdir", type=Path, default=Path(".bench/control-plane"))
    ap.add_argument("--max-workers", type=int, default=max(4, 2 * (os.cpu_count() or 1)))
    args = ap.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    cp, cpu, rss = control_plane(args.workdir, args.count, args.max_workers)
    base = direct(args.workdir, args.count, args.max_workers)
    ratio = cp / base
    rows = [
        ("DataVolumes", f"{args.count} blank, 1 MiB, one apply"),
        ("workers at once", str(args.max_workers)),
        ("control plane: until all Succeeded", f"{cp:.1f} s"),
        ("the same workers run directly", f"{base:.1f} s"),
        ("ratio", f"{ratio:.2f} (bar < 2.0) {'PASS' if ratio < 2 else 'FAIL'}"),
        ("overhead per DataVolume", f"{(cp - base) / args.count * 1000:.0f} ms"),
        ("cdi serve CPU", f"{cpu:.1f} s ({cpu / args.count * 1000:.0f} ms per DataVolume)"),
        ("cdi serve peak RSS", f"{rss:.0f} MiB (bar < 300) {'PASS' if rss < 300 else 'FAIL'}"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    shutil.rmtree(args.workdir / "direct", ignore_errors=True)


if __name__ == "__main__":
    main()
