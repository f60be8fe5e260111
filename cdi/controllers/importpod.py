"""The importer pod: its spec (CDI's environment contract), and reading its results.

The DataVolume controller asks for a pod with ``pod_spec``; the pod's worker is
``cdi-importer``.  What the worker reports comes back through the pod status:
``outcome`` interprets the termination message (success, scratch space
needed, checksum mismatch, an error that will be retried), and ``scrape``
reads the progress metrics of a running worker.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import json
import re
from typing import Any

import aiohttp

from cdi.api import defaults, pki
from cdi.backends.port import Obj, ObjectStore
from cdi.controllers.workers import IMPORTER, UPLOADSERVER, Workers
from importer import space, units

ANN = "cdi.kubevirt.io/"
METRICS_ANNOTATION = "embedded.cdi.kubevirt.io/metrics-address"
SCRAPE_TIMEOUT = 2.0
TLS_DIR = "/etc/tls"
DOCKER_CONFIG_DIR = "/docker-config"
# Running-condition messages CDI turns into "DataVolume too small to contain image".
_TOO_SMALL = ("is larger than the reported available", "no space left on device",
              "file largest block is bigger than maxblock", "disk quota exceeded")
# DataVolume annotations passed on to worker pods (network attachment, sidecars).
POD_ANNOTATIONS = ("k8s.v1.cni.cncf.io/networks", "v1.multus-cni.io/default-network",
                   "sidecar.istio.io/inject", "linkerd.io/inject")


# Claim annotations only the controllers write: a DataVolume that carries one
# must not pass it on (it would fake a finished import, or name another claim).
CONTROLLER_ANNOTATIONS = frozenset({
    ANN + "storage.pod.phase", ANN + "storage.pod.ready", ANN + "storage.pod.restarts",
    ANN + "storage.import.fatalError", ANN + "storage.import.requiresScratch",
    ANN + "storage.condition.running.reason", ANN + "storage.condition.running.message",
    ANN + "storage.preallocation", ANN + "cloneType", ANN + "cloneFallbackReason",
    ANN + "cloneSourceTemporaryClaim", ANN + "createdForDataVolume",
    ANN + "storage.upload.target", "k8s.io/CloneRequest", "k8s.io/CloneOf",
})


WORKER_UID = 107  # the qemu user of CDI's images
UPLOAD_TARGET_LABEL = "cdi.kubevirt.io/uploadTarget"  # on an upload pod: its claim's UID
UPLOAD_PORT = 8443  # the upload server's port, and its Service's (as CDI's)


def passed_annotations(dv: Obj) -> dict[str, str]:
    """The DataVolume's annotations its claim inherits: CDI's and the pod ones, never
    an annotation the controllers themselves write."""
    return {k: str(v) for k, v in (dv["metadata"].get("annotations") or {}).items()
            if (k.startswith(ANN) or k in POD_ANNOTATIONS) and k not in CONTROLLER_ANNOTATIONS}


def pod_name(pvc_name: str) -> str:
    return f"importer-{pvc_name}"


def upload_pod_name(pvc_name: str) -> str:
    return f"cdi-upload-{pvc_name}"


def upload_tls_secret(pvc: Obj, signer: pki.Signer, client_ca_pem: bytes) -> Obj:
    """The upload server's own certificate, and the CA its clients must come from."""
    meta = pvc["metadata"]
    name, ns = upload_pod_name(meta["name"]), meta["namespace"]
    issued = signer.issue(name, hosts=("127.0.0.1", "localhost", f"{name}.{ns}.svc",
                                       f"{name}.{ns}.svc.cluster.local"))
    return {
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": {"name": name, "namespace": ns,
                     "labels": {"app": "containerized-data-importer"},
                     "ownerReferences": [{"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                                          "name": meta["name"], "uid": meta["uid"],
                                          "controller": True}]},
        "data": {"tls.crt": base64.b64encode(issued.cert_pem).decode(),
                 "tls.key": base64.b64encode(issued.key_pem).decode(),
                 "ca.crt": base64.b64encode(client_ca_pem).decode()},
    }


