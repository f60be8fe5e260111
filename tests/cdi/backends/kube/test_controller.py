"""`cdi controller` on the fake API server: the controllers run unchanged on KubeStore."""

from __future__ import annotations

import asyncio
import base64
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from click.testing import CliRunner
from cryptography import x509

from cdi.backends.port import Obj
from cdi.cli import controller
from cdi.cli.main import main
from cdi.controllers.workers import Workers
from tests.support.fakekube import FakeKube

SC = {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
      "metadata": {"name": "csi-fast"}, "provisioner": "csi.example.com"}
VSC = {"apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshotClass",
       "metadata": {"name": "csi-snaps"}, "driver": "csi.example.com",
       "deletionPolicy": "Delete"}


async def eventually(fn: Callable[[], Any], timeout: float = 20.0) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await asyncio.to_thread(fn)
        if value:
            return value
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.05)


def conditions(obj: Obj | None) -> list[tuple[str, str, str]]:
    return [(c["type"], c["status"], c["reason"])
            for c in ((obj or {}).get("status") or {}).get("conditions", [])]


def test_the_controllers_reconcile_through_the_api(fake: FakeKube, tmp_path: Path) -> None:
    options = controller.Options(kubeconfig=fake.kubeconfig(tmp_path / "kubeconfig"),
                                 identity="replica-1", lease_duration=1.0,
                                 renew_deadline=0.8, retry_period=0.1,
                                 upload_proxy_url="cdi-uploadproxy.example.com")

    async def scenario() -> None:
        stop = asyncio.Event()
        running = asyncio.ensure_future(controller.run(options, stop))
        lease = await eventually(lambda: fake.get("Lease", controller.LEASE_NAME, "cdi"))
        assert lease["spec"]["holderIdentity"] == "replica-1"
        # StorageProfile controller: a profile per class, its strategy from the snapshot class.
        fake.put(VSC)
        fake.put(SC)
        profile = await eventually(lambda: (fake.get("StorageProfile", "csi-fast") or {})
                                   .get("status"))
        assert profile["provisioner"] == "csi.example.com"
        assert profile["cloneStrategy"] == "snapshot"
        assert profile["snapshotClass"] == "csi-snaps"
        # CDIConfig controller: the singleton, with the proxy URL we were given.
        config = await eventually(lambda: (fake.get("CDIConfig", "config") or {})
                                  .get("status", {}).get("uploadProxyURL"))
        assert config == "cdi-uploadproxy.example.com"
        # DataSource controller: Ready once its claim exists.
        fake.put({"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataSource",
                  "metadata": {"name": "fedora", "namespace": "golden"},
                  "spec": {"source": {"pvc": {"name": "fedora-1", "namespace": "golden"}}}})
        await eventually(lambda: conditions(fake.get("DataSource", "fedora", "golden"))
                         == [("Ready", "False", "NotFound")])
        fake.put({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                  "metadata": {"name": "fedora-1", "namespace": "golden"},
                  "spec": {"resources": {"requests": {"storage": "1Gi"}}}})
        await eventually(lambda: conditions(fake.get("DataSource", "fedora", "golden"))
                         == [("Ready", "True", "Ready")])
        # Class gone: its profile goes too.
        fake.remove("StorageClass", "csi-fast")
        await eventually(lambda: fake.get("StorageProfile", "csi-fast") is None)
        # The upload signers were made once, in the install namespace.
        for name in (controller.SERVER_SIGNER, controller.CLIENT_SIGNER):
            secret = fake.get("Secret", name, "cdi")
            assert secret is not None and set(secret["data"]) == {"tls.crt", "tls.key"}
        stop.set()
        await asyncio.wait_for(running, 10)
        released = fake.get("Lease", controller.LEASE_NAME, "cdi")
        assert released is not None and released["spec"]["holderIdentity"] == ""
        await eventually(lambda: fake.watchers() == 0, timeout=5)  # every watch closed

    asyncio.run(scenario())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_datavolume_gets_its_claim_and_importer_pod(fake: FakeKube, tmp_path: Path) -> None:
    """The DataVolume controller through the API: claim first, then (once a provisioner
    binds it) the importer Pod, with the deployment's image; health and metrics answer."""
    port = free_port()
    options = controller.Options(kubeconfig=fake.kubeconfig(tmp_path / "kubeconfig"),
                                 identity="replica-1", health_address=f"127.0.0.1:{port}",
                                 workers=Workers(importer_image="registry.example.com/cdi:1.0",
                                                 uploadserver_image="registry.example.com/"
                                                                    "cdi-upload:1.0",
                                                 pull_policy="IfNotPresent",
                                                 image_volumes=True))

    async def scenario() -> None:
        stop = asyncio.Event()
        running = asyncio.ensure_future(controller.run(options, stop))
        fake.put({"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
                  "metadata": {"name": "disk", "namespace": "vms"},
                  "spec": {"source": {"http": {"url": "https://images.example.com/d.qcow2"}},
                           "pvc": {"accessModes": ["ReadWriteOnce"],
                                   "resources": {"requests": {"storage": "1Gi"}}}}})
        claim = await eventually(lambda: fake.get("PersistentVolumeClaim", "disk", "vms"))
        assert claim["metadata"]["ownerReferences"][0]["kind"] == "DataVolume"
        fake.patch("PersistentVolumeClaim", "disk", "vms", {"status": {"phase": "Bound"}},
                   status=True)
        pod = await eventually(lambda: fake.get("Pod", "importer-disk", "vms"))
        (container,) = pod["spec"]["containers"]
        assert container["image"] == "registry.example.com/cdi:1.0"
        assert container["imagePullPolicy"] == "IfNotPresent"
        assert container["command"] == ["cdi-importer"]
        dv = await eventually(lambda: (fake.get("DataVolume", "disk", "vms") or {})
                              .get("status", {}).get("phase") == "ImportScheduled"
                              and fake.get("DataVolume", "disk", "vms"))
        assert dv["status"]["claimName"] == "disk"
        # A node pull: the importer Pod mounts the image as an image volume (the kubelet
        # pulls it); its pull secret is the node's business, so a missing one is no reason
        # to wait.
        fake.put({"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
                  "metadata": {"name": "node-pull", "namespace": "vms"},
                  "spec": {"source": {"registry": {"url": "docker://r.example/os:1",
                                                   "pullMethod": "node",
                                                   "secretRef": "not-there"}},
                           "pvc": {"accessModes": ["ReadWriteOnce"],
                                   "resources": {"requests": {"storage": "1Gi"}}}}})
        await eventually(lambda: fake.get("PersistentVolumeClaim", "node-pull", "vms"))
        fake.patch("PersistentVolumeClaim", "node-pull", "vms",
                   {"status": {"phase": "Bound"}}, status=True)
        node_pod = await eventually(lambda: fake.get("Pod", "importer-node-pull", "vms"))
        (container,) = node_pod["spec"]["containers"]
        assert (container["image"], container["imagePullPolicy"], container["command"]) == (
            "registry.example.com/cdi:1.0", "IfNotPresent", ["cdi-importer"])
        assert node_pod["spec"]["volumes"][-1] == {
            "name": "cdi-image-volume",
            "image": {"reference": "r.example/os:1", "pullPolicy": "IfNotPresent"}}
        assert container["volumeMounts"][-1] == {
            "name": "cdi-image-volume", "mountPath": "/containerdisk", "readOnly": True}
        assert {"name": "IMPORTER_PULL_METHOD", "value": "node"} in container["env"]
        assert not any(e["name"].startswith(("IMPORTER_ACCESS_KEY_ID", "IMPORTER_SECRET_KEY"))
                       for e in container["env"])
        assert node_pod["spec"]["securityContext"]["runAsNonRoot"] is True
        node_dv = await eventually(lambda: (fake.get("DataVolume", "node-pull", "vms") or {})
                                   .get("status", {}).get("phase") == "ImportScheduled"
                                   and fake.get("DataVolume", "node-pull", "vms"))
        assert [c["reason"] for c in node_dv["status"]["conditions"]
                if c["type"] == "Running"] == ["Pending"]
        # The node cannot pull the image: the kubelet says so in the container's state.
        pulled = 'failed to pull and unpack image "r.example/os:1": not found'
        fake.patch("Pod", "importer-node-pull", "vms", {"status": {
            "phase": "Pending", "containerStatuses": [{
                "name": "importer", "image": "registry.example.com/cdi:1.0", "ready": False,
                "restartCount": 0, "state": {"waiting": {"reason": "ErrImagePull",
                                                         "message": pulled}}}]}}, status=True)
        pull_failed = await eventually(lambda: next(
            (c for c in ((fake.get("DataVolume", "node-pull", "vms") or {}).get("status")
                         or {}).get("conditions") or []
             if c.get("type") == "Running" and c.get("reason") == "ImagePullFailed"), None))
        assert pull_failed["message"] == f"failed to pull image: {pulled}"
        # An upload: its server Pod, and a serving certificate from the signer Secret.
        fake.put({"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
                  "metadata": {"name": "up", "namespace": "vms"},
                  "spec": {"source": {"upload": {}},
                           "pvc": {"accessModes": ["ReadWriteOnce"],
                                   "resources": {"requests": {"storage": "1Gi"}}}}})
        await eventually(lambda: fake.get("PersistentVolumeClaim", "up", "vms"))
        fake.patch("PersistentVolumeClaim", "up", "vms", {"status": {"phase": "Bound"}},
                   status=True)
        upload_pod = await eventually(lambda: fake.get("Pod", "cdi-upload-up", "vms"))
        (container,) = upload_pod["spec"]["containers"]
        assert (container["image"], container["imagePullPolicy"], container["command"]) == (
            "registry.example.com/cdi-upload:1.0", "IfNotPresent", ["cdi-uploadserver"])
        secret = await eventually(lambda: fake.get("Secret", "cdi-upload-up", "vms"))
        # ...and the Service the upload proxy reaches it through.
        service = await eventually(lambda: fake.get("Service", "cdi-upload-up", "vms"))
        claim_uid = (fake.get("PersistentVolumeClaim", "up", "vms") or {})["metadata"]["uid"]
        assert service["spec"]["selector"] == {"cdi.kubevirt.io/uploadTarget": claim_uid}
        assert upload_pod["metadata"]["labels"]["cdi.kubevirt.io/uploadTarget"] == claim_uid
        assert service["spec"]["ports"] == [{"name": "uploadserver", "port": 8443,
                                             "targetPort": 8443, "protocol": "TCP"}]
        signer = fake.get("Secret", controller.SERVER_SIGNER, "cdi")
        assert signer is not None
        served = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"]))
        ca = x509.load_pem_x509_certificate(base64.b64decode(signer["data"]["tls.crt"]))
        assert served.issuer == ca.subject
        served.verify_directly_issued_by(ca)
        async with aiohttp.ClientSession() as session:
            for path, expected in (("/healthz", "ok"), ("/metrics", "python_info")):
                async with session.get(f"https://127.0.0.1:{port}{path}", ssl=False) as r:
                    assert r.status == 200 and expected in await r.text()
        stop.set()
        await asyncio.wait_for(running, 10)

    asyncio.run(scenario())


