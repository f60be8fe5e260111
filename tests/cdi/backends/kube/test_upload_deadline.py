"""Upload server deadlines on the fake API server: `cdi controller` gives each upload
server a DEADLINE from `certificates.server`, and replaces one that passed it without
an upload (new pod, new certificate) instead of failing its DataVolume or claim."""

from __future__ import annotations

import asyncio
import base64
import datetime
from pathlib import Path
from typing import Any

from cryptography import x509

from cdi.api.certconfig import CertConfig, Lifetime
from cdi.backends.port import Obj
from cdi.cli import controller
from importer.upload.uploads import DEADLINE_MESSAGE
from tests.cdi.backends.kube.test_controller import eventually
from tests.support.fakekube import FakeKube

A = "cdi.kubevirt.io/"
SERVER = Lifetime(datetime.timedelta(hours=2), datetime.timedelta(minutes=30))
READY = {"phase": "Running", "podIP": "",
         "conditions": [{"type": "Ready", "status": "True"}],
         "containerStatuses": [{"name": "cdi-upload-server", "ready": True, "restartCount": 0,
                                "state": {"running": {}}}]}
# The kubelet restarted our server (it exits 1 at its deadline, restartPolicy OnFailure).
RESTARTED = {"phase": "Running", "conditions": [{"type": "Ready", "status": "False"}],
             "containerStatuses": [{
                 "name": "cdi-upload-server", "ready": False, "restartCount": 1,
                 "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off"}},
                 "lastState": {"terminated": {"exitCode": 1, "reason": "Error",
                                              "message": DEADLINE_MESSAGE}}}]}
# CDI's server: it exits 0 at its deadline, so the pod succeeds with the message.
CDI_SUCCEEDED = {"phase": "Succeeded", "containerStatuses": [{
    "name": "cdi-upload-server", "ready": False, "restartCount": 0,
    "state": {"terminated": {"exitCode": 0, "reason": "Completed",
                             "message": '{"deadlinePassed": true}'}}}]}
DONE = {"phase": "Succeeded", "containerStatuses": [{
    "name": "cdi-upload-server", "ready": False, "restartCount": 0,
    "state": {"terminated": {"exitCode": 0, "reason": "Completed", "message": (
        '{"message": "Upload Complete", "scratchSpaceRequired": false, '
        '"preallocationApplied": false}')}}}]}


def options(fake: FakeKube, tmp_path: Path) -> controller.Options:
    return controller.Options(kubeconfig=fake.kubeconfig(tmp_path / "kubeconfig"),
                              identity="replica-1", certs=CertConfig(server=SERVER))


def certificate(fake: FakeKube, name: str, ns: str) -> x509.Certificate:
    secret = fake.get("Secret", name, ns)
    assert secret is not None
    return x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"]))


def deadline(pod: Obj) -> datetime.datetime:
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    return datetime.datetime.fromisoformat(env["DEADLINE"])


def events(fake: FakeKube, name: str, reason: str) -> list[Obj]:
    return [e for (kind, _, _), e in fake.call(lambda: dict(fake.objects)).items()
            if kind == "Event" and e["involvedObject"]["name"] == name
            and e["reason"] == reason]


def replaced(fake: FakeKube, name: str, ns: str, old: Obj) -> Any:
    pod = fake.get("Pod", name, ns)
    return pod if pod and pod["metadata"]["uid"] != old["metadata"]["uid"] else None


def dv_phase(fake: FakeKube, name: str, ns: str) -> str:
    return str(((fake.get("DataVolume", name, ns) or {}).get("status") or {}).get("phase", ""))