def upload_service(pvc: Obj) -> Obj:
    """The Service in front of a claim's upload server (named as its pod, as in CDI): the
    upload proxy reaches ``https://cdi-upload-<claim>.<ns>.svc:8443`` on a cluster.  Owned by
    the claim, so it goes with it.  ``cdi serve`` keeps it but does not use it."""
    meta = pvc["metadata"]
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": upload_pod_name(meta["name"]), "namespace": meta["namespace"],
                     "labels": {"app": "containerized-data-importer",
                                "cdi.kubevirt.io": "cdi-upload-server"},
                     "ownerReferences": [{"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                                          "name": meta["name"], "uid": meta["uid"],
                                          "controller": True, "blockOwnerDeletion": True}]},
        "spec": {"selector": {UPLOAD_TARGET_LABEL: meta["uid"]},
                 "ports": [{"name": "uploadserver", "port": UPLOAD_PORT,
                            "targetPort": UPLOAD_PORT, "protocol": "TCP"}]},
    }


def scratch_name(pvc_name: str) -> str:
    return f"{pvc_name}-scratch"


def scratch_claim(pvc: Obj, pod: Obj, config_status: dict[str, Any]) -> Obj:
    """The scratch claim of a worker pod: owned by the pod, sized like CDI's."""
    meta = pvc["metadata"]
    block = pvc["spec"].get("volumeMode") == "Block"
    scratch_class = config_status.get("scratchSpaceStorageClass") or \
        pvc["spec"].get("storageClassName")
    target_overhead = 0.0 if block else defaults.filesystem_overhead(
        config_status, pvc["spec"].get("storageClassName"))
    scratch_overhead = defaults.filesystem_overhead(config_status, scratch_class)
    request = units.parse_quantity(str(pvc["spec"]["resources"]["requests"]["storage"]))
    size = units.round_up(space.required(scratch_overhead,
                                         space.usable(target_overhead, request)), units.MiB)
    return {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": scratch_name(meta["name"]), "namespace": meta["namespace"],
            "labels": {"app": "containerized-data-importer",
                       "velero.io/exclude-from-backup": "true"},
            "ownerReferences": [{"apiVersion": "v1", "kind": "Pod",
                                 "name": pod["metadata"]["name"],
                                 "uid": pod["metadata"]["uid"], "controller": True}],
        },
        "spec": {"accessModes": ["ReadWriteOnce"], "volumeMode": "Filesystem",
                 "resources": {"requests": {"storage": str(size)}},
                 **({"storageClassName": scratch_class} if scratch_class else {})},
    }