def test_a_follower_waits_and_stops_cleanly(fake: FakeKube, tmp_path: Path) -> None:
    fake.put({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
              "metadata": {"name": controller.LEASE_NAME, "namespace": "cdi"},
              "spec": {"holderIdentity": "someone-else", "leaseDurationSeconds": 60}})
    options = controller.Options(kubeconfig=fake.kubeconfig(tmp_path / "kubeconfig"),
                                 identity="replica-2", retry_period=0.05)

    async def scenario() -> None:
        stop = asyncio.Event()
        running = asyncio.ensure_future(controller.run(options, stop))
        await asyncio.sleep(0.5)
        assert not running.done()
        stop.set()
        await asyncio.wait_for(running, 10)

    fake.put(SC)
    asyncio.run(scenario())
    assert fake.get("StorageProfile", "csi-fast") is None  # a follower reconciles nothing
    lease = fake.get("Lease", controller.LEASE_NAME, "cdi")
    assert lease is not None and lease["spec"]["holderIdentity"] == "someone-else"


def test_the_command_is_registered() -> None:
    result = CliRunner().invoke(main, ["controller", "--help"])
    assert result.exit_code == 0, result.output
    assert "--kubeconfig" in result.output and "--lease-name" in result.output


def test_a_pull_policy_kubernetes_does_not_know_is_refused() -> None:
    result = CliRunner().invoke(main, ["controller"], env={"PULL_POLICY": "Sometimes"})
    assert result.exit_code == 2
    assert "Invalid value for '--pull-policy': 'Sometimes' is not one of 'Always', " \
           "'IfNotPresent', 'Never'." in result.output


