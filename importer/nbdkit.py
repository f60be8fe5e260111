"""nbdkit's curl plugin, so qemu-img can convert straight from an HTTP server.

For an uncompressed qcow2/vmdk/... on a server that supports Range requests,
qemu-img reading through nbdkit (readahead for sequential speed, retry so a
dropped connection is re-requested) converts without a scratch copy and faster
than download-then-convert.  nbdkit is a long-lived helper: ``start`` waits for
its socket, ``stop`` terminates it and, failing that, kills it.  Credentials
reach it through a pipe, never through argv.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from importer import errors
from importer.settings import Settings

log = logging.getLogger(__name__)

NBDKIT = os.environ.get("NBDKIT", "nbdkit")
START_TIMEOUT = 15.0


def available() -> bool:
    return shutil.which(NBDKIT) is not None


class Nbdkit:
    def __init__(self, url: str, *, settings: Settings, ca_bundle: Path | None,
                 auth: tuple[str, str] | None = None, pin_header: str | None = None) -> None:
        self._url = url
        self._auth = auth
        self._pin_header = pin_header
        self._settings = settings
        self._ca_bundle = ca_bundle
        self._dir = Path(tempfile.mkdtemp(prefix="cdi-nbdkit-"))
        self.socket = self._dir / "nbdkit.sock"
        self._pin = self._dir / "pin"  # while it exists, blocks read are kept in nbdkit's cache
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr = self._dir / "stderr"

    @property
    def nbd_url(self) -> str:
        return f"nbd+unix:///?socket={self.socket}"

    def start(self) -> str:
        s = self._settings
        args = [
            NBDKIT, "--exit-with-parent", "--foreground", "--readonly",
            "--unix", str(self.socket),
            # Closest to qemu-img first: the cache pins what `qemu-img info` read
            # (see pin/unpin), readahead makes sequential reads fast, retry
            # re-requests a range after a dropped connection.
            "--filter=cache", "--filter=readahead", "--filter=retry",
            "curl", f"url={self._url}",
            f"cache-on-read={self._pin}",
            "retry-exponential=yes", f"retries={s.retries}",
            f"retry-delay={max(1, int(s.retry_backoff))}",
            f"timeout={int(s.stall_timeout)}", "user-agent=cdi-nbdkit-importer",
        ]
        for name, value in s.extra_headers:
            args.append(f"header={name}: {value}")
        if self._pin_header:
            args.append(f"header={self._pin_header}")
        pass_fds: tuple[int, ...] = ()
        read_fd = -1
        if self._auth:
            user, password = self._auth
            read_fd, write_fd = os.pipe()
            os.write(write_fd, password.encode() + b"\n")
            os.close(write_fd)
            args += [f"user={user}", f"password=-{read_fd}"]
            pass_fds = (read_fd,)
        if s.insecure_tls:
            args.append("sslverify=false")
        elif self._ca_bundle is not None:
            args.append(f"cainfo={self._ca_bundle}")
        env: dict[str, str] = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                               "TMPDIR": str(self._dir)}
        proxies = {"http_proxy": s.http_proxy, "https_proxy": s.https_proxy,
                   "no_proxy": s.no_proxy}
        env.update({name: value for name, value in proxies.items() if value})
        with open(self._stderr, "wb") as err:
            self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=err,
                                          stderr=err, pass_fds=pass_fds, env=env)
        if read_fd >= 0:
            os.close(read_fd)
        deadline = time.monotonic() + START_TIMEOUT
        while not self.socket.exists():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                message = self._stderr.read_text(errors="replace").strip()[-512:]
                self.stop()
                raise errors.SourceError(reason=f"nbdkit did not start: {message}")
            time.sleep(0.02)
        log.info("NBDKIT started socket=%s", self.socket)
        return self.nbd_url

    def pin(self) -> None:
        """From now on keep every block read in the cache, until ``unpin``.

        qemu-img reads an image's header twice: once for ``info``, which we
        check (no backing file, no external data file, fits the volume), and
        again for ``convert``.  A server could send a different header the
        second time; with the blocks ``info`` read pinned in the cache,
        ``convert`` sees exactly the header that was checked.
        """
        self._pin.touch()

    def unpin(self) -> None:
        """Stop caching new blocks (those already cached stay)."""
        self._pin.unlink(missing_ok=True)

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None
        shutil.rmtree(self._dir, ignore_errors=True)
