"""Unix domain sockets for the hops that never leave the machine.

In ``cdi serve`` the upload proxy and the clone source reach an upload server
on the same machine, as the same user.  Over TCP that costs mutual TLS: every
byte encrypted by one process and decrypted by the next, on the same cores
that also write the volume.  A Unix socket needs no TLS when the file system
does the job TLS did:

- *who may connect* (mutual TLS: a client certificate): the socket is 0600
  and sits in a directory that is 0700, both owned by the serving user, so
  only that user (and root) can connect; the server also checks the peer's
  uid (``SO_PEERCRED``) and refuses anyone else;
- *who may listen* (TLS: the server certificate): nobody but that user can
  create a file in the directory, so a client that checks the directory
  before it connects, and the peer's uid after, knows it is not talking to an
  impostor that would receive the volume.

These are the checks, in one place for the server (``LISTEN_SOCKET``) and the
clone source (``UPLOAD_SOCKET``).  A path longer than ``sun_path`` (107 bytes
plus the NUL) is refused when the settings are read, naming the variable.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import struct
from pathlib import Path

from importer import errors

MAX_PATH = 107  # sun_path is 108 bytes, with the terminating NUL
_UCRED = struct.Struct("3i")  # pid, uid, gid


def check_path(variable: str, value: str) -> Path:
    """A socket path whose directory only this user can use; SettingsError otherwise."""
    path = Path(value)
    if not path.is_absolute():
        raise errors.SettingsError(variable=variable, reason=f"{value!r} is not an absolute path")
    if len(os.fsencode(value)) > MAX_PATH:
        raise errors.SettingsError(
            variable=variable, reason=f"{value!r} is longer than a Unix socket path may be "
                                      f"({MAX_PATH} bytes)")
    check_private_dir(variable, path.parent)
    return path


def check_private_dir(variable: str, directory: Path) -> None:
    """DIRECTORY is a real directory of ours that no one else may enter or write."""
    try:
        st = os.lstat(directory)
    except OSError as e:
        raise errors.SettingsError(variable=variable,
                                   reason=f"{directory}: {e.strerror or e}") from e
    if not stat.S_ISDIR(st.st_mode):
        raise errors.SettingsError(variable=variable, reason=f"{directory} is not a directory")
    if st.st_uid != os.geteuid():
        raise errors.SettingsError(variable=variable,
                                   reason=f"{directory} belongs to uid {st.st_uid}, not to us "
                                          f"({os.geteuid()})")
    if st.st_mode & 0o077:
        raise errors.SettingsError(
            variable=variable, reason=f"{directory} is mode {stat.S_IMODE(st.st_mode):o}: a "
                                      "socket's directory must be 0700, private to its user")


def bind(path: Path) -> socket.socket:
    """A listening socket at PATH, mode 0600; a stale socket left there is replaced."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            path.unlink()  # a crashed server's: nobody listens on it any more
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # born 0600: never a moment with wider permissions
    try:
        sock.bind(str(path))
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old)
    return sock


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a Unix socket."""
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return int(_UCRED.unpack(data)[1])


def trusted_peer(sock: socket.socket) -> bool:
    """Whether the peer runs as our user (or root, who can reach any socket anyway)."""
    return peer_uid(sock) in (os.geteuid(), 0)
