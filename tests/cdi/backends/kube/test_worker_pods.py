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
from kubernetes_validate import utils as kubernetes_validate

from cdi.api import pki
from cdi.backends.port import Obj
from cdi.controllers import imagevolume, importpod
from cdi.controllers.clone import pods as clone_pods
from cdi.controllers.workers import Workers
from importer import settings as importer_settings

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
NODE_PULL = {"registry": {"url": "docker://quay.example.com/vms/fedora:41", "pullMethod": "node",
                          "secretRef": "pull-secret", "certConfigMap": "registry-ca",
                          "platform": {"architecture": "arm64"}}}
# The worker images and pull policy `cdi controller` reads from its Deployment.
WORKERS_SETTINGS = Workers(importer_image="r.example/cdi-importer:1.0",
                           uploadserver_image="r.example/cdi-uploadserver:1.0",
                           cloner_image="r.example/cdi-cloner:1.0", pull_policy="IfNotPresent",
                           image_volumes=True)
PROXY = {"http_proxy": "http://proxy:3128", "https_proxy": "", "no_proxy": ".svc"}
KUBERNETES = "1.37.0"  # the newest schema kubernetes-validate bundles


def importer(block: bool) -> Obj:
    return importpod.pod_spec(dv(HTTP), pvc(block), block=block, overhead=0.0 if block else 0.06,
                              preallocation=False, scratch=not block, proxy=PROXY,
                              resources=RESOURCES, workers=WORKERS_SETTINGS)


def node_pull(block: bool, *, scratch: bool = True) -> Obj:
    return imagevolume.pod_spec(dv(NODE_PULL), pvc(block), block=block,
                                overhead=0.0 if block else 0.06, preallocation=False,
                                scratch=scratch, proxy=PROXY, resources=RESOURCES,
                                workers=WORKERS_SETTINGS,
                                insecure_registries=("quay.example.com",))


def upload(block: bool, *, clone_target: bool = False) -> Obj:
    return importpod.upload_pod_spec(dv({"upload": {}}), pvc(block), block=block,
                                     overhead=0.0 if block else 0.06, preallocation=True,
                                     resources=RESOURCES, tls_secret="cdi-upload-disk",
                                     scratch=not clone_target, workers=WORKERS_SETTINGS)


def clone_source(block: bool) -> Obj:
    source = dv({"pvc": {"name": "golden", "namespace": "images"}})
    return clone_pods.source_pod(source, pvc(False), pvc(block, "golden", "images"),
                                 "cdi-upload-disk.ns.svc:8443", tls=True, resources=RESOURCES,
                                 workers=WORKERS_SETTINGS)


