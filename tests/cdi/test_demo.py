"""The quick start's `cdi demo`, run as a user would."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.support import images
from tests.support.httpserver import FileServer

MiB = 1 << 20


def test_demo_imports_a_url(http_server: FileServer, tmp_path: Path) -> None:
    raw = images.make_raw(http_server.root / "d.raw", virtual_size=32 * MiB,
                          extents=[(0, 2 * MiB)])
    images.convert(raw, http_server.root / "d.qcow2", "qcow2")
    p = subprocess.run(["cdi", "demo", "--url", http_server.url("d.qcow2"), "--data-dir",
                        str(tmp_path / "demo"), "--size", "64Mi"],
                       capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 0, p.stderr
    disk = tmp_path / "demo" / "volume" / "disk.img"
    assert f"Disk       {disk}" in p.stdout
    assert "Virtual    64.0 MiB" in p.stdout
    assert "Allocated  2.0 MiB" in p.stdout
    assert "Message    Import Complete" in p.stdout


def test_demo_reports_failure(http_server: FileServer, tmp_path: Path) -> None:
    p = subprocess.run(["cdi", "demo", "--url", http_server.url("missing"), "--data-dir",
                        str(tmp_path / "demo")],
                       capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 1
    assert p.stderr.strip().endswith(
        "Error: import failed (exit 1): Unable to connect to http data source: expected status "
        "code 200, got 404. Status: 404 Not Found")
