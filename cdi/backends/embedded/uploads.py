"""Where an upload goes in ``cdi serve``: the proxy's Resolver over the object store.

An upload target claim carries ``cdi.kubevirt.io/storage.upload.target``; its
upload server is the worker of pod ``cdi-upload-<claim>``, which listens on a
loopback port the pod runner publishes in an annotation once it is ready, over
HTTPS with its own certificate when the pod mounts one.  The pod runner also
publishes the worker's Unix socket (in the data dir's private ``run``
directory): the proxy, running as the same user, sends there without TLS.
"""

from __future__ import annotations

from cdi.api import errors
from cdi.backends.embedded.podrunner import SOCKET_ANNOTATION, UPLOAD_ANNOTATION
from cdi.backends.port import ObjectStore
from uploadproxy.resolver import NotReadyYet, UploadTarget, check_claim

UPLOAD_TARGET = "cdi.kubevirt.io/storage.upload.target"
POD_PHASE = "cdi.kubevirt.io/storage.pod.phase"
CONTENT_TYPE = "cdi.kubevirt.io/storage.contentType"


class EmbeddedResolver:
    def __init__(self, store: ObjectStore) -> None:
        self._store = store

    async def upload_server(self, namespace: str, pvc: str) -> UploadTarget | None:
        try:
            claim = await self._store.get("PersistentVolumeClaim", pvc, namespace)
        except errors.NotFound:
            claim = None
        annotations = check_claim(pvc, claim)
        try:
            pod = await self._store.get("Pod", f"cdi-upload-{pvc}", namespace)
        except errors.NotFound:
            raise NotReadyYet("the upload server pod does not exist yet") from None
        pod_annotations = pod["metadata"].get("annotations", {})
        address = pod_annotations.get(UPLOAD_ANNOTATION)
        if not address or pod.get("status", {}).get("phase") != "Running":
            raise NotReadyYet("the upload server is starting")
        # With a certificate (mutual TLS) the worker serves HTTPS; see importpod.
        env = {e["name"] for e in pod["spec"]["containers"][0].get("env", [])}
        scheme = "https" if "TLS_CERT_FILE" in env else "http"
        return UploadTarget(url=f"{scheme}://{address}",
                            content_type=annotations.get(CONTENT_TYPE, "kubevirt") or "kubevirt",
                            socket=pod_annotations.get(SOCKET_ANNOTATION) or None)
