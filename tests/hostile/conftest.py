"""Fixtures of the hostile-input suite: the importer's, and a host file that tells on readers."""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.importer.conftest import Volume, import_in_process, volume
from tests.support import uploadserver

__all__ = ["HostFile", "UploadServer", "host_file", "import_in_process", "upload_server",
           "volume"]


class HostFile:
    """A FIFO standing for a file of the host that an image must never reach.

    Opening a FIFO for writing blocks until somebody opens it for reading, so a
    thread parked in that open learns of any reader, however briefly it looks;
    a regular file could be read without a trace.  ``opened`` says whether one
    came.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        os.mkfifo(path)
        self._stopping = False
        self._opened = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="host-file", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        fd = os.open(self.path, os.O_WRONLY)  # returns once a reader has opened the FIFO
        if not self._stopping:
            self._opened.set()
        os.close(fd)

    @property
    def opened(self) -> bool:
        return self._opened.is_set()

    def stop(self) -> None:
        self._stopping = True
        # Be the reader ourselves, so that the watcher's open returns.
        fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
        self._thread.join(10)
        os.close(fd)
        assert not self._thread.is_alive()


@pytest.fixture
def host_file(tmp_path: Path) -> Iterator[HostFile]:
    """An absolute path outside every volume and server root (``tmp_path/host/secret``)."""
    (tmp_path / "host").mkdir()
    watched = HostFile(tmp_path / "host" / "secret")
    yield watched
    watched.stop()


UploadServer = Callable[[Volume], str]


@pytest.fixture
def upload_server() -> Iterator[UploadServer]:
    """Start the real upload server (plain HTTP) on a volume; give its URL."""
    procs: list[subprocess.Popen[bytes]] = []

    def go(vol: Volume) -> str:
        proc, url = uploadserver.start(vol, image_size="64Mi")
        procs.append(proc)
        return url

    yield go
    for proc in procs:
        proc.kill()
        proc.wait()
