"""The host-assisted copy of a clone: an upload server on the target, a source worker.

The ``copy`` strategy of ``clone.controller`` (CloneScheduled, then
CloneInProgress), as CDI's host-assisted clone: an upload server in clone mode
on the target claim, then a clone source worker ``<dv uid>-source-pod`` on the
source claim that sends its allocated extents (``importer.clonesource``), over
the target's Unix socket in ``cdi serve`` and mutual TLS on a cluster.  The
source must not be in use by another pod (CloneSourceInUse); a target upload
server that came back at another address restarts the source worker.  Its
end (the claim's ``storage.pod.phase``) is the DataVolume's Succeeded or
Failed, with the workers and their Secrets removed.
"""

from __future__ import annotations

from typing import Any

from cdi.api import defaults, pki
from cdi.api import errors as api_errors
from cdi.backends.port import Obj
from cdi.controllers import events, importpod
from cdi.controllers.clone import pods
from cdi.controllers.clone.pods import (
    CLONE_FOR,
    client_name,
    source_pod_name,
    temp_source_name,
)
from cdi.controllers.datavolume import (
    FATAL,
    POD_PHASE,
    RUNNING_MESSAGE,
    RUNNING_REASON,
    DataVolumeController,
)
from cdi.controllers.runtime import Result

CLONE_OF = "k8s.io/CloneOf"
POLL = 1.0


