"""A real forward HTTP proxy (tinyproxy) on 127.0.0.1, for the proxy settings' tests."""

from __future__ import annotations

import re
import socket
import subprocess
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class ForwardProxy:
    """tinyproxy in the foreground with its own config and log in ``directory``."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self.log = directory / "tinyproxy.log"
        self._conf = directory / "tinyproxy.conf"
        self._conf.write_text(
            f"Port {self.port}\nListen 127.0.0.1\nTimeout 60\nLogFile \"{self.log}\"\n"
            "LogLevel Info\nMaxClients 50\nAllow 127.0.0.1\n"
        )
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ForwardProxy:
        self._proc = subprocess.Popen(["tinyproxy", "-d", "-c", str(self._conf)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                if time.monotonic() > deadline or self._proc.poll() is not None:
                    self.stop()
                    raise RuntimeError("tinyproxy did not start") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)
            self._proc = None

    def requests(self) -> list[str]:
        """Request lines the proxy received, e.g. 'GET http://127.0.0.1:1234/x' or 'CONNECT h:p'."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return re.findall(r"Request \(file descriptor \d+\): (\S+ \S+) HTTP/", text)
