"""Progress metrics, served over HTTP on loopback and HTTPS elsewhere."""

from __future__ import annotations

import re
import ssl
import urllib.request
from pathlib import Path

from importer import progress


def _scrape(url: str, context: ssl.SSLContext | None = None) -> str:
    with urllib.request.urlopen(url, timeout=5, context=context) as r:  # noqa: S310
        return str(r.read().decode())


def test_counters(tmp_path: Path) -> None:
    p = progress.Progress("uid-1")
    p.set_total(1000)
    p.set_phase("transfer")
    p.add_read(250)
    p.add_read(250)
    p.set_percent(10)  # never goes back
    address_file = tmp_path / "addr"
    server = progress.serve(p, "127.0.0.1:0", address_file)
    try:
        text = _scrape(f"http://{address_file.read_text().strip()}/metrics")
    finally:
        server.shutdown()
        server.server_close()
    # The line CDI's controller parses.
    assert re.search(r'^kubevirt_cdi_import_progress_total\{ownerUID="uid-1"\} 50\.0$', text,
                     re.M)
    assert 'kubevirt_cdi_import_bytes_read{ownerUID="uid-1"} 500.0' in text
    assert 'kubevirt_cdi_import_bytes_expected{ownerUID="uid-1"} 1000.0' in text
    assert 'kubevirt_cdi_import_phase{kubevirt_cdi_import_phase="transfer",ownerUID="uid-1"} 1.0' \
        in text


def test_tls_beyond_loopback(tmp_path: Path) -> None:
    p = progress.Progress("uid-2")
    p.set_percent(42)
    address_file = tmp_path / "addr"
    server = progress.serve(p, ":0", address_file)
    port = address_file.read_text().strip().rpartition(":")[2]
    try:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        text = _scrape(f"https://127.0.0.1:{port}/metrics", ctx)
    finally:
        server.shutdown()
        server.server_close()
    assert 'kubevirt_cdi_import_progress_total{ownerUID="uid-2"} 42.0' in text