# (id, builder, block, component, scratch)
WORKERS: list[tuple[str, Any, bool, str, bool]] = [
    ("importer-fs", lambda: importer(False), False, "importer", True),
    ("importer-block", lambda: importer(True), True, "importer", False),
    ("node-pull-fs", lambda: node_pull(False), False, "importer", True),
    ("node-pull-block", lambda: node_pull(True, scratch=False), True, "importer", False),
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
        if "image" in v:
            return "image:" + v["image"]["reference"]
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


IMAGES = {"importer": "r.example/cdi-importer:1.0",
          "cdi-upload-server": "r.example/cdi-uploadserver:1.0",
          "cdi-clone-source": "r.example/cdi-cloner:1.0"}
COMMANDS = {"importer": "cdi-importer", "cdi-upload-server": "cdi-uploadserver",
            "cdi-clone-source": "cdi-clone-source"}


@pytest.mark.parametrize(("build", "block", "component", "scratch"), params())
def test_image_and_pull_policy_from_the_worker_settings(build: Any, block: bool,
                                                        component: str, scratch: bool) -> None:
    c = container(build())
    assert (c["name"], c["image"], c["imagePullPolicy"], c["command"]) == (
        component, IMAGES[component], "IfNotPresent", [COMMANDS[component]])


@pytest.mark.parametrize(("build", "block", "component", "scratch"), params())
def test_worker_pods_pass_the_official_schema(build: Any, block: bool, component: str,
                                              scratch: bool) -> None:
    kubernetes_validate.validate(build(), KUBERNETES, strict=True)


def test_embedded_workers_are_named_by_their_command() -> None:
    """`cdi serve`'s pod runner runs the command (``cdi-importer`` is ``python -m
    importer``) and ignores the image, so the embedded defaults write no pull policy."""
    pod = importpod.pod_spec(dv(HTTP), pvc(False), block=False, overhead=0.06,
                             preallocation=False, scratch=False, proxy={}, resources={},
                             workers=Workers())
    c = container(pod)
    assert (c["image"], c["command"], "imagePullPolicy" in c) == (
        "cdi-importer", ["cdi-importer"], False)


def test_node_pull_importer_pod_field_by_field() -> None:
    """The ordinary importer pod with the DataVolume's image mounted as an OCI image volume
    (the kubelet pulls it: the pull secret, CA ConfigMap and insecure-registry setting are
    not the importer's business), CDI's IMPORTER_PULL_METHOD, and the architecture as a
    node selector (CDI's rule)."""
    expected = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": "importer-disk", "namespace": "ns",
            "labels": {"app": "containerized-data-importer", "cdi.kubevirt.io": "importer",
                       "prometheus.cdi.kubevirt.io": "true"},
            "annotations": {"sidecar.istio.io/inject": "false", "linkerd.io/inject": "disabled",
                            "k8s.v1.cni.cncf.io/networks": "storage-net"},
            "ownerReferences": [{"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                                 "name": "disk", "uid": "disk-uid", "controller": True,
                                 "blockOwnerDeletion": True}]},
        "spec": {
            "restartPolicy": "OnFailure",
            "containers": [{
                "name": "importer", "image": "r.example/cdi-importer:1.0",
                "imagePullPolicy": "IfNotPresent", "command": ["cdi-importer"],
                "env": [
                    {"name": "IMPORTER_SOURCE", "value": "registry"},
                    {"name": "IMPORTER_ENDPOINT",
                     "value": "docker://quay.example.com/vms/fedora:41"},
                    {"name": "IMPORTER_CONTENTTYPE", "value": "kubevirt"},
                    {"name": "IMPORTER_PULL_METHOD", "value": "node"},
                    {"name": "IMPORTER_IMAGE_SIZE", "value": "10Gi"},
                    {"name": "http_proxy", "value": "http://proxy:3128"},
                    {"name": "no_proxy", "value": ".svc"},
                    {"name": "OWNER_UID", "value": "dv-uid"},
                    {"name": "FILESYSTEM_OVERHEAD", "value": "0.06"},
                    {"name": "PREALLOCATION", "value": "false"}],
                "ports": [{"name": "metrics", "containerPort": 8443, "protocol": "TCP"}],
                "terminationMessagePolicy": "FallbackToLogsOnError",
                "resources": RESOURCES,
                "volumeMounts": [
                    {"name": "cdi-data-vol", "mountPath": "/data"},
                    {"name": "cdi-scratch-vol", "mountPath": "/scratch"},
                    {"name": "cdi-image-volume", "mountPath": "/containerdisk",
                     "readOnly": True}],
                "securityContext": {"allowPrivilegeEscalation": False,
                                    "capabilities": {"drop": ["ALL"]}}}],
            "volumes": [
                {"name": "cdi-data-vol", "persistentVolumeClaim": {"claimName": "disk"}},
                {"name": "cdi-scratch-vol",
                 "persistentVolumeClaim": {"claimName": "disk-scratch"}},
                {"name": "cdi-image-volume",
                 "image": {"reference": "quay.example.com/vms/fedora:41",
                           "pullPolicy": "IfNotPresent"}}],
            "securityContext": {"runAsNonRoot": True, "runAsUser": 107, "fsGroup": 107,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "priorityClassName": "vm-disks",
            "nodeSelector": {"kubernetes.io/arch": "arm64"}},
    }
    pod = node_pull(False)
    assert pod["metadata"] == expected["metadata"]
    assert pod["spec"]["containers"] == expected["spec"]["containers"]
    assert pod["spec"]["volumes"] == expected["spec"]["volumes"]
    assert pod == expected