def test_a_datavolume_upload_server_past_its_deadline_is_replaced(fake: FakeKube,
                                                                  tmp_path: Path) -> None:
    async def scenario() -> None:
        stop = asyncio.Event()
        running = asyncio.ensure_future(controller.run(options(fake, tmp_path), stop))
        fake.put({"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
                  "metadata": {"name": "up", "namespace": "vms"},
                  "spec": {"source": {"upload": {}},
                           "pvc": {"accessModes": ["ReadWriteOnce"],
                                   "resources": {"requests": {"storage": "1Gi"}}}}})
        await eventually(lambda: fake.get("PersistentVolumeClaim", "up", "vms"))
        fake.patch("PersistentVolumeClaim", "up", "vms", {"status": {"phase": "Bound"}},
                   status=True)
        before = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
        first = await eventually(lambda: fake.get("Pod", "cdi-upload-up", "vms"))
        # DEADLINE: now + duration - renewBefore; the certificate lasts the duration.
        due = deadline(first)
        assert before + datetime.timedelta(minutes=90) <= due
        assert due <= datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=90)
        first_cert = certificate(fake, "cdi-upload-up", "vms")
        life = first_cert.not_valid_after_utc - due
        assert datetime.timedelta(minutes=29) <= life <= datetime.timedelta(minutes=31)

        fake.patch("Pod", "cdi-upload-up", "vms", {"status": READY}, status=True)
        await eventually(lambda: dv_phase(fake, "up", "vms") == "UploadReady")
        claim = fake.get("PersistentVolumeClaim", "up", "vms") or {}
        assert (claim["metadata"]["annotations"][A + "storage.pod.phase"],
                claim["metadata"]["annotations"][A + "storage.pod.ready"]) == ("Running", "true")

        # The deadline passes with no upload: a new pod, a new certificate, no failure.
        # The old pod's scratch claim goes with it (slowly, as pvc-protection holds it on
        # a cluster): the new pod waits, or the claim would be collected under it.
        fake.patch("PersistentVolumeClaim", "up-scratch", "vms",
                   {"metadata": {"finalizers": ["kubernetes.io/pvc-protection"]}})
        fake.patch("Pod", "cdi-upload-up", "vms", {"status": RESTARTED}, status=True)
        await eventually(lambda: fake.get("Pod", "cdi-upload-up", "vms") is None)
        await asyncio.sleep(1.5)
        assert fake.get("Pod", "cdi-upload-up", "vms") is None
        old_scratch = fake.get("PersistentVolumeClaim", "up-scratch", "vms") or {}
        assert old_scratch["metadata"]["deletionTimestamp"]
        fake.patch("PersistentVolumeClaim", "up-scratch", "vms",
                   {"metadata": {"finalizers": None}})
        second = await eventually(lambda: replaced(fake, "cdi-upload-up", "vms", first))
        scratch = await eventually(lambda: fake.get("PersistentVolumeClaim", "up-scratch", "vms"))
        assert scratch["metadata"]["ownerReferences"][0]["uid"] == second["metadata"]["uid"]
        second_cert = certificate(fake, "cdi-upload-up", "vms")
        assert second_cert.serial_number != first_cert.serial_number
        assert deadline(second) >= due
        dv = await eventually(lambda: dv_phase(fake, "up", "vms") == "UploadScheduled"
                              and fake.get("DataVolume", "up", "vms"))
        assert dv["status"]["restartCount"] == 0
        (recycled,) = await eventually(lambda: events(fake, "up", "UploadServerRecycled"))
        assert recycled["type"] == "Normal"
        assert recycled["involvedObject"]["kind"] == "DataVolume"
        assert "cdi-upload-up" in recycled["message"]
        assert events(fake, "up", "ErrImportFailed") == []
        claim = fake.get("PersistentVolumeClaim", "up", "vms") or {}
        annotations = claim["metadata"]["annotations"]
        assert A + "storage.import.fatalError" not in annotations
        assert (annotations[A + "storage.pod.phase"], annotations[A + "storage.pod.ready"],
                annotations[A + "storage.condition.running.message"]) == (
            "", "false", "Deadline Passed")

        # The new server takes the upload.
        fake.patch("Pod", "cdi-upload-up", "vms", {"status": READY}, status=True)
        await eventually(lambda: dv_phase(fake, "up", "vms") == "UploadReady")
        fake.patch("Pod", "cdi-upload-up", "vms", {"status": DONE}, status=True)
        await eventually(lambda: dv_phase(fake, "up", "vms") == "Succeeded")
        assert len(events(fake, "up", "UploadServerRecycled")) == 1
        stop.set()
        await asyncio.wait_for(running, 10)

    asyncio.run(scenario())


def test_a_bare_upload_claim_gets_a_new_server_past_its_deadline(fake: FakeKube,
                                                                 tmp_path: Path) -> None:
    async def scenario() -> None:
        stop = asyncio.Event()
        running = asyncio.ensure_future(controller.run(options(fake, tmp_path), stop))
        fake.put({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                  "metadata": {"name": "bare", "namespace": "vms",
                               "annotations": {A + "storage.upload.target": ""}},
                  "spec": {"accessModes": ["ReadWriteOnce"],
                           "resources": {"requests": {"storage": "1Gi"}}}})
        first = await eventually(lambda: fake.get("Pod", "cdi-upload-bare", "vms"))
        assert deadline(first) > datetime.datetime.now(datetime.UTC)
        first_cert = certificate(fake, "cdi-upload-bare", "vms")
        fake.patch("Pod", "cdi-upload-bare", "vms", {"status": READY}, status=True)
        await eventually(lambda: ((fake.get("PersistentVolumeClaim", "bare", "vms") or {})
                                  ["metadata"]["annotations"].get(A + "storage.pod.ready")
                                  == "true"))
        # CDI's own server form: the pod succeeded, saying the deadline passed.
        fake.patch("Pod", "cdi-upload-bare", "vms", {"status": CDI_SUCCEEDED}, status=True)
        await eventually(lambda: replaced(fake, "cdi-upload-bare", "vms", first))
        assert certificate(fake, "cdi-upload-bare", "vms").serial_number != \
            first_cert.serial_number
        (recycled,) = await eventually(
            lambda: events(fake, "bare", "UploadServerRecycled"))
        assert recycled["involvedObject"]["kind"] == "PersistentVolumeClaim"
        annotations = (fake.get("PersistentVolumeClaim", "bare", "vms") or {})[
            "metadata"]["annotations"]
        assert annotations[A + "storage.pod.phase"] not in ("Succeeded", "Failed")
        assert events(fake, "bare", "UploadSucceeded") == []
        assert events(fake, "bare", "UploadFailed") == []
        # The new server takes the upload.
        fake.patch("Pod", "cdi-upload-bare", "vms", {"status": DONE}, status=True)
        await eventually(lambda: ((fake.get("PersistentVolumeClaim", "bare", "vms") or {})
                                  ["metadata"]["annotations"].get(A + "storage.pod.phase")
                                  == "Succeeded"))
        assert len(events(fake, "bare", "UploadSucceeded")) == 1
        stop.set()
        await asyncio.wait_for(running, 10)

    asyncio.run(scenario())
