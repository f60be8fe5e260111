"""The worker Pods the controllers build, field by field against CDI's pod contract.

On Kubernetes these Pods go to the kubelet as they are, so each field CDI's
images and tooling rely on must be there: names, labels, annotations, env
vars, the ``/data`` / ``/dev/cdi-block-volume`` / ``/scratch`` layout,
termination message, restart policy, resources from CDIConfig and the
restricted security profile, placement and affinity.  ``params`` can mark a
known gap ``xfail(strict=True)`` (what CDI has that our Pods lack; red the day
it is fixed); none is marked now.
"""

from __future__ import annotations

from typing import Any

import pytest

from cdi.api import pki
from cdi.backends.port import Obj
from cdi.controllers import importpod
from cdi.controllers.clone import pods as clone_pods

RESOURCES = {"limits": {"cpu": "750m", "memory": "600M"},
             "requests": {"cpu": "100m", "memory": "60M"}}
IMPORTER_ENV = ("IMPORTER_SOURCE", "IMPORTER_ENDPOINT", "IMPORTER_CONTENTTYPE",
                "IMPORTER_IMAGE_SIZE", "OWNER_UID", "FILESYSTEM_OVERHEAD", "PREALLOCATION")
UPLOAD_ENV = ("TLS_KEY_FILE", "TLS_CERT_FILE", "CLIENT_CERT_FILE", "CLIENT_NAME",
              "FILESYSTEM_OVERHEAD", "UPLOAD_IMAGE_SIZE", "PREALLOCATION", "LISTEN_PORT")


def dv(source: Obj) -> Obj:
    return {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
            "metadata": {"name": "disk", "namespace": "ns", "uid": "dv-uid",
                         "annotations": {"k8s.v1.cni.cncf.io/networks": "storage-net"}},
            "spec": {"source": source, "priorityClassName": "vm-disks",
                     "storage": {"resources": {"requests": {"storage": "10Gi"}}}}}


def pvc(block: bool, name: str = "disk", ns: str = "ns") -> Obj:
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": name, "namespace": ns, "uid": f"{name}-uid"},
            "spec": {"volumeMode": "Block" if block else "Filesystem",
                     "storageClassName": "csi", "accessModes": ["ReadWriteOnce"],
                     "resources": {"requests": {"storage": "10Gi"}}}}


HTTP = {"http": {"url": "https://images.example.com/disk.qcow2", "certConfigMap": "ca-bundle"}}


def importer(block: bool) -> Obj:
    return importpod.pod_spec(dv(HTTP), pvc(block), block=block, overhead=0.0 if block else 0.06,
                              preallocation=False, scratch=not block,
                              proxy={"http_proxy": "http://proxy:3128", "https_proxy": "",
                                     "no_proxy": ".svc"}, resources=RESOURCES)


def upload(block: bool, *, clone_target: bool = False) -> Obj:
    return importpod.upload_pod_spec(dv({"upload": {}}), pvc(block), block=block,
                                     overhead=0.0 if block else 0.06, preallocation=True,
                                     resources=RESOURCES, tls_secret="cdi-upload-disk",
                                     scratch=not clone_target)


def clone_source(block: bool) -> Obj:
    source = dv({"pvc": {"name": "golden", "namespace": "images"}})
    return clone_pods.source_pod(source, pvc(False), pvc(block, "golden", "images"),
                                 "cdi-upload-disk.ns.svc:8443", tls=True, resources=RESOURCES)


# (id, builder, block, component, scratch)
WORKERS: list[tuple[str, Any, bool, str, bool]] = [
    ("importer-fs", lambda: importer(False), False, "importer", True),
    ("importer-block", lambda: importer(True), True, "importer", False),
    ("upload-fs", lambda: upload(False), False, "cdi-upload-server", True),
    ("upload-block", lambda: upload(True), True, "cdi-upload-server", True),
    ("clone-target", lambda: upload(False, clone_target=True), False, "cdi-upload-server",
     False),
    ("clone-source-fs", lambda: clone_source(False), False, "cdi-clone-source", False),
    ("clone-source-block", lambda: clone_source(True), True, "cdi-clone-source", False),
]
IDS = [w[0] for w in WORKERS]
CLONE_SOURCE = ("clone-source-fs", "clone-source-block")


def params(gaps: dict[tuple[str, ...], str] | None = None) -> list[Any]:
    """WORKERS, with the listed ones marked as known gaps."""
    out = []
    for w in WORKERS:
        reason = next((r for ids, r in (gaps or {}).items() if w[0] in ids), None)
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        out.append(pytest.param(*w[1:], id=w[0], marks=marks))
    return out


def container(pod: Obj) -> Obj:
    assert len(pod["spec"]["containers"]) == 1
    return dict(pod["spec"]["containers"][0])


def env(pod: Obj) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(pod)["env"]}


