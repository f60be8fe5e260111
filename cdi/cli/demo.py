"""``cdi demo``: import a disk image over HTTP with the real worker and report.

With no URL it makes a qcow2 image (random data in a few extents of a larger
virtual disk), serves it on 127.0.0.1 with Range support, and imports it, so
the quick start works on a machine without internet access.  With ``--url`` it
imports that image instead (for example a cloud image).  Either way it prints
where the disk landed, how long it took, and how much of it is allocated.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click
from aiohttp import web

MiB = 1 << 20
GiB = 1 << 30


def make_image(directory: Path, *, virtual: int, extents: int, extent_size: int) -> Path:
    """A raw image with EXTENTS runs of random data, converted to qcow2."""
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
    return qcow2


@contextmanager
def serve(directory: Path) -> Iterator[str]:
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


def run_importer(url: str, data_dir: Path, *, size: int) -> tuple[int, str, float]:
    scratch = data_dir.parent / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    termination = data_dir.parent / "termination-log"
    env = dict(os.environ)
    env.update({
        "IMPORTER_SOURCE": "http",
        "IMPORTER_ENDPOINT": url,
        "IMPORTER_IMAGE_SIZE": str(size),
        "IMPORTER_DATA_DIR": str(data_dir),
        "IMPORTER_SCRATCH_DIR": str(scratch),
        "IMPORTER_BLOCK_PATH": str(data_dir.parent / "no-block-device"),
        "IMPORTER_TERMINATION_LOG": str(termination),
        "IMPORTER_METRICS_ADDRESS": "127.0.0.1:0",
    })
    started = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "importer"], env=env, check=False)
    elapsed = time.monotonic() - started
    message = termination.read_text() if termination.exists() else ""
    return p.returncode, message, elapsed


@click.command()
@click.option("--url", help="Import this image instead of a generated one.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              help="Where the volume goes (default: a new temporary directory).")
@click.option("--size", default="10Gi", show_default=True, help="Volume size.")
def demo(url: str | None, data_dir: Path | None, size: str) -> None:
    """Import a disk image over HTTP onto a local volume and report."""
    from importer import units

    volume_size = units.parse_quantity(size)
    base = data_dir or Path(tempfile.mkdtemp(prefix="cdi-demo-"))
    volume = base / "volume"
    volume.mkdir(parents=True, exist_ok=True)
    if url is None:
        images = Path(os.environ.get("CDI_DEMO_CACHE", Path.home() / ".cache" / "cdi-demo"))
        click.echo("Making a qcow2 image: 4 GiB virtual, 512 MiB of data ...")
        image = make_image(images, virtual=4 * GiB, extents=4, extent_size=128 * MiB)
        with serve(images) as root:
            source = f"{root}/{image.name}"
            click.echo(f"Serving it at {source}")
            rc, message, elapsed = run_importer(source, volume, size=volume_size)
    else:
        source = url
        rc, message, elapsed = run_importer(url, volume, size=volume_size)
    if rc != 0 or '"Import Complete"' not in message:
        raise click.ClickException(f"import failed (exit {rc}): {message}")
    disk = volume / "disk.img"
    st = disk.stat()
    click.echo("")
    click.echo(f"Imported   {source}")
    click.echo(f"Disk       {disk}")
    click.echo(f"Virtual    {units.humanize(st.st_size)}")
    click.echo(f"Allocated  {units.humanize(st.st_blocks * 512)}")
    click.echo(f"Time       {elapsed:.2f} s")
    click.echo(f"Message    {json.loads(message)['message']}")
