"""The objects of a host-assisted clone, as pure functions of the DataVolume and claims.

The clone controller decides when they exist; this module says what they are:
CDI's names (source pod, temporary snapshot and restore), the client identity
the clone-mode upload server requires, and the source pod with its client
certificate Secret.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

from cdi.api import pki
from cdi.backends.port import Obj
from cdi.controllers import importpod
from cdi.controllers.workers import CLONER, Workers

SOURCE_MOUNT = "/var/run/cdi/clone/source"
CLONE_FOR = "cdi.kubevirt.io/clone-for"  # label: "<ns>.<name>" of the DataVolume
CLONE_CERT_DAYS = 2  # a clone's client certificate outlives the clone only briefly
CLIENT_TLS_DIR = "/etc/tls/clone"
# The embedded pod runner publishes an upload server's Unix socket here (a path on
# the one machine, private to the serving user); Kubernetes pods have no such thing.
SOCKET_ANNOTATION = "embedded.cdi.kubevirt.io/upload-socket"


def source_pod_name(dv: Obj) -> str:
    return f"{dv['metadata']['uid']}-source-pod"


def temp_source_name(dv: Obj) -> str:
    """The claim a snapshot is restored into when it must be copied (CDI's name)."""
    return f"tmp-source-pvc-{dv['metadata']['uid']}"


def snapshot_name(dv: Obj) -> str:
    return f"tmp-snapshot-{dv['metadata']['uid']}"


def client_name(source_ns: str, source: str, target_ns: str, target: str) -> str:
    """The identity the clone-mode upload server requires of its client (CDI's form).

    A certificate's common name holds at most 64 characters; a longer name is
    replaced by a digest of it, the same on both sides.
    """
    name = f"{source_ns}/{source}-{target_ns}/{target}"
    if len(name) <= 64:
        return name
    return "clone-" + hashlib.sha256(name.encode()).hexdigest()[:40]


def clone_for(target: Obj) -> str:
    meta = target["metadata"]
    return f"{meta['namespace']}.{meta['name']}"


def source_secret(dv: Obj, target: Obj, src: Obj, client_signer: pki.Signer,
                  server_ca_pem: bytes) -> Obj:
    """The source worker's client certificate and the CAs of the upload servers
    (SERVER_CA_PEM: the server signer's bundle, which keeps the CA before a rotation)."""
    src_meta, meta = src["metadata"], target["metadata"]
    issued = client_signer.issue(
        client_name(src_meta["namespace"], src_meta["name"], meta["namespace"], meta["name"]),
        client=True, days=CLONE_CERT_DAYS)
    return {
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": {"name": source_pod_name(dv), "namespace": src_meta["namespace"],
                     "labels": {CLONE_FOR: clone_for(target)}},
        "data": {"tls.crt": base64.b64encode(issued.cert_pem).decode(),
                 "tls.key": base64.b64encode(issued.key_pem).decode(),
                 "ca.crt": base64.b64encode(server_ca_pem).decode()}}


SOURCE_LABEL = "cdi.kubevirt.io/hostAssistedSourcePodCloneSource"  # the source claim's UID
HOSTNAME = "kubernetes.io/hostname"


def _term(key: str, value: str, namespace: str) -> Obj:
    return {"labelSelector": {"matchExpressions": [
                {"key": key, "operator": "In", "values": [value]}]},
            "namespaces": [namespace], "topologyKey": HOSTNAME}


def _affinity(target: Obj, src: Obj) -> Obj:
    """Where the source pod should run, as CDI places it: near the target's upload server
    if it can; and a source that only one node may mount (ReadWriteOnce alone) on the
    same node as any other source pod of that claim."""
    affinity: Obj = {"preferredDuringSchedulingIgnoredDuringExecution": [{
        "weight": 100,
        "podAffinityTerm": _term(importpod.UPLOAD_TARGET_LABEL, target["metadata"]["uid"],
                                 target["metadata"]["namespace"])}]}
    if list(src["spec"].get("accessModes") or []) == ["ReadWriteOnce"]:
        affinity["requiredDuringSchedulingIgnoredDuringExecution"] = [
            _term(SOURCE_LABEL, src["metadata"]["uid"], src["metadata"]["namespace"])]
    return affinity


def source_pod(dv: Obj, target: Obj, src: Obj, address: str, *, tls: bool,
               workers: Workers, socket: str | None = None,
               resources: Obj | None = None) -> Obj:
    """The clone source worker, sending SRC to the upload server at ADDRESS.

    With SOCKET (the embedded backend's upload servers also listen on a Unix
    socket private to the serving user) the worker sends there, without TLS,
    and needs no client certificate; ADDRESS stays in ``UPLOAD_URL``.
    """
    name = source_pod_name(dv)
    env: list[dict[str, Any]] = [
        {"name": "UPLOAD_URL", "value": f"https://{address}/v1beta1/upload"},
        {"name": "OWNER_UID", "value": dv["metadata"]["uid"]},
    ]
    if socket is not None:
        env.append({"name": "UPLOAD_SOCKET", "value": socket})
        tls = False
    volumes: list[Obj] = [{"name": "cdi-clone-source", "persistentVolumeClaim": {
        "claimName": src["metadata"]["name"], "readOnly": True}}]
    container: Obj = {**workers.container("cdi-clone-source", CLONER), "env": env,
                      "ports": [{"name": "metrics", "containerPort": 8443}],
                      "terminationMessagePolicy": "FallbackToLogsOnError",
                      "resources": dict(resources or {})}
    if src["spec"].get("volumeMode") == "Block":
        container["volumeDevices"] = [{"name": "cdi-clone-source",
                                       "devicePath": "/dev/cdi-block-volume"}]
    else:
        container["volumeMounts"] = [{"name": "cdi-clone-source", "mountPath": SOURCE_MOUNT,
                                      "readOnly": True}]
    if tls:
        volumes.append({"name": "tls-secret", "secret": {"secretName": name}})
        container.setdefault("volumeMounts", []).append(
            {"name": "tls-secret", "mountPath": CLIENT_TLS_DIR, "readOnly": True})
        env += [{"name": "CLIENT_CERT_FILE", "value": f"{CLIENT_TLS_DIR}/tls.crt"},
                {"name": "CLIENT_KEY_FILE", "value": f"{CLIENT_TLS_DIR}/tls.key"},
                {"name": "SERVER_CA_FILE", "value": f"{CLIENT_TLS_DIR}/ca.crt"}]
    spec: Obj = {"restartPolicy": "OnFailure", "containers": [container], "volumes": volumes,
                 "affinity": {"podAffinity": _affinity(target, src)}}
    importpod.harden(spec, dv)
    annotations = {"sidecar.istio.io/inject": "false", "linkerd.io/inject": "disabled",
                   **importpod.network_annotations(dv)}
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": src["metadata"]["namespace"],
                     "labels": {"app": "containerized-data-importer",
                                "cdi.kubevirt.io": "cdi-clone-source",
                                "prometheus.cdi.kubevirt.io": "true",
                                SOURCE_LABEL: src["metadata"]["uid"],
                                CLONE_FOR: clone_for(target)},
                     "annotations": annotations},
        "spec": spec,
    }
