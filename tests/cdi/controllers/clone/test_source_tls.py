"""The host-assisted clone's source worker trusts its target across an upload CA rotation.

The target's upload server gets its certificate when its pod is made; the CA may
rotate before the source worker starts (cdi/cli/certrotation.py swaps the
signer in place and keeps the old CA in its bundle).  The worker's ``ca.crt`` must
be the bundle, or the TLS handshake with that server fails.  The controller runs on
the real SQLite store; the handshake is a real one, with the Secrets it wrote.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import ssl
from pathlib import Path

from cdi.api import pki
from cdi.backends.embedded.store import SQLiteStore
from cdi.backends.port import Obj
from cdi.controllers import importpod
from cdi.controllers.clone import strategy
from cdi.controllers.clone.controller import CloneController
from cdi.controllers.clone.pods import source_pod_name
from cdi.controllers.datavolume import UploadTLS

SPEC = {"accessModes": ["ReadWriteOnce"], "storageClassName": "local",
        "resources": {"requests": {"storage": "8Mi"}}}


def _files(tmp_path: Path, name: str, data: dict[str, bytes]) -> dict[str, str]:
    paths = {}
    for key, value in data.items():
        path = tmp_path / f"{name}-{key}"
        path.write_bytes(value)
        paths[key] = str(path)
    return paths


async def _handshake(server_secret: Obj, client_secret: Obj, tmp_path: Path) -> None:
    """A TLS connection to a server with SERVER_SECRET's certificate, trusting what
    CLIENT_SECRET's ``ca.crt`` holds, as the source worker connects."""
    server = _files(tmp_path, "server", {k: base64.b64decode(v)
                                         for k, v in server_secret["data"].items()})
    client = _files(tmp_path, "client", {k: base64.b64decode(v)
                                         for k, v in client_secret["data"].items()})
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(server["tls.crt"], server["tls.key"])
    client_ctx = ssl.create_default_context(cafile=client["ca.crt"])
    client_ctx.load_cert_chain(client["tls.crt"], client["tls.key"])

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    listener = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=server_ctx)
    port = listener.sockets[0].getsockname()[1]
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx,
                                                  server_hostname="localhost")
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, ssl.SSLError):
            pass  # the server hung up first
    finally:
        listener.close()
        await listener.wait_closed()


def test_a_source_worker_started_after_a_ca_rotation_trusts_the_target(tmp_path: Path) -> None:
    signer = pki.Signer(tmp_path / "server-ca", "cdi-uploadserver-signer")
    client_signer = pki.Signer(tmp_path / "client-ca", "cdi-uploadserver-client-signer")
    old_ca = signer.cert_pem

    async def main() -> None:
        async with SQLiteStore(tmp_path / "db") as store:
            clones = CloneController(store, client_signer=client_signer,
                                     upload_tls=UploadTLS(signer=signer,
                                                          client_signer=client_signer))
            src = await store.create({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                                      "metadata": {"name": "golden", "namespace": "golden"},
                                      "spec": SPEC})
            await store.replace_status({**src, "status": {"phase": "Bound"}})
            dv = await store.create({
                "apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
                "metadata": {"name": "copy", "namespace": "vms"},
                "spec": {"source": {"pvc": {"namespace": "golden", "name": "golden"}},
                         "pvc": SPEC}})
            target = await store.create({
                "apiVersion": "v1", "kind": "PersistentVolumeClaim",
                "metadata": {"name": "copy", "namespace": "vms",
                             "annotations": {strategy.ANN_CLONE_TYPE: "copy"},
                             "ownerReferences": [{
                                 "apiVersion": "cdi.kubevirt.io/v1beta1",
                                 "kind": "DataVolume", "name": "copy",
                                 "uid": dv["metadata"]["uid"], "controller": True}]},
                "spec": SPEC})
            await store.replace_status({**target, "status": {"phase": "Bound"}})

            # The target's upload server: its certificate comes from the CA of now.
            await clones.reconcile(("vms", "copy"))
            upload_name = importpod.upload_pod_name("copy")
            server_secret = await store.get("Secret", upload_name, "vms")

            # The CA rotates, as certrotation does it: a new CA, the old one still trusted.
            new_ca, new_key = pki.make_ca("cdi-uploadserver-signer@2",
                                          lifetime=datetime.timedelta(days=1))
            signer.load(new_ca, new_key, new_ca + old_ca)

            # The server is up: the source worker is made, and must reach it.
            upload = await store.get("Pod", upload_name, "vms")
            upload["metadata"].setdefault("annotations", {})[
                "embedded.cdi.kubevirt.io/upload-address"] = "127.0.0.1:8443"
            upload = await store.replace(upload)
            await store.replace_status({**upload, "status": {
                "phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}})
            await clones.reconcile(("vms", "copy"))
            client_secret = await store.get("Secret", source_pod_name(dv), "golden")
            assert await store.get("Pod", source_pod_name(dv), "golden")

        trusted = pki.load_bundle(base64.b64decode(client_secret["data"]["ca.crt"]))
        assert [c.subject.rfc4514_string() for c in trusted] == [
            "CN=cdi-uploadserver-signer@2", "CN=cdi-uploadserver-signer"]
        await _handshake(server_secret, client_secret, tmp_path)

    asyncio.run(main())