def source_env(dv: Obj, *, insecure_registries: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """The IMPORTER_* variables that describe the DataVolume's source."""
    spec = dv["spec"]
    source = spec.get("source", {})
    content = spec.get("contentType", "kubevirt") or "kubevirt"
    if "blank" in source:
        return [{"name": "IMPORTER_SOURCE", "value": "none"},
                {"name": "IMPORTER_CONTENTTYPE", "value": content}]
    kind = next(k for k in ("http", "registry", "s3") if k in source)
    src = source[kind]
    env: list[dict[str, Any]] = [
        {"name": "IMPORTER_SOURCE", "value": kind},
        {"name": "IMPORTER_ENDPOINT", "value": src["url"]},
        {"name": "IMPORTER_CONTENTTYPE", "value": content},
    ]
    if src.get("secretRef"):
        for var, key in (("IMPORTER_ACCESS_KEY_ID", "accessKeyId"),
                         ("IMPORTER_SECRET_KEY", "secretKey")):
            ref: dict[str, Any] = {"name": src["secretRef"], "key": key}
            if kind == "registry":
                ref["optional"] = True  # a pull secret may hold a .dockerconfigjson instead
            env.append({"name": var, "valueFrom": {"secretKeyRef": ref}})
        if kind == "registry":
            env.append({"name": "IMPORTER_DOCKER_CONFIG",
                        "value": f"{DOCKER_CONFIG_DIR}/.dockerconfigjson"})
    if src.get("checksum"):
        env.append({"name": "IMPORTER_CHECKSUM", "value": src["checksum"]})
    if src.get("insecureSkipVerify"):
        env.append({"name": "INSECURE_TLS", "value": "true"})
    for i, header in enumerate(src.get("extraHeaders", []) if kind == "http" else []):
        env.append({"name": f"IMPORTER_EXTRA_HEADER_{i}", "value": header})
    if kind == "registry":
        if registry_host(src["url"]) in insecure_registries:
            env.append({"name": "IMPORTER_INSECURE_REGISTRY", "value": "true"})
        if src.get("platform", {}).get("architecture"):
            env.append({"name": "IMPORTER_REGISTRY_IMAGE_ARCHITECTURE",
                        "value": src["platform"]["architecture"]})
    return env


def registry_host(url: str) -> str:
    """``host[:port]`` of a ``docker://`` reference (CDIConfig insecureRegistries entries)."""
    if not url.startswith("docker://"):
        return ""
    first = url[len("docker://"):].split("/", 1)[0]
    return first if ("." in first or ":" in first or first == "localhost") else "docker.io"


def pod_spec(dv: Obj, pvc: Obj, *, block: bool, overhead: float, preallocation: bool,
             scratch: bool, proxy: dict[str, str], resources: dict[str, Any],
             workers: Workers, insecure_registries: tuple[str, ...] = ()) -> Obj:
    env = source_env(dv, insecure_registries=insecure_registries) + [
        {"name": "IMPORTER_IMAGE_SIZE",
         "value": str(pvc["spec"]["resources"]["requests"]["storage"])},
    ] + [{"name": k, "value": v} for k, v in sorted(proxy.items()) if v]
    return _worker_pod(dv, pvc, name=pod_name(pvc["metadata"]["name"]), workers=workers,
                       command=IMPORTER, env=env, block=block, overhead=overhead,
                       preallocation=preallocation, scratch=scratch, resources=resources,
                       component="importer")


def upload_pod_spec(dv: Obj, pvc: Obj, *, block: bool, overhead: float, preallocation: bool,
                    resources: dict[str, Any], workers: Workers,
                    tls_secret: str | None = None, scratch: bool = True,
                    deadline: str | None = None) -> Obj:
    """The upload server pod (``cdi-upload-<claim>``): it listens for one upload, until
    DEADLINE (RFC 3339; cdi/controllers/uploadtls.py) if there is one."""
    env = [{"name": "UPLOAD_IMAGE_SIZE",
            "value": str(pvc["spec"]["resources"]["requests"]["storage"])},
           {"name": "LISTEN_PORT", "value": "8443"}]
    if block:  # CDI names the device for block targets (ours finds it by IMPORTER_BLOCK_PATH)
        env.append({"name": "DESTINATION", "value": "/dev/cdi-block-volume"})
    if deadline:
        env.append({"name": "DEADLINE", "value": deadline})
    pod = _worker_pod(dv, pvc, name=upload_pod_name(pvc["metadata"]["name"]), workers=workers,
                      command=UPLOADSERVER, env=env, block=block, overhead=overhead,
                      preallocation=preallocation, scratch=scratch, resources=resources,
                      component="cdi-upload-server")
    container = pod["spec"]["containers"][0]
    if tls_secret:
        # CDI's layout: the Secret named like the pod, mounted at /etc/tls; the
        # upload server requires the proxy's client certificate (mutual TLS).
        container["env"][:0] = [
            {"name": "TLS_KEY_FILE", "value": f"{TLS_DIR}/tls.key"},
            {"name": "TLS_CERT_FILE", "value": f"{TLS_DIR}/tls.crt"},
            {"name": "CLIENT_CERT_FILE", "value": f"{TLS_DIR}/ca.crt"},
            {"name": "CLIENT_NAME", "value": pki.UPLOAD_CLIENT_NAME},
        ]
        pod["spec"]["volumes"].append({"name": "tls-secret",
                                       "secret": {"secretName": tls_secret}})
        container.setdefault("volumeMounts", []).append(
            {"name": "tls-secret", "mountPath": TLS_DIR, "readOnly": True})
    # CDI probes HTTPS /healthz and answers 401 to a client without a certificate;
    # ours refuses such a handshake outright, so the probe is the listening port
    # (the server listens only once it can take an upload).
    container["readinessProbe"] = {
        "tcpSocket": {"port": 8443}, "initialDelaySeconds": 1, "periodSeconds": 5}
    pod["metadata"]["labels"][UPLOAD_TARGET_LABEL] = pvc["metadata"]["uid"]
    return pod


def _worker_pod(dv: Obj, pvc: Obj, *, name: str, workers: Workers, command: str,
                env: list[dict[str, Any]], block: bool, overhead: float,
                preallocation: bool, scratch: bool, resources: dict[str, Any],
                component: str) -> Obj:
    meta = pvc["metadata"]
    claim = meta["name"]
    env = [
        *env,
        {"name": "OWNER_UID", "value": dv["metadata"]["uid"]},
        {"name": "FILESYSTEM_OVERHEAD", "value": "0" if block else f"{overhead:g}"},
        {"name": "PREALLOCATION", "value": "true" if preallocation else "false"},
    ]
    container: Obj = {
        **workers.container(component, command),
        "env": env,
        "ports": [{"name": "metrics", "containerPort": 8443, "protocol": "TCP"}],
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "resources": resources,
    }
    volumes: list[Obj] = [{"name": "cdi-data-vol", "persistentVolumeClaim": {"claimName": claim}}]
    if block:
        container["volumeDevices"] = [{"name": "cdi-data-vol",
                                       "devicePath": "/dev/cdi-block-volume"}]
    else:
        container["volumeMounts"] = [{"name": "cdi-data-vol", "mountPath": "/data"}]
    if scratch:
        volumes.append({"name": "cdi-scratch-vol",
                        "persistentVolumeClaim": {"claimName": scratch_name(claim)}})
        container.setdefault("volumeMounts", []).append(
            {"name": "cdi-scratch-vol", "mountPath": "/scratch"})
    secret_headers = dv["spec"].get("source", {}).get("http", {}).get("secretExtraHeaders", [])
    for i, secret in enumerate(secret_headers):
        volumes.append({"name": f"cdi-extra-headers-vol-{i}", "secret": {"secretName": secret}})
        container.setdefault("volumeMounts", []).append(
            {"name": f"cdi-extra-headers-vol-{i}", "mountPath": f"/extraheaders/{i}"})
    if secret_headers:
        env.append({"name": "IMPORTER_SECRET_EXTRA_HEADERS_DIR", "value": "/extraheaders"})
    source = dv["spec"].get("source", {})
    pull_secret = (source.get("registry") or {}).get("secretRef")
    if pull_secret:
        volumes.append({"name": "cdi-docker-config",
                        "secret": {"secretName": pull_secret, "optional": True}})
        container.setdefault("volumeMounts", []).append(
            {"name": "cdi-docker-config", "mountPath": DOCKER_CONFIG_DIR, "readOnly": True})
    cert_cm = next((source[k].get("certConfigMap") for k in ("http", "registry", "s3")
                    if k in source), None)
    if cert_cm:
        volumes.append({"name": "cdi-cert-vol", "configMap": {"name": cert_cm}})
        container.setdefault("volumeMounts", []).append(
            {"name": "cdi-cert-vol", "mountPath": "/certs"})
        env.append({"name": "IMPORTER_CERT_DIR", "value": "/certs"})
    annotations = {"sidecar.istio.io/inject": "false", "linkerd.io/inject": "disabled",
                   **network_annotations(dv)}
    spec: Obj = {"restartPolicy": "OnFailure", "containers": [container], "volumes": volumes}
    harden(spec, dv)
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": name, "namespace": meta["namespace"],
            "labels": {"app": "containerized-data-importer", "cdi.kubevirt.io": component,
                       "prometheus.cdi.kubevirt.io": "true"},
            "annotations": annotations,
            "ownerReferences": [{"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                                 "name": claim, "uid": meta["uid"], "controller": True,
                                 "blockOwnerDeletion": True}],
        },
        "spec": spec,
    }


