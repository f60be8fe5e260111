"""Upload into a bare PVC: ``cdi image-upload pvc`` and any claim annotated as an upload target.

CDI's upload controller serves claims that carry
``cdi.kubevirt.io/storage.upload.target`` whether or not a DataVolume owns
them.  Claims owned by a DataVolume are the DataVolume controller's; this
controller takes the others: it starts the upload server pod (with its
certificate and scratch space), mirrors the pod into the claim's annotations
(``storage.pod.phase``, ``storage.pod.ready``, ``storage.pod.restarts``, and
the Running condition's reason and message), which is what the upload proxy and
``virtctl``-style clients read, and removes the pod once the upload is done.  A
pod that passed its deadline without an upload is replaced by a new one with a new
certificate (``cdi/controllers/uploadtls.py``).
"""

from __future__ import annotations

import logging
from typing import Any

from cdi.api import defaults
from cdi.api import errors as api_errors
from cdi.backends.port import Obj, ObjectStore
from cdi.controllers import events, importpod, uploadtls
from cdi.controllers.datavolume import (
    POD_PHASE,
    POD_RESTARTS,
    PREALLOCATION_APPLIED,
    RUNNING_MESSAGE,
    RUNNING_REASON,
    UPLOAD_TARGET,
    UploadTLS,
)
from cdi.controllers.runtime import Key, Mapper, Result, owner_keys
from cdi.controllers.workers import EMBEDDED, Workers

log = logging.getLogger(__name__)

A = importpod.ANN
POD_READY = A + "storage.pod.ready"


def _own_claims(obj: Obj) -> list[Key]:
    meta = obj["metadata"]
    return [(meta.get("namespace", ""), meta["name"])]


class UploadClaimController:
    name = "uploadclaim"
    kind = "PersistentVolumeClaim"

    def __init__(self, store: ObjectStore, *, upload_tls: UploadTLS | None = None,
                 workers: Workers = EMBEDDED) -> None:
        self._store = store
        self._upload_tls = upload_tls
        self._workers = workers

    def watches(self) -> dict[str, Mapper]:
        return {"PersistentVolumeClaim": _own_claims,
                "Pod": owner_keys("PersistentVolumeClaim")}

    async def reconcile(self, key: Key) -> Result | None:
        ns, name = key
        pvc = await self._get("PersistentVolumeClaim", name, ns)
        if pvc is None or pvc["metadata"].get("deletionTimestamp"):
            return None
        ann = pvc["metadata"].get("annotations", {})
        if UPLOAD_TARGET not in ann:
            return None
        if any(r.get("kind") == "DataVolume" for r in pvc["metadata"].get("ownerReferences", [])):
            return None  # the DataVolume controller's
        pod_name = importpod.upload_pod_name(name)
        if ann.get(POD_PHASE) in ("Succeeded", "Failed"):
            await self._delete("Pod", pod_name, ns)
            return None
        pod = await self._get("Pod", pod_name, ns)
        if pod is None:
            if await uploadtls.old_scratch(self._store, pvc):
                return Result(requeue_after=1.0)  # a recycled server's, going with it
            await self._create_pod(pvc)
            await self._annotate(pvc, {POD_PHASE: "Pending"})
            return None
        return await self._follow(pvc, pod)

    async def _create_pod(self, pvc: Obj) -> None:
        config = (await self._get("CDIConfig", "config", "") or {}).get("status", {})
        block = pvc["spec"].get("volumeMode") == "Block"
        overhead = 0.0 if block else defaults.filesystem_overhead(
            config, pvc["spec"].get("storageClassName"))
        ann = pvc["metadata"].get("annotations", {})
        tls = self._upload_tls
        # With no DataVolume, the claim stands in for it (OWNER_UID is the claim's, as in CDI).
        pod = importpod.upload_pod_spec(
            pvc, pvc, block=block, overhead=overhead,
            preallocation=ann.get(A + "storage.preallocation.requested") == "true",
            resources=config.get("defaultPodResourceRequirements", {}), workers=self._workers,
            tls_secret=await uploadtls.fresh_secret(self._store, pvc, tls) if tls else None,
            deadline=tls.deadline() if tls else None)
        importpod.place(pod, await importpod.workload(self._store))
        try:
            created = await self._store.create(pod)
        except api_errors.AlreadyExists:
            return
        try:
            await self._store.create(importpod.scratch_claim(pvc, created, config))
        except api_errors.AlreadyExists:
            pass

    async def _follow(self, pvc: Obj, pod: Obj) -> Result | None:
        if uploadtls.deadline_passed(pod):  # not a failure: a new pod, a new certificate
            await uploadtls.recycle(self._store, pvc, pod, report_on=pvc)
            return Result(requeue_after=0.5)
        status = pod.get("status", {})
        cs = (status.get("containerStatuses") or [{}])[0]
        restarts = str(cs.get("restartCount", 0))
        phase = status.get("phase", "Pending")
        if phase in ("Succeeded", "Failed"):
            message = cs.get("state", {}).get("terminated", {}).get("message", "")
            result = importpod.outcome(message) if phase == "Succeeded" else \
                importpod.Outcome("failed", message)
            if result.kind == "succeeded":
                await self._annotate(pvc, {
                    POD_PHASE: "Succeeded", POD_READY: "false", POD_RESTARTS: restarts,
                    RUNNING_REASON: "Completed", RUNNING_MESSAGE: result.message,
                    PREALLOCATION_APPLIED: "true" if result.preallocation_applied else "false"})
                await events.emit(self._store, pvc, reason="UploadSucceeded",
                                  message=f"Upload Successful into PVC {pvc['metadata']['name']}")
            else:
                await self._annotate(pvc, {
                    POD_PHASE: "Failed", POD_READY: "false", POD_RESTARTS: restarts,
                    RUNNING_REASON: "Error", RUNNING_MESSAGE: result.message})
                await events.emit(self._store, pvc, reason="UploadFailed",
                                  message=result.message, type_="Warning")
            return Result(requeue_after=0.01)
        ready = {c.get("type"): c for c in status.get("conditions", [])}.get("Ready", {})
        running = "running" in cs.get("state", {})
        update: dict[str, Any] = {
            POD_PHASE: phase, POD_RESTARTS: restarts,
            POD_READY: "true" if running and ready.get("status") == "True" else "false"}
        last = cs.get("lastState", {}).get("terminated")
        if last is not None:
            update[RUNNING_REASON] = "Error"
            update[RUNNING_MESSAGE] = importpod.running_message(last.get("message", ""))
        current = pvc["metadata"].get("annotations", {})
        if any(current.get(k) != v for k, v in update.items()):
            await self._annotate(pvc, update)
        return None

    async def _get(self, kind: str, name: str, ns: str) -> Obj | None:
        try:
            return await self._store.get(kind, name, ns)
        except api_errors.NotFound:
            return None

    async def _delete(self, kind: str, name: str, ns: str) -> None:
        try:
            await self._store.delete(kind, name, ns)
        except api_errors.NotFound:
            pass

    async def _annotate(self, pvc: Obj, annotations: dict[str, str]) -> None:
        meta = pvc["metadata"]
        await self._store.patch("PersistentVolumeClaim", meta["name"], meta["namespace"],
                                {"metadata": {"annotations": annotations}})