def mounts(pod: Obj) -> dict[str, str]:
    """mount path or device path -> the claim (or secret/config map) behind it."""
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}

    def source(name: str) -> str:
        v = volumes[name]
        if "persistentVolumeClaim" in v:
            return "pvc:" + v["persistentVolumeClaim"]["claimName"]
        if "secret" in v:
            return "secret:" + v["secret"]["secretName"]
        return "configmap:" + v["configMap"]["name"]

    c = container(pod)
    found = {m["mountPath"]: source(m["name"]) for m in c.get("volumeMounts", [])}
    found.update({d["devicePath"]: source(d["name"]) for d in c.get("volumeDevices", [])})
    return found


@pytest.mark.parametrize(("build", "block", "component", "scratch"), params())
def test_names_labels_and_restart_policy(build: Any, block: bool, component: str,
                                         scratch: bool) -> None:
    pod = build()
    name = {"importer": "importer-disk", "cdi-upload-server": "cdi-upload-disk",
            "cdi-clone-source": "dv-uid-source-pod"}[component]
    assert (pod["apiVersion"], pod["kind"], pod["metadata"]["name"]) == ("v1", "Pod", name)
    labels = pod["metadata"]["labels"]
    assert labels["app"] == "containerized-data-importer"
    assert labels["cdi.kubevirt.io"] == component
    assert pod["spec"]["restartPolicy"] == "OnFailure"
    c = container(pod)
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert c.get("terminationMessagePath", "/dev/termination-log") == "/dev/termination-log"
    assert {"name": "metrics", "containerPort": 8443} in [
        {k: p[k] for k in ("name", "containerPort")} for p in c["ports"]]


@pytest.mark.parametrize(("build", "block", "component", "scratch"), params())
def test_metrics_label(build: Any, block: bool, component: str, scratch: bool) -> None:
    assert build()["metadata"]["labels"]["prometheus.cdi.kubevirt.io"] == "true"


@pytest.mark.parametrize(("build", "block", "component", "scratch"), params())
def test_sidecar_and_network_annotations(build: Any, block: bool, component: str,
                                         scratch: bool) -> None:
    annotations = build()["metadata"]["annotations"]
    assert annotations["sidecar.istio.io/inject"] == "false"
    assert annotations["linkerd.io/inject"] == "disabled"
    assert annotations["k8s.v1.cni.cncf.io/networks"] == "storage-net"


@pytest.mark.parametrize(("build", "block", "component", "scratch"), params())
def test_volume_layout(build: Any, block: bool, component: str, scratch: bool) -> None:
    pod = build()
    found = mounts(pod)
    c = container(pod)
    if component == "cdi-clone-source":
        claim = "pvc:golden"
        path = "/dev/cdi-block-volume" if block else clone_pods.SOURCE_MOUNT
        assert pod["spec"]["volumes"][0]["persistentVolumeClaim"]["readOnly"] is True
    else:
        claim = "pvc:disk"
        path = "/dev/cdi-block-volume" if block else "/data"
    assert found[path] == claim
    if block:
        assert [d["devicePath"] for d in c["volumeDevices"]] == ["/dev/cdi-block-volume"]
        assert "/data" not in found
    else:
        assert "volumeDevices" not in c
    assert found.get("/scratch") == ("pvc:disk-scratch" if scratch else None)


@pytest.mark.parametrize(("build", "block", "component", "scratch"), params())
def test_resources_from_cdiconfig(build: Any, block: bool, component: str,
                                  scratch: bool) -> None:
    assert container(build())["resources"] == RESOURCES


@pytest.mark.parametrize(("build", "block", "component", "scratch"), params())
def test_restricted_security_context(build: Any, block: bool, component: str,
                                     scratch: bool) -> None:
    pod = build()
    pod_sc = pod["spec"].get("securityContext") or {}
    assert pod_sc.get("runAsNonRoot") is True
    assert pod_sc.get("runAsUser") == 107
    assert pod_sc.get("fsGroup") == 107
    assert pod_sc.get("seccompProfile") == {"type": "RuntimeDefault"}
    sc = container(pod).get("securityContext") or {}
    assert sc.get("allowPrivilegeEscalation") is False
    assert sc.get("capabilities") == {"drop": ["ALL"]}


@pytest.mark.parametrize(("build", "block", "component", "scratch"), params())
def test_priority_class(build: Any, block: bool, component: str, scratch: bool) -> None:
    assert build()["spec"].get("priorityClassName") == "vm-disks"


@pytest.mark.parametrize("block", [False, True])
def test_importer_environment(block: bool) -> None:
    e = env(importer(block))
    assert set(IMPORTER_ENV) <= set(e)
    assert e["IMPORTER_SOURCE"] == "http"
    assert e["IMPORTER_ENDPOINT"] == HTTP["http"]["url"]
    assert e["IMPORTER_CONTENTTYPE"] == "kubevirt"
    assert e["IMPORTER_IMAGE_SIZE"] == "10Gi"
    assert e["OWNER_UID"] == "dv-uid"
    assert e["FILESYSTEM_OVERHEAD"] == ("0" if block else "0.06")
    assert e["PREALLOCATION"] == "false"
    assert e["http_proxy"] == "http://proxy:3128" and e["no_proxy"] == ".svc"
    assert "https_proxy" not in e  # empty settings are left out
    assert mounts(importer(block))["/certs"] == "configmap:ca-bundle"