async def workload(store: ObjectStore) -> Obj:
    """CDI ``spec.workload`` (nodeSelector, affinity, tolerations) of the CDI resource, if
    there is one: where worker pods are scheduled."""
    for cdi in (await store.list("CDI")).items:
        placement = (cdi.get("spec") or {}).get("workload")
        if isinstance(placement, dict):
            return placement
    return {}


def place(pod: Obj, placement: Obj) -> Obj:
    """POD scheduled as PLACEMENT says (the fields it sets; POD returned, changed)."""
    spec = pod["spec"]
    if placement.get("nodeSelector"):
        # The pod's own labels (a node-pull importer's architecture, as CDI) win.
        spec["nodeSelector"] = {**placement["nodeSelector"], **(spec.get("nodeSelector") or {})}
    if placement.get("affinity"):
        # The placement's affinity, with the pod's own pod-affinity terms added to it.
        merged = copy.deepcopy(placement["affinity"])
        for kind, terms in ((spec.get("affinity") or {}).get("podAffinity") or {}).items():
            merged.setdefault("podAffinity", {}).setdefault(kind, []).extend(
                copy.deepcopy(terms))
        spec["affinity"] = merged
    if placement.get("tolerations"):
        spec["tolerations"] = copy.deepcopy(list(placement["tolerations"]))
    return pod


def network_annotations(dv: Obj) -> dict[str, str]:
    """The DataVolume's annotations a worker pod inherits (networks, as CDI passes them)."""
    dv_annotations = dv["metadata"].get("annotations") or {}
    return {k: v for k, v in dv_annotations.items() if k in POD_ANNOTATIONS}


