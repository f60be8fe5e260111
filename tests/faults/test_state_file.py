"""A damaged state file: ``cdi serve`` refuses to start, says why, and leaves the file be.

``state.db`` is made by a real ``cdi serve`` (which is then stopped), then
damaged three ways: a torn page (bytes overwritten in the middle), a
truncation, and a file that is not a database at all.  Each time ``cdi serve``
must exit 1 with one line naming the file, SQLite's reason and what to do,
without a traceback, and must not change the file (nothing is repaired behind
the user's back, nothing is served from it).  The undamaged copy still works.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _serve(data: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "cdi.cli.main", "serve", "--data-dir", str(data),
         "--address", "127.0.0.1:0"], cwd=REPO, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env={**os.environ, "NO_COLOR": "1"})


def _run_until_ready(data: Path) -> None:
    proc = _serve(data)
    deadline = time.monotonic() + 60
    while not (data / "server.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    assert json.loads((data / "server.json").read_text())["url"]
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    (data / "server.json").unlink(missing_ok=True)


def _torn(db: Path) -> None:
    """Page 2 (a table's root) half overwritten, as by a write cut short."""
    with db.open("r+b") as f:
        f.seek(4096)
        f.write(b"\xde\xad" * 1024)


def _truncated(db: Path) -> None:
    os.truncate(db, 4096 + 1000)


def _not_a_database(db: Path) -> None:
    db.write_bytes(b"this was overwritten by something else\n" * 100)


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    data = tmp_path_factory.mktemp("made") / "data"
    _run_until_ready(data)
    # One self-contained file: what the WAL holds goes into it.
    with contextlib.closing(sqlite3.connect(data / "state.db")) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return (data / "state.db").read_bytes()


@pytest.mark.parametrize(("damage", "reason"), [
    (_torn, "*** in database main ***"),
    (_truncated, "database disk image is malformed"),
    (_not_a_database, "file is not a database"),
], ids=["torn-page", "truncated", "not-a-database"])
def test_a_damaged_state_file_is_refused(tmp_path: Path, made: bytes,
                                         damage: Callable[[Path], None], reason: str) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    db = data / "state.db"
    db.write_bytes(made)
    damage(db)
    before = db.read_bytes()
    proc = _serve(data)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"Error: {db} is damaged (") and reason in lines[0]
    assert lines[0].endswith("); nothing was served from it. Restore it from a backup, or "
                             "move it aside to start with an empty state")
    assert db.read_bytes() == before, "the damaged file was changed"
    assert not (data / "server.json").exists()


def test_the_undamaged_copy_serves(tmp_path: Path, made: bytes) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    (data / "state.db").write_bytes(made)
    _run_until_ready(data)