def test_importer_cert_dir_is_named() -> None:
    assert env(importer(False)).get("IMPORTER_CERT_DIR") == "/certs"


@pytest.mark.parametrize("block", [False, True])
def test_upload_server_environment(block: bool) -> None:
    pod = upload(block)
    e = env(pod)
    assert set(UPLOAD_ENV) <= set(e)
    assert (e["TLS_KEY_FILE"], e["TLS_CERT_FILE"], e["CLIENT_CERT_FILE"]) == (
        "/etc/tls/tls.key", "/etc/tls/tls.crt", "/etc/tls/ca.crt")
    assert mounts(pod)["/etc/tls"] == "secret:cdi-upload-disk"
    assert e["CLIENT_NAME"] == pki.UPLOAD_CLIENT_NAME
    assert e["UPLOAD_IMAGE_SIZE"] == "10Gi"
    assert e["LISTEN_PORT"] == "8443"
    assert e["FILESYSTEM_OVERHEAD"] == ("0" if block else "0.06")
    assert e["PREALLOCATION"] == "true"
    assert pod["metadata"]["labels"]["cdi.kubevirt.io/uploadTarget"] == "disk-uid"


def test_upload_server_cdi_only_variables() -> None:
    """CDI names the device of a block target in DESTINATION, and sets DEADLINE only when a
    deadline is asked for; LISTEN_ADDRESS is the server's own default (all addresses)."""
    assert env(upload(True)).get("DESTINATION") == "/dev/cdi-block-volume"
    fs = env(upload(False))
    assert "DESTINATION" not in fs and "DEADLINE" not in fs and "LISTEN_ADDRESS" not in fs


@pytest.mark.parametrize("block", [False, True])
def test_worker_pods_are_owned_by_their_claim(block: bool) -> None:
    for pod in (importer(block), upload(block)):
        (ref,) = pod["metadata"]["ownerReferences"]
        assert (ref["kind"], ref["name"], ref["uid"], ref["controller"]) == \
            ("PersistentVolumeClaim", "disk", "disk-uid", True)


def test_clone_source_environment() -> None:
    pod = clone_source(False)
    e = env(pod)
    assert e["UPLOAD_URL"] == "https://cdi-upload-disk.ns.svc:8443/v1beta1/upload"
    assert e["OWNER_UID"] == "dv-uid"
    assert pod["metadata"]["namespace"] == "images"  # next to its source
    assert mounts(pod)[clone_pods.CLIENT_TLS_DIR] == "secret:dv-uid-source-pod"


def test_clone_source_affinity() -> None:
    """Near the target's upload server if possible; a ReadWriteOnce-only source on the node
    of the other source pods of that claim (CDI's hostAssistedSourcePodCloneSource)."""
    pod = clone_source(False)
    source_uid = pod["metadata"]["labels"]["cdi.kubevirt.io/hostAssistedSourcePodCloneSource"]
    affinity = pod["spec"]["affinity"]["podAffinity"]
    (preferred,) = affinity["preferredDuringSchedulingIgnoredDuringExecution"]
    assert preferred["weight"] == 100
    assert preferred["podAffinityTerm"]["labelSelector"]["matchExpressions"] == [
        {"key": "cdi.kubevirt.io/uploadTarget", "operator": "In", "values": ["disk-uid"]}]
    assert preferred["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    (required,) = affinity["requiredDuringSchedulingIgnoredDuringExecution"]
    assert required["labelSelector"]["matchExpressions"] == [{
        "key": "cdi.kubevirt.io/hostAssistedSourcePodCloneSource", "operator": "In",
        "values": [source_uid]}]
    assert required["namespaces"] == ["images"]
    # Workload placement adds its own affinity; the pod's terms stay.
    node = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [
            {"key": "disk", "operator": "In", "values": ["ssd"]}]}]}}}
    placed = importpod.place(pod, {"affinity": node})["spec"]["affinity"]
    assert placed["nodeAffinity"] == node["nodeAffinity"]
    assert placed["podAffinity"] == affinity


def test_scratch_claim_is_owned_by_its_pod_and_kept_out_of_backups() -> None:
    pod = importer(False)
    pod["metadata"]["uid"] = "pod-uid"
    status = {"filesystemOverhead": {"global": "0.06"}, "scratchSpaceStorageClass": "scratch"}
    claim = importpod.scratch_claim(pvc(False), pod, status)
    assert claim["metadata"]["name"] == "disk-scratch"
    assert claim["metadata"]["labels"] == {"app": "containerized-data-importer",
                                           "velero.io/exclude-from-backup": "true"}
    (ref,) = claim["metadata"]["ownerReferences"]
    assert (ref["kind"], ref["name"], ref["uid"]) == ("Pod", "importer-disk", "pod-uid")
    spec = claim["spec"]
    assert (spec["accessModes"], spec["volumeMode"], spec["storageClassName"]) == (
        ["ReadWriteOnce"], "Filesystem", "scratch")
    # at least the target's usable space (10Gi less 6%), plus the scratch class's overhead
    assert int(spec["resources"]["requests"]["storage"]) >= int(10 * 2**30 * 0.94)
