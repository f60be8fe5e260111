"""The quick start's `cdi demo`, run as a user would."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from importer import qemu_img
from tests.support import images
from tests.support.httpserver import FileServer

MiB = 1 << 20


def test_demo_imports_a_url(http_server: FileServer, tmp_path: Path) -> None:
    raw = images.make_raw(http_server.root / "d.raw", virtual_size=32 * MiB,
                          extents=[(0, 2 * MiB)])
    images.convert(raw, http_server.root / "d.qcow2", "qcow2")
    p = subprocess.run(["cdi", "demo", "--url", http_server.url("d.qcow2"), "--data-dir",
                        str(tmp_path / "demo"), "--size", "64Mi"],
                       capture_output=True, text=True, timeout=120, check=False,
                       env=dict(os.environ, XDG_CONFIG_HOME=str(tmp_path / "config")))
    assert p.returncode == 0, p.stderr
    disk_line = next(line for line in p.stdout.splitlines() if line.startswith("Disk "))
    disk = Path(disk_line.split(maxsplit=1)[1])
    assert disk.is_relative_to(tmp_path / "demo" / "serve" / "volumes")
    assert qemu_img.compare(str(raw), str(disk))
    assert "Succeeded" in p.stdout and "100.0%" in p.stdout
    assert "Virtual    64.0 MiB" in p.stdout
    assert "Allocated  2.0 MiB" in p.stdout


def test_demo_reports_failure(http_server: FileServer, tmp_path: Path) -> None:
    p = subprocess.run(["cdi", "demo", "--url", http_server.url("missing"), "--data-dir",
                        str(tmp_path / "demo")],
                       capture_output=True, text=True, timeout=120, check=False,
                       env=dict(os.environ, XDG_CONFIG_HOME=str(tmp_path / "config")))
    assert p.returncode == 1
    assert p.stderr.strip().endswith(
        "Error: import failed: Unable to connect to http data source: expected status "
        "code 200, got 404. Status: 404 Not Found")