def test_a_refused_worker_pod_shows_in_the_datavolume(fake: FakeKube, tmp_path: Path) -> None:
    """An API server older than image volumes refuses the node-pull importer Pod: the
    DataVolume says so (Running, a Warning event), instead of waiting without a word."""
    why = ('Pod "importer-node-pull" is invalid: spec.volumes[3]: Required value: '
           "must specify a volume type")
    fake.refuse_create = lambda obj: why if obj.get("kind") == "Pod" else None
    options = controller.Options(kubeconfig=fake.kubeconfig(tmp_path / "kubeconfig"),
                                 identity="replica-1", health_address="127.0.0.1:0",
                                 workers=Workers(importer_image="registry.example.com/cdi:1.0",
                                                 image_volumes=True))

    async def scenario() -> None:
        stop = asyncio.Event()
        running = asyncio.ensure_future(controller.run(options, stop))
        fake.put({"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
                  "metadata": {"name": "node-pull", "namespace": "vms"},
                  "spec": {"source": {"registry": {"url": "docker://r.example/os:1",
                                                   "pullMethod": "node"}},
                           "pvc": {"accessModes": ["ReadWriteOnce"],
                                   "resources": {"requests": {"storage": "1Gi"}}}}})
        await eventually(lambda: fake.get("PersistentVolumeClaim", "node-pull", "vms"))
        fake.patch("PersistentVolumeClaim", "node-pull", "vms",
                   {"status": {"phase": "Bound"}}, status=True)
        refused = await eventually(lambda: next(
            (c for c in ((fake.get("DataVolume", "node-pull", "vms") or {}).get("status")
                         or {}).get("conditions") or []
             if c.get("type") == "Running" and c.get("reason") == "PodCreationFailed"), None))
        assert refused["status"] == "False"
        assert refused["message"] == f"the worker pod was refused: {why}"
        dv = fake.get("DataVolume", "node-pull", "vms") or {}
        assert dv["status"]["phase"] == "ImportScheduled"
        event = await eventually(lambda: next(
            (o for (kind, _, _), o in list(fake.objects.items())
             if kind == "Event" and o.get("reason") == "PodCreationFailed"), None))
        assert (event["type"], event["message"]) == (
            "Warning", f"the worker pod was refused: {why}")
        assert fake.get("Pod", "importer-node-pull", "vms") is None
        stop.set()
        await asyncio.wait_for(running, 10)

    asyncio.run(scenario())