class HostAssistedCopy(DataVolumeController):
    """The copy strategy's steps, for ``CloneController``; set up by its ``__init__``."""

    _client_signer: pki.Signer | None
    _service_addresses: bool

    async def _copy(self, dv: Obj, target: Obj, src_ns: str, src_name: str,
                    bound_cond: tuple[str, str, str]) -> Result | None:
        ns, name = target["metadata"]["namespace"], target["metadata"]["name"]
        ann = target["metadata"].get("annotations", {})
        if ann.get(POD_PHASE) == "Succeeded":
            await self._cleanup(dv, target, src_ns)
            return await self._succeeded(dv, target, src_ns, src_name, bound_cond)
        if ann.get(FATAL) == "true":
            await self._cleanup(dv, target, src_ns)
            await self._set_status(dv, phase="Failed", bound=bound_cond, running=(
                "False", ann.get(RUNNING_REASON, "Error"), ann.get(RUNNING_MESSAGE, "")))
            return None
        src = await self._get("PersistentVolumeClaim", src_name, src_ns)
        if src is None or src.get("status", {}).get("phase") != "Bound":
            message = f"The source pvc {src_name} doesn't exist" if src is None else \
                f"The source pvc {src_name} is not bound"
            await self._set_status(dv, phase="CloneScheduled", bound=bound_cond,
                                   running=("False", "CloneWithoutSource", message))
            return Result(requeue_after=POLL)
        upload = await self._get("Pod", importpod.upload_pod_name(name), ns)
        if upload is None:
            users = await self._pods_using(src_ns, src_name, exclude=source_pod_name(dv))
            if users:
                message = f"pvc {src_name} is used by pods {', '.join(users)}"
                await self._set_status(dv, phase="CloneScheduled", bound=bound_cond,
                                       running=("False", "CloneSourceInUse", message),
                                       warn=message, warn_reason="CloneSourceInUse")
                return Result(requeue_after=POLL)
            await self._create_upload_pod(dv, target, src_ns, src_name)
            await self._set_status(dv, phase="CloneScheduled", bound=bound_cond,
                                   running=("False", "Pending", "Clone pod scheduled"))
            return None
        status = upload.get("status", {})
        if status.get("phase") in ("Succeeded", "Failed"):
            cs = (status.get("containerStatuses") or [{}])[0]
            message = cs.get("state", {}).get("terminated", {}).get("message", "")
            result = importpod.outcome(message) if status["phase"] == "Succeeded" else \
                importpod.Outcome("failed", message)
            if result.kind == "succeeded":
                await self._annotate_claim(target, {POD_PHASE: "Succeeded", CLONE_OF: "true"})
            else:
                await self._annotate_claim(target, {FATAL: "true", POD_PHASE: "Failed",
                                                    RUNNING_REASON: "Error",
                                                    RUNNING_MESSAGE: result.message})
            return Result(requeue_after=0.01)
        address = upload["metadata"].get("annotations", {}).get(
            "embedded.cdi.kubevirt.io/upload-address")
        if not address and self._service_addresses:
            address = f"{importpod.upload_pod_name(name)}.{ns}.svc:{importpod.UPLOAD_PORT}"
        ready = {c.get("type"): c for c in status.get("conditions", [])}.get("Ready", {})
        if not address or ready.get("status") != "True":
            return Result(requeue_after=0.2)
        source_pod = await self._get("Pod", source_pod_name(dv), src_ns)
        if source_pod is None:
            await self._create_source_pod(dv, target, src, address, socket=upload["metadata"].get(
                "annotations", {}).get(pods.SOCKET_ANNOTATION) or None)
            return Result(requeue_after=0.2)
        url = next((e.get("value") for e in source_pod["spec"]["containers"][0].get("env", [])
                    if e["name"] == "UPLOAD_URL"), "")
        if url != f"https://{address}/v1beta1/upload":
            # The upload server came back elsewhere (its worker restarted on a new
            # loopback port): a source pod sending to the old address starts again.
            await self._delete("Pod", source_pod_name(dv), src_ns)
            return Result(requeue_after=0.2)
        progress, transfer = await self._clone_progress(dv, source_pod)
        restarts = int(((source_pod.get("status") or {}).get("containerStatuses") or [{}])[0]
                       .get("restartCount", 0))
        last = (((source_pod.get("status") or {}).get("containerStatuses") or [{}])[0]
                .get("lastState", {}).get("terminated"))
        running = ("True", "Pod is running", "") if last is None else \
            ("False", "Error", importpod.running_message(last.get("message", "")))
        await self._set_status(dv, phase="CloneInProgress", bound=bound_cond, running=running,
                               progress=progress, transfer=transfer, restarts=restarts)
        return Result(requeue_after=1.0)

    async def _pods_using(self, ns: str, claim: str, *, exclude: str) -> list[str]:
        users = []
        for pod in (await self._store.list("Pod", ns)).items:
            if pod["metadata"]["name"] == exclude or \
                    pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
                continue
            if any((v.get("persistentVolumeClaim") or {}).get("claimName") == claim
                   for v in pod["spec"].get("volumes", [])):
                users.append(pod["metadata"]["name"])
        return sorted(users)

    async def _create_upload_pod(self, dv: Obj, target: Obj, src_ns: str, src_name: str) -> None:
        config = (await self._config()).get("status", {})
        block = target["spec"].get("volumeMode") == "Block"
        overhead = 0.0 if block else defaults.filesystem_overhead(
            config, target["spec"].get("storageClassName"))
        tls_secret = None
        meta = target["metadata"]
        if self._upload_tls is not None:
            secret = importpod.upload_tls_secret(target, self._upload_tls.signer,
                                                 self._upload_tls.client_ca_pem)
            tls_secret = secret["metadata"]["name"]
            for obj in (secret, importpod.upload_service(target)):
                try:
                    await self._store.create(obj)
                except api_errors.AlreadyExists:
                    pass
        pod = importpod.upload_pod_spec(
            dv, target, block=block, overhead=overhead,
            preallocation=bool(dv["spec"].get("preallocation",
                                               config.get("preallocation", False))),
            resources=config.get("defaultPodResourceRequirements", {}), tls_secret=tls_secret,
            scratch=False, workers=self._workers)
        container = pod["spec"]["containers"][0]
        container["env"] = [e for e in container["env"] if e["name"] != "CLIENT_NAME"] + [
            {"name": "UPLOAD_CLONE", "value": "true"},
            {"name": "CLIENT_NAME", "value": client_name(src_ns, src_name, meta["namespace"],
                                                         meta["name"])}]
        importpod.place(pod, await importpod.workload(self._store))
        try:
            await self._store.create(pod)
        except api_errors.AlreadyExists:
            pass

    async def _create_source_pod(self, dv: Obj, target: Obj, src: Obj, address: str, *,
                                 socket: str | None) -> None:
        tls = self._client_signer is not None and self._upload_tls is not None
        resources = ((await self._config()).get("status") or {}).get(
            "defaultPodResourceRequirements", {})
        objects = [importpod.place(
            pods.source_pod(dv, target, src, address, tls=tls, socket=socket,
                            resources=resources, workers=self._workers),
            await importpod.workload(self._store))]
        if tls and socket is None:
            assert self._client_signer is not None and self._upload_tls is not None
            # The bundle: a target made before a CA rotation has a certificate of the old CA.
            objects.insert(0, pods.source_secret(dv, target, src, self._client_signer,
                                                 self._upload_tls.signer.bundle_pem))
        for obj in objects:
            try:
                await self._store.create(obj)
            except api_errors.AlreadyExists:
                pass

    async def _clone_progress(self, dv: Obj, pod: Obj
                              ) -> tuple[str | None, dict[str, Any] | None]:
        return await self._progress(dv, pod, metric="kubevirt_cdi_clone_progress_total")

    async def _cleanup(self, dv: Obj, target: Obj, src_ns: str) -> None:
        ns, name = target["metadata"]["namespace"], target["metadata"]["name"]
        temp = await self._get("PersistentVolumeClaim", temp_source_name(dv), src_ns)
        if temp is not None and (temp["metadata"].get("labels") or {}).get(CLONE_FOR) == \
                f"{ns}.{name}":
            await self._delete("PersistentVolumeClaim", temp_source_name(dv), src_ns)
        await self._delete("Pod", source_pod_name(dv), src_ns)
        await self._delete("Secret", source_pod_name(dv), src_ns)
        await self._delete("Pod", importpod.upload_pod_name(name), ns)
        await self._delete("Secret", importpod.upload_pod_name(name), ns)

    async def _succeeded(self, dv: Obj, target: Obj, src_ns: str, src_name: str,
                         bound_cond: tuple[str, str, str]) -> Result | None:
        ns, name = target["metadata"]["namespace"], target["metadata"]["name"]
        old = (dv.get("status") or {}).get("phase")
        await self._set_status(dv, phase="Succeeded", progress="100.0%", bound=bound_cond,
                               running=("False", "Completed", "Clone Complete"))
        if old != "Succeeded":
            await events.emit(self._store, dv, reason="CloneSucceeded",
                              message=f"Successfully cloned from {src_ns}/{src_name} into "
                                      f"{ns}/{name}")
        return None