def harden(spec: Obj, dv: Obj) -> None:
    """The restricted Pod Security profile CDI's workers run under (UID and fsGroup 107,
    no privilege escalation, no capabilities, the runtime's seccomp profile), and the
    DataVolume's priority class.  The embedded pod runner runs workers as the serving
    user and ignores both; a cluster enforces them."""
    spec["securityContext"] = {"runAsNonRoot": True, "runAsUser": WORKER_UID,
                               "fsGroup": WORKER_UID,
                               "seccompProfile": {"type": "RuntimeDefault"}}
    for container in spec["containers"]:
        container["securityContext"] = {"allowPrivilegeEscalation": False,
                                        "capabilities": {"drop": ["ALL"]}}
    priority = (dv.get("spec") or {}).get("priorityClassName")
    if priority:
        spec["priorityClassName"] = str(priority)


@dataclasses.dataclass(frozen=True)
class Outcome:
    kind: str  # "succeeded" | "scratch" | "checksum" | "failed"
    message: str
    preallocation_applied: bool = False
    labels: dict[str, str] = dataclasses.field(default_factory=dict)


def outcome(message: str) -> Outcome:
    """What a worker that exited 0 reported (CDI's JSON termination message)."""
    if not message.strip():
        # A worker that succeeded always says so; silence means its message was lost.
        return Outcome("failed", "the importer exited without a termination message")
    try:
        data = json.loads(message)
    except json.JSONDecodeError:
        return Outcome("failed", message.strip())
    text = str(data.get("message", ""))
    if data.get("scratchSpaceRequired"):
        return Outcome("scratch", text)
    if "checksum mismatch" in text:
        return Outcome("checksum", text)
    if text.startswith("Unable to"):
        return Outcome("failed", text)
    if not isinstance(data, dict) or "message" not in data:
        return Outcome("failed", f"the importer's termination message is not CDI's: {message}")
    labels = data.get("labels")
    labels = labels if isinstance(labels, dict) else {}
    return Outcome("succeeded", text or "Import Complete",
                   bool(data.get("preallocationApplied")),
                   {str(k): str(v) for k, v in labels.items()})


def failure_reason(message: str) -> str:
    """The Running condition's reason for a failed worker (CDI's ImagePullFailed rule)."""
    return "ImagePullFailed" if "failed to pull image" in message else "Error"


def waiting(status: Obj) -> tuple[str, str, str] | None:
    """The Running condition of a worker whose container STATUS waits for what only the
    cluster can fix (CDI's rules): a missing Secret, or an image (a node-pull importer's
    image volume, too) the node fails to pull; None for any other state."""
    state = (status.get("state") or {}).get("waiting") or {}
    reason, message = str(state.get("reason", "")), str(state.get("message", ""))
    if reason == "CreateContainerConfigError":
        return ("False", reason, message)
    if reason in ("ImagePullBackOff", "ErrImagePull", "InvalidImageName"):
        return ("False", "ImagePullFailed",
                f"failed to pull image: {message or status.get('image', '')}")
    return None


def running_message(message: str) -> str:
    """CDI's rewording of a worker's error for the Running condition."""
    if any(s in message for s in _TOO_SMALL):
        return "DataVolume too small to contain image"
    return message.strip()


@dataclasses.dataclass(frozen=True)
class Sample:
    percent: float | None
    bytes_read: int
    bytes_total: int


async def scrape(pod: Obj, owner_uid: str, session: aiohttp.ClientSession, *,
                 metric: str = "kubevirt_cdi_import_progress_total") -> Sample | None:
    """Read a running worker's progress metrics; None if it cannot be reached now."""
    address = pod["metadata"].get("annotations", {}).get(METRICS_ANNOTATION)
    url = f"http://{address}/metrics" if address else None
    if url is None:
        ip = pod.get("status", {}).get("podIP")
        if not ip:
            return None
        url = f"https://{ip}:8443/metrics"
    try:
        async with session.get(url, ssl=False,
                               timeout=aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT)) as r:
            text = await r.text()
    except (aiohttp.ClientError, TimeoutError):
        return None

    def value(metric: str) -> float | None:
        m = re.search(rf'^{metric}\{{ownerUID="{re.escape(owner_uid)}"\}} ([0-9.e+]+)$',
                      text, re.M)
        return float(m.group(1)) if m else None

    percent = value(metric)
    return Sample(percent, int(value("kubevirt_cdi_import_bytes_read") or 0),
                  int(value("kubevirt_cdi_import_bytes_expected") or 0))
