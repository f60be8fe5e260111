"""Where the API server is: the files ``cdi serve`` writes and the CLI reads.

``cdi serve`` calls :func:`write_server_info`, which writes the same JSON to two
places, both mode 0600 and replaced atomically (a reader never sees half a
file)::

    <data-dir>/server.json
    ${XDG_CONFIG_HOME:-~/.config}/cdi/current.json   (the pointer)

    {"url": "http://127.0.0.1:<port>", "token_file": "<data-dir>/api-token"}

with ``"ca_file"`` added when the server speaks TLS with its own CA.  The
files hold the token's *path*, never the token: the token stays in one 0600
file.

The CLI finds the server with :func:`find_server`, first match wins:

1. ``--server`` / ``CDI_SERVER`` and ``--token-file`` / ``CDI_TOKEN_FILE``
   (either may be given alone; the other comes from the steps below);
2. ``--data-dir`` / ``CDI_DATA_DIR``: that directory's ``server.json``;
3. the pointer file: the server started last.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any

SERVER_FILE = "server.json"
POINTER_FILE = "current.json"


class ConfigError(Exception):
    """The server cannot be found, or its token cannot be read."""


@dataclasses.dataclass(frozen=True)
class ServerInfo:
    url: str
    token: str = dataclasses.field(repr=False)
    ca_file: str | None = None


def pointer_path() -> Path:
    """``$XDG_CONFIG_HOME/cdi/current.json`` (``~/.config`` when unset)."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "cdi" / POINTER_FILE


def write_server_info(data_dir: Path, url: str, token_file: Path, *,
                      ca_file: Path | None = None) -> None:
    """Record where the server listens: DATA_DIR/server.json and the pointer file."""
    info: dict[str, Any] = {"url": url, "token_file": str(Path(token_file).absolute())}
    if ca_file is not None:
        info["ca_file"] = str(Path(ca_file).absolute())
    text = json.dumps(info, indent=2) + "\n"
    _write_private(Path(data_dir) / SERVER_FILE, text)
    pointer = pointer_path()
    pointer.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _write_private(pointer, text)


def find_server(*, server: str | None = None, token_file: str | Path | None = None,
                data_dir: str | Path | None = None, ca_file: str | Path | None = None,
                ) -> ServerInfo:
    """The server to talk to and its token (see the module docstring for the order)."""
    info: dict[str, Any] = {}
    if not (server and token_file):
        info = _read_info(data_dir)
    url = server or info.get("url")
    token_path = token_file or info.get("token_file")
    if not url or not token_path:
        raise ConfigError("no cdi server found: start one with `cdi serve`, or pass --server "
                          "and --token-file (or --data-dir)")
    ca = ca_file or info.get("ca_file")
    return ServerInfo(str(url).rstrip("/"), _read_token(Path(token_path)),
                      str(ca) if ca else None)


def _read_info(data_dir: str | Path | None) -> dict[str, Any]:
    if data_dir:
        path = Path(data_dir) / SERVER_FILE
        if not path.exists():
            raise ConfigError(f"no cdi server found: {path} does not exist (is `cdi serve "
                              f"--data-dir {data_dir}` running?)")
    else:
        path = pointer_path()
        if not path.exists():
            return {}
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from e
    if not isinstance(info, dict):
        raise ConfigError(f"cannot read {path}: not a JSON object")
    return info


def _read_token(path: Path) -> str:
    try:
        token = path.read_text().strip()
    except OSError as e:
        raise ConfigError(f"cannot read the API token: {e}") from e
    if not token:
        raise ConfigError(f"cannot read the API token: {path} is empty")
    return token


def _write_private(path: Path, text: str) -> None:
    """Write TEXT to PATH, mode 0600, atomically."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
