"""A registry that lies: wrong digests, a giant manifest, endless redirects.

A real registry (``docker-registry``) checks digests on push, so it cannot
serve these; a small HTTP server made by the test does, on 127.0.0.1.  The
real worker pulls from it and must refuse each with a message naming what
is wrong, and write nothing.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from tests.importer.conftest import Importer, Volume

MiB = 1 << 20
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
PULL = "Unable to process data: failed to pull image: "


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Liar:
    """What the stand-in serves: path -> (status, headers, body)."""

    routes: dict[str, tuple[int, dict[str, str], bytes]] = field(default_factory=dict)
    hits: list[str] = field(default_factory=list)


class _Handler(http.server.BaseHTTPRequestHandler):
    liar: Liar

    def do_GET(self) -> None:
        self.liar.hits.append(self.path)
        status, headers, body = self.liar.routes.get(self.path, (404, {}, b"{}"))
        self.send_response(status)
        for name, value in {"Content-Length": str(len(body)), **headers}.items():
            self.send_header(name, value)
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client stopped reading: what a giant body is for

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def liar() -> Iterator[tuple[Liar, str]]:
    state = Liar()
    handler = type("Handler", (_Handler,), {"liar": state})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.routes["/v2/"] = (200, {}, b"{}")
    yield state, f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _pull(import_in_process: Importer, vol: Volume, ref: str) -> tuple[int, str]:
    result = import_in_process(vol, IMPORTER_SOURCE="registry",
                               IMPORTER_ENDPOINT=f"docker://{ref}",
                               IMPORTER_INSECURE_REGISTRY="true",
                               IMPORTER_IMAGE_SIZE=str(64 * MiB))
    return result.code, result.message


def _manifest(config: bytes, layer: bytes) -> bytes:
    return json.dumps({
        "schemaVersion": 2, "mediaType": MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": _digest(config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": _digest(layer), "size": len(layer)}],
    }).encode()


def test_manifest_not_matching_its_digest(liar: tuple[Liar, str], volume: Callable[..., Volume],
                                          import_in_process: Importer) -> None:
    state, host = liar
    manifest = _manifest(b"{}", b"layer")
    claimed = _digest(b"something else")
    state.routes[f"/v2/disk/manifests/{claimed}"] = (200, {"Content-Type": MANIFEST}, manifest)
    vol = volume()
    code, message = _pull(import_in_process, vol, f"{host}/disk@{claimed}")
    assert (code, message) == (1, f"{PULL}manifest {claimed}: digest mismatch: expected "
                                  f"{claimed}, calculated {_digest(manifest)}")
    assert not vol.disk.exists()


def test_blob_not_matching_its_digest(liar: tuple[Liar, str], volume: Callable[..., Volume],
                                      import_in_process: Importer) -> None:
    state, host = liar
    config = json.dumps({"architecture": "amd64", "os": "linux"}).encode()
    layer = b"the layer as announced"
    manifest = _manifest(config, layer)
    state.routes["/v2/disk/manifests/latest"] = (200, {"Content-Type": MANIFEST}, manifest)
    state.routes[f"/v2/disk/blobs/{_digest(config)}"] = (200, {}, config)
    state.routes[f"/v2/disk/blobs/{_digest(layer)}"] = (200, {}, b"X" * len(layer))
    vol = volume()
    code, message = _pull(import_in_process, vol, f"{host}/disk:latest")
    assert (code, message) == (1, f"{PULL}blob {_digest(layer)}: digest mismatch: expected "
                                  f"{_digest(layer)}, calculated {_digest(b'X' * len(layer))}")
    assert not vol.disk.exists()


def test_giant_manifest(liar: tuple[Liar, str], volume: Callable[..., Volume],
                        import_in_process: Importer) -> None:
    state, host = liar
    state.routes["/v2/disk/manifests/latest"] = (200, {"Content-Type": MANIFEST},
                                                b"{" + b" " * (64 * MiB) + b"}")
    vol = volume()
    code, message = _pull(import_in_process, vol, f"{host}/disk:latest")
    assert (code, message) == (1, f"{PULL}manifest latest in {host}/disk is larger than "
                                  f"{4 * MiB}")
    assert not vol.disk.exists()


def test_endless_redirects(liar: tuple[Liar, str], volume: Callable[..., Volume],
                           import_in_process: Importer) -> None:
    state, host = liar
    state.routes["/v2/disk/manifests/latest"] = (302, {"Location": "/v2/disk/manifests/again"},
                                                b"")
    state.routes["/v2/disk/manifests/again"] = (302, {"Location": "/v2/disk/manifests/latest"},
                                               b"")
    vol = volume()
    code, message = _pull(import_in_process, vol, f"{host}/disk:latest")
    assert (code, message) == (1, f"{PULL}reading manifest latest in {host}/disk: "
                                  "Exceeded 30 redirects.")
    assert len(state.hits) <= 40
    assert not vol.disk.exists()
