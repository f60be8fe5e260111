"""``cdi demo``: the quick start's main job, a DataVolume import on the embedded default.

It starts ``cdi serve`` on a data dir of its own, creates a DataVolume through
the REST API, follows it to Succeeded (phase, progress, bytes, rate), and
prints where the disk landed.  With no URL it makes a qcow2 image (random data
in a few extents of a larger virtual disk) and serves it on 127.0.0.1 with
Range support, so it works on a machine without internet access; with
``--url`` it imports that image instead (for example a cloud image).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from aiohttp import web

from cdi.api.kinds import BY_KIND
from cdi.cli import config
from cdi.cli.client import Client, StatusError
from importer import units

MiB = 1 << 20
GiB = 1 << 30
TIMEOUT = 3600.0
GIVE_UP_AFTER = 2  # restarts of a failing worker before the demo gives up


def make_image(directory: Path, *, virtual: int, extents: int, extent_size: int) -> Path:
    """A raw image with EXTENTS runs of random data, converted to qcow2 (cached)."""
    directory.mkdir(parents=True, exist_ok=True)
    raw = directory / "demo.raw"
    qcow2 = directory / "demo.qcow2"
    if qcow2.exists():
        return qcow2
    with raw.open("wb") as f:
        f.truncate(virtual)
        step = virtual // extents
        for i in range(extents):
            f.seek(i * step)
            for _ in range(extent_size // (4 * MiB)):
                f.write(os.urandom(4 * MiB))
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)],
                   check=True)
    raw.unlink()
    return qcow2


@contextmanager
def serve_files(directory: Path) -> Iterator[str]:
    """Serve DIRECTORY on 127.0.0.1 (aiohttp static files: HEAD, Range, ETag)."""
    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_static("/", directory)
    runner = web.AppRunner(app, access_log=None)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = runner.addresses[0][1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.run_until_complete(runner.cleanup())
        loop.close()


@contextmanager
def control_plane(data_dir: Path) -> Iterator[Client]:
    """`cdi serve` on DATA_DIR for the duration, and a client for it."""
    data_dir.mkdir(parents=True, exist_ok=True)
    info_file = data_dir / "server.json"
    info_file.unlink(missing_ok=True)
    log = (data_dir.parent / "serve.log").open("ab")
    # Its own config home: the demo must not repoint the user's `cdi` at a server
    # that stops when the demo ends.
    env = dict(os.environ, XDG_CONFIG_HOME=str(data_dir.parent / "config"))
    proc = subprocess.Popen([sys.executable, "-m", "cdi.cli.main", "serve", "--data-dir",
                             str(data_dir), "--address", "127.0.0.1:0", "--restart-backoff", "2"],
                            stdout=log, stderr=log, env=env)
    log.close()
    try:
        deadline = time.monotonic() + 60
        while not info_file.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise click.ClickException(
                    f"cdi serve did not start; see {data_dir.parent / 'serve.log'}")
            time.sleep(0.05)
        server = config.find_server(data_dir=data_dir)
        with Client(server.url, server.token) as client:
            yield client
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def datavolume(url: str, size: str) -> dict[str, Any]:
    return {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
            "metadata": {"name": "demo", "namespace": "default"},
            "spec": {"source": {"http": {"url": url}},
                     "storage": {"resources": {"requests": {"storage": size}}}}}


def follow(client: Client, started: float) -> dict[str, Any]:
    """Print each change of phase and progress until the DataVolume ends."""
    kind = BY_KIND["DataVolume"]
    last = ""
    while time.monotonic() - started < TIMEOUT:
        dv = client.get(kind, "demo", "default")
        status = dv.get("status", {})
        line = f"{status.get('phase', 'Pending'):<18} {status.get('progress', 'N/A'):>8}"
        transfer = status.get("transfer")
        if transfer and transfer.get("bytesTotal"):
            line += (f"  {units.humanize(transfer.get('bytesRead', 0))} of "
                     f"{units.humanize(transfer.get('bytesTotal', 0))}")
            if transfer.get("bytesPerSecond"):
                line += f", {units.humanize(transfer['bytesPerSecond'])}/s"
        running = {c["type"]: c for c in status.get("conditions", [])}.get("Running", {})
        if running.get("reason") == "Error":
            line += f"  (retrying: {running.get('message')})"
        if line != last:
            click.echo(f"  {time.monotonic() - started:6.1f}s  {line}")
            last = line
        if status.get("phase") in ("Succeeded", "Failed"):
            return dv
        if running.get("reason") == "Error" and status.get("restartCount", 0) >= GIVE_UP_AFTER:
            return dv  # cdi serve would go on retrying; a demo stops and says why
        time.sleep(0.25)
    raise click.ClickException("the import did not finish in time")


@click.command()
@click.option("--url", help="Import this image instead of a generated one.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              help="Where cdi serve keeps its state and volumes (default: a new temporary "
                   "directory).")
@click.option("--size", default="10Gi", show_default=True, help="DataVolume size.")
def demo(url: str | None, data_dir: Path | None, size: str) -> None:
    """Import a disk image into a DataVolume with a local cdi serve, and report."""
    base = data_dir or Path(tempfile.mkdtemp(prefix="cdi-demo-"))
    with control_plane(base / "serve") as client:
        if url is None:
            images = Path(os.environ.get("CDI_DEMO_CACHE", Path.home() / ".cache" / "cdi-demo"))
            click.echo("Making a qcow2 image: 4 GiB virtual, 512 MiB of data ...")
            image = make_image(images, virtual=4 * GiB, extents=4, extent_size=128 * MiB)
            with serve_files(images) as root:
                source = f"{root}/{image.name}"
                dv = _import(client, source, size)
        else:
            source = url
            dv = _import(client, source, size)
        elapsed = dv.pop("_elapsed")
        if dv["status"]["phase"] != "Succeeded":
            running = {c["type"]: c for c in dv["status"].get("conditions", [])}["Running"]
            raise click.ClickException(f"import failed: {running.get('message')}")
        pvc = client.get(BY_KIND["PersistentVolumeClaim"], "demo", "default")
        pv = client.get(BY_KIND["PersistentVolume"], pvc["spec"]["volumeName"])
        disk = Path(pv["spec"]["local"]["path"]) / "disk.img"
        st = disk.stat()
    click.echo("")
    click.echo(f"Imported   {source}")
    click.echo("DataVolume default/demo (claim default/demo)")
    click.echo(f"Disk       {disk}")
    click.echo(f"Virtual    {units.humanize(st.st_size)}")
    click.echo(f"Allocated  {units.humanize(st.st_blocks * 512)}")
    click.echo(f"Time       {elapsed:.2f} s")


def _import(client: Client, source: str, size: str) -> dict[str, Any]:
    click.echo(f"Creating DataVolume demo from {source}")
    started = time.monotonic()
    try:
        client.create(BY_KIND["DataVolume"], datavolume(source, size))
    except StatusError as e:
        raise click.ClickException(str(e)) from e
    dv = follow(client, started)
    dv["_elapsed"] = time.monotonic() - started
    return dv