def test_node_pull_block_target_and_no_pull_policy() -> None:
    """A block target keeps its device; without a configured pull policy the image volume
    takes the kubelet's default (as a container image would)."""
    pod = imagevolume.pod_spec(dv({"registry": {"url": "docker://r.example/os@sha256:" + "a" * 64,
                                                "pullMethod": "node"}}), pvc(True),
                               block=True, overhead=0.0, preallocation=True, scratch=False,
                               proxy={}, resources={}, workers=Workers(image_volumes=True))
    assert mounts(pod) == {"/dev/cdi-block-volume": "pvc:disk",
                           "/containerdisk": f"image:r.example/os@sha256:{'a' * 64}"}
    assert pod["spec"]["volumes"][-1] == {
        "name": "cdi-image-volume", "image": {"reference": f"r.example/os@sha256:{'a' * 64}"}}
    assert "nodeSelector" not in pod["spec"]
    kubernetes_validate.validate(pod, KUBERNETES, strict=True)


def test_node_pull_environment_is_the_importers_contract() -> None:
    """The variables the pod sets are what the importer reads: a node pull from the image
    volume where the pod mounts it."""
    env = {e["name"]: e["value"] for e in container(node_pull(False))["env"]}
    parsed = importer_settings.from_env(env)
    assert (parsed.source, parsed.pull_method, parsed.endpoint) == (
        "registry", "node", "docker://quay.example.com/vms/fedora:41")
    assert str(parsed.image_dir) == imagevolume.IMAGE_DIR
    assert mounts(node_pull(False))[str(parsed.image_dir)] == \
        "image:quay.example.com/vms/fedora:41"


def test_workload_placement_keeps_the_node_pull_architecture() -> None:
    pod = importpod.place(node_pull(False), {"nodeSelector": {"kubernetes.io/arch": "amd64",
                                                              "disk": "ssd"}})
    assert pod["spec"]["nodeSelector"] == {"kubernetes.io/arch": "arm64", "disk": "ssd"}


@pytest.mark.parametrize(("state", "condition"), [
    ({"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image \"r/os:1\""}},
     ("False", "ImagePullFailed", "failed to pull image: Back-off pulling image \"r/os:1\"")),
    ({"waiting": {"reason": "InvalidImageName"}},
     ("False", "ImagePullFailed", "failed to pull image: r.example/cdi-importer:1.0")),
    ({"waiting": {"reason": "CreateContainerConfigError", "message": 'secret "s" not found'}},
     ("False", "CreateContainerConfigError", 'secret "s" not found')),
    ({"waiting": {"reason": "ContainerCreating"}}, None),
    ({"running": {}}, None),
])
def test_a_waiting_worker_says_why(state: Obj, condition: tuple[str, str, str] | None) -> None:
    """What only the cluster can fix (CDI's rules): a missing Secret, an image the node
    cannot pull (a node-pull importer's image volume is pulled the same way)."""
    assert importpod.waiting({"image": "r.example/cdi-importer:1.0", "state": state}) == \
        condition


def test_what_a_backend_refuses_of_a_registry_source() -> None:
    """Node pull needs image volumes (the embedded backend has none; its message names
    it); an OpenShift ImageStream is refused everywhere; a URL with pod pull never."""
    stream = dv({"registry": {"imageStream": "fedora", "pullMethod": "node"}})
    assert imagevolume.refusal(dv(NODE_PULL), backend="embedded", workers=Workers()) == (
        "registry pullMethod node is not supported on the embedded backend; "
        "use pullMethod pod (the default)")
    assert imagevolume.refusal(stream, backend="embedded", workers=Workers()) == (
        "registry pullMethod node is not supported on the embedded backend; "
        "use pullMethod pod (the default)")
    assert imagevolume.refusal(dv(NODE_PULL), backend="Kubernetes",
                               workers=WORKERS_SETTINGS) is None
    assert imagevolume.refusal(stream, backend="Kubernetes", workers=WORKERS_SETTINGS) == (
        "registry imageStream (an OpenShift ImageStream) is not supported; use url")
    pod_pull = dv({"registry": {"url": "docker://r.example/os:1"}})
    assert imagevolume.refusal(pod_pull, backend="embedded", workers=Workers()) is None
    assert imagevolume.refusal(dv(HTTP), backend="embedded", workers=Workers()) is None
