"""The DataVolume controller: claim, importer pod, phases and conditions.

For ``http`` and ``blank`` sources (more sources plug in later) it does what
CDI's DataVolume and import controllers do together: render and create the
PersistentVolumeClaim (owned by the DataVolume), start an importer pod (owned
by the claim) once the claim can bind, add scratch space when the worker asks
for it, and mirror the pod into the DataVolume's phase, conditions, restart
count and progress.  Import state lives in CDI's annotations on the claim
(``storage.pod.phase``, ``storage.import.fatalError``, ...), so a restart of
``cdi serve`` picks up where it was.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import logging
import time
from typing import Any

import aiohttp

from cdi.api import defaults
from cdi.api import errors as api_errors
from cdi.backends.port import Obj, ObjectStore
from cdi.controllers import events, imagevolume, importpod, uploadtls
from cdi.controllers.runtime import Key, Mapper, Result, TemporaryError, owner_keys
from cdi.controllers.uploadtls import UploadTLS as UploadTLS  # its home before uploadtls
from cdi.controllers.workers import EMBEDDED, Workers

log = logging.getLogger(__name__)

A = importpod.ANN
POD_PHASE = A + "storage.pod.phase"
POD_RESTARTS = A + "storage.pod.restarts"
FATAL = A + "storage.import.fatalError"
REQUIRES_SCRATCH = A + "storage.import.requiresScratch"
IMMEDIATE_BIND = A + "storage.bind.immediate.requested"
PREALLOCATION_APPLIED = A + "storage.preallocation"
RUNNING_REASON = A + "storage.condition.running.reason"
RUNNING_MESSAGE = A + "storage.condition.running.message"
SUPPORTED = ("http", "blank", "upload", "registry", "s3")
CLONE_SOURCES = ("pvc", "snapshot")  # the clone controller's (cdi/controllers/clone)
UPLOAD_TARGET = A + "storage.upload.target"
RATE_WINDOW = 1.0  # seconds: the shortest interval a transfer rate is measured over


@dataclasses.dataclass(frozen=True)
class _Op:
    """What differs between an import and an upload (CDI's two worker flows)."""

    scheduled: str
    running: str
    complete: str
    pod_prefix: str

    @property
    def pod_scheduled(self) -> str:
        return f"{self.scheduled.removesuffix('Scheduled')} pod scheduled"

    def pod_name(self, pvc: str) -> str:
        return f"{self.pod_prefix}{pvc}"


IMPORT = _Op("ImportScheduled", "ImportInProgress", "Import Complete", "importer-")
UPLOAD = _Op("UploadScheduled", "UploadReady", "Upload Complete", "cdi-upload-")


def _op(dv: Obj) -> _Op:
    return UPLOAD if "upload" in (dv["spec"].get("source") or {}) else IMPORT
NO_PVC = ("False", "NotFound", "No PVC found")
# Phases only move forward while an import runs (a second pod for scratch space
# does not take a DataVolume back to ImportScheduled).
_RANK = {"": 0, "Pending": 0, "WaitForFirstConsumer": 0, "PVCBound": 1, "ImportScheduled": 2,
         "ImportInProgress": 3, "UploadScheduled": 2, "UploadReady": 3, "CloneScheduled": 2,
         "SnapshotForSmartCloneInProgress": 2, "CSICloneInProgress": 3,
         "CloneFromSnapshotSourceInProgress": 3, "CloneInProgress": 3}
# Event reason and message for entering a phase, as CDI words them.
_PHASE_EVENTS = {
    "Pending": ("Pending", "PVC {pvc} Pending"),
    "WaitForFirstConsumer": ("WaitForFirstConsumer", "PVC {pvc} Pending"),
    "ImportScheduled": ("ImportScheduled", "Import into {pvc} scheduled"),
    "ImportInProgress": ("ImportInProgress", "Import into {pvc} in progress"),
    "UploadScheduled": ("UploadScheduled", "Upload into {pvc} scheduled"),
    "UploadReady": ("UploadReady", "Upload into {pvc} ready"),
    "CloneScheduled": ("CloneScheduled", "Cloning into {pvc} scheduled"),
    "CloneInProgress": ("CloneInProgress", "Cloning into {pvc} in progress"),
    "SnapshotForSmartCloneInProgress": ("SnapshotForSmartCloneInProgress",
                                        "Creating snapshot for smart-clone is in progress"),
    "CSICloneInProgress": ("CSICloneInProgress", "CSI Volume clone in progress"),
    "CloneFromSnapshotSourceInProgress": ("CloneFromSnapshotSourceInProgress",
                                          "Clone from snapshot source is in progress"),
    "Succeeded": ("ImportSucceeded", "Successfully imported into PVC {pvc}"),
    "Failed": ("ImportFailed", "Failed to import into PVC {pvc}"),
    "Unknown": ("Unknown", "PVC {pvc} is in an unknown phase"),
}
PROGRESS_INTERVAL = 2.0


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _pod_to_claim(obj: Obj) -> list[Key]:
    return list(owner_keys("PersistentVolumeClaim")(obj))


class DataVolumeController:
    name = "datavolume"
    kind = "DataVolume"

    def __init__(self, store: ObjectStore, *, upload_tls: UploadTLS | None = None,
                 backend: str = "embedded", workers: Workers = EMBEDDED) -> None:
        self._store = store
        self._upload_tls = upload_tls
        self._backend = backend  # named in refusals of what this backend cannot do
        self._workers = workers  # the worker Pods' images (cdi.controllers.workers)
        self._session: aiohttp.ClientSession | None = None
        # dv uid -> (time, bytes read) of the last rate sample, and the rate then
        self._samples: dict[str, tuple[float, int, float | None]] = {}

    def watches(self) -> dict[str, Mapper]:
        # A claim and a pod have the DataVolume's name (pods via their claim).
        return {"PersistentVolumeClaim": owner_keys("DataVolume"), "Pod": _pod_to_claim}

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    # -- reconcile ----------------------------------------------------------------

    async def reconcile(self, key: Key) -> Result | None:
        ns, name = key
        try:
            dv = await self._store.get("DataVolume", name, ns)
        except api_errors.NotFound:
            return None
        if dv["metadata"].get("deletionTimestamp"):
            return None
        source = next(iter(dv["spec"].get("source", {}) or {}), None)
        if source in CLONE_SOURCES or (source is None and dv["spec"].get("sourceRef")):
            return None
        if source not in SUPPORTED:
            what = source or ("sourceRef" if dv["spec"].get("sourceRef") else "none")
            await self._set_status(dv, phase="Pending", bound=NO_PVC, running=(
                "False", "UnsupportedSource", f"source {what} is not supported yet"))
            return None
        refused = imagevolume.refusal(dv, backend=self._backend, workers=self._workers)
        if refused is not None:
            await self._set_status(dv, phase="Pending", bound=NO_PVC,
                                   running=("False", "UnsupportedSource", refused))
            return None
        pvc = await self._get("PersistentVolumeClaim", name, ns)
        if pvc is None:
            if dv.get("status", {}).get("phase") == "Succeeded":
                return None  # the user deleted the claim; nothing to redo
            await self._create_claim(dv)
            return None
        if not any(r.get("uid") == dv["metadata"]["uid"]
                   for r in pvc["metadata"].get("ownerReferences", [])):
            await self._set_status(dv, phase="Pending", bound=(
                "False", "ErrResourceExists",
                f'Resource "{name}" already exists and is not managed by DataVolume'))
            return None
        return await self._reconcile_import(dv, pvc)

    async def _reconcile_import(self, dv: Obj, pvc: Obj) -> Result | None:
        ns, name = pvc["metadata"]["namespace"], pvc["metadata"]["name"]
        op = _op(dv)
        ann = pvc["metadata"].get("annotations", {})
        pvc_phase = pvc.get("status", {}).get("phase", "Pending")
        if pvc_phase == "Lost":
            await self._set_status(dv, phase="Failed",
                                   bound=("False", "ClaimLost", f"PVC {name} lost"),
                                   warn=f"PVC {name} lost", warn_reason="ErrClaimLost")
            return None
        if pvc_phase not in ("Pending", "Bound"):
            await self._set_status(dv, phase="Unknown", bound=(
                "Unknown", pvc_phase, f"PVC {name} is {pvc_phase}"))
            return None
        bound = pvc_phase == "Bound"
        bound_cond = (("True", "Bound", f"PVC {name} Bound") if bound
                      else ("False", "Pending", f"PVC {name} Pending"))
        restarts = int(ann.get(POD_RESTARTS, "0"))
        if ann.get(POD_PHASE) == "Succeeded":
            await self._delete("Pod", op.pod_name(name), ns)
            await self._set_status(dv, phase="Succeeded", progress="100.0%", bound=bound_cond,
                                   running=("False", "Completed", op.complete),
                                   restarts=restarts)
            return None
        if ann.get(FATAL) == "true":
            await self._set_status(dv, phase="Failed", bound=bound_cond, restarts=restarts,
                                   running=("False", ann.get(RUNNING_REASON, "Error"),
                                            ann.get(RUNNING_MESSAGE, "")))
            return None
        pod = await self._get("Pod", op.pod_name(name), ns)
        if pod is None:
            sc = await self._storage_class(pvc)
            wffc = sc is not None and sc.get("volumeBindingMode") == "WaitForFirstConsumer"
            immediate = IMMEDIATE_BIND in dv["metadata"].get("annotations", {})
            if not bound and wffc and not immediate:
                await self._set_status(dv, phase="WaitForFirstConsumer", bound=bound_cond)
                return None
            if not bound and not wffc:
                await self._set_status(dv, phase="Pending", bound=bound_cond)
                return None  # the claim's binding brings us back
            if bound and _RANK.get(dv.get("status", {}).get("phase", ""), 9) < 1:
                await self._set_status(dv, phase="PVCBound", bound=bound_cond)
                return Result(requeue_after=0.01)
            missing = await self._missing_pull_secret(dv)
            if missing is not None:
                # Its keys are optional for the pod (a .dockerconfigjson secret has
                # none of them), so without this check it would pull anonymously.
                await self._set_status(dv, phase=op.scheduled, bound=bound_cond,
                                       running=("False", "CreateContainerConfigError",
                                                missing), warn=missing)
                return Result(requeue_after=5.0)
            if op is UPLOAD and await uploadtls.old_scratch(self._store, pvc):
                return Result(requeue_after=1.0)  # a recycled server's, going with it
            try:
                await self._create_pod(dv, pvc, scratch=ann.get(REQUIRES_SCRATCH) == "true")
            except (api_errors.Invalid, api_errors.Forbidden) as e:
                # The API server refused the pod (a field it does not know, such as an
                # image volume before Kubernetes 1.35, or an admission policy): say so
                # where the user looks, and try again in case an admin fixes it.
                refused = f"the worker pod was refused: {e.message}"
                await self._set_status(dv, phase=op.scheduled, bound=bound_cond,
                                       running=("False", "PodCreationFailed", refused),
                                       warn=refused, warn_reason="PodCreationFailed")
                return Result(requeue_after=30.0)
            await self._set_status(dv, phase=op.scheduled, bound=bound_cond,
                                   running=("False", "Pending", op.pod_scheduled))
            return None
        return await self._follow_pod(dv, pvc, pod, bound_cond, op)

    async def _follow_pod(self, dv: Obj, pvc: Obj, pod: Obj, bound_cond: tuple[str, str, str],
                          op: _Op) -> Result | None:
        ns, name = pvc["metadata"]["namespace"], pvc["metadata"]["name"]
        status = pod.get("status", {})
        statuses = status.get("containerStatuses") or [{}]
        cs = statuses[0]
        restarts = int(cs.get("restartCount", 0))
        phase = status.get("phase", "Pending")
        if op is UPLOAD and uploadtls.deadline_passed(pod):  # not a failure: a new pod
            await uploadtls.recycle(self._store, pvc, pod, report_on=dv)
            await self._set_status(dv, phase=op.scheduled, bound=bound_cond,
                                   running=uploadtls.RUNNING, rewind=True)
            return Result(requeue_after=0.5)
        if phase in ("Succeeded", "Failed"):
            message = cs.get("state", {}).get("terminated", {}).get("message", "")
            result = importpod.outcome(message) if phase == "Succeeded" else \
                importpod.Outcome("failed", message)
            if result.kind == "scratch":
                await self._annotate_claim(pvc, {REQUIRES_SCRATCH: "true"})
                await self._delete("Pod", op.pod_name(name), ns)
                await self._set_status(dv, phase=op.running, restarts=restarts,
                                       bound=("False", "CreatingScratchSpace",
                                              "Creating scratch space"))
                return None
            if result.kind == "succeeded":
                if result.labels:
                    # A containerdisk's KUBEVIRT_IO_ variables; labels already set win (CDI).
                    current = pvc["metadata"].get("labels", {})
                    new = {k: v for k, v in result.labels.items() if k not in current}
                    if new:
                        meta = pvc["metadata"]
                        await self._store.patch("PersistentVolumeClaim", meta["name"],
                                                meta["namespace"], {"metadata": {"labels": new}})
                await self._annotate_claim(pvc, {
                    POD_PHASE: "Succeeded", POD_RESTARTS: str(restarts),
                    RUNNING_REASON: "Completed", RUNNING_MESSAGE: op.complete,
                    PREALLOCATION_APPLIED: "true" if result.preallocation_applied else "false",
                })
                return Result(requeue_after=0.01)
            reason = "ChecksumError" if result.kind == "checksum" else \
                importpod.failure_reason(result.message)
            await self._annotate_claim(pvc, {
                FATAL: "true", POD_PHASE: "Failed", POD_RESTARTS: str(restarts),
                RUNNING_REASON: reason, RUNNING_MESSAGE: result.message,
            })
            await events.emit(self._store, dv, reason="ErrImportFailed", message=result.message,
                              type_="Warning")
            await self._delete("Pod", op.pod_name(name), ns)
            return Result(requeue_after=0.01)
        if any(v.get("name") == "cdi-scratch-vol" for v in pod["spec"].get("volumes", [])) and \
                await self._get("PersistentVolumeClaim", importpod.scratch_name(name), ns) is None:
            # cdi serve stopped between creating the pod and its scratch claim.
            config = await self._config()
            await self._create_scratch(pvc, pod, config.get("status", {}))
        waiting = importpod.waiting(cs)
        if waiting is not None:
            await self._set_status(dv, phase=op.scheduled, bound=bound_cond, running=waiting,
                                   warn=waiting[2])
            return None
        scheduled = {c.get("type"): c for c in status.get("conditions", [])}.get("PodScheduled")
        if scheduled is not None and scheduled.get("status") == "False":
            await self._set_status(dv, phase=op.scheduled, bound=bound_cond, running=(
                "False", "Unschedulable", "Importer pod cannot be scheduled"))
            return None
        if str(restarts) != pvc["metadata"].get("annotations", {}).get(POD_RESTARTS, "0"):
            await self._annotate_claim(pvc, {POD_RESTARTS: str(restarts)})
        last = cs.get("lastState", {}).get("terminated")
        if "running" in cs.get("state", {}) and op is UPLOAD:
            ready = {c.get("type"): c for c in status.get("conditions", [])}.get("Ready", {})
            if ready.get("status") != "True":
                await self._set_status(dv, phase=op.scheduled, bound=bound_cond,
                                       running=("False", "Pending", "Upload pod starting"))
                return Result(requeue_after=0.2)
            progress, transfer = await self._progress(dv, pod)
            await self._set_status(dv, phase=op.running, bound=bound_cond,
                                   running=("True", "Pod is running", ""), restarts=restarts,
                                   progress=progress, transfer=transfer)
            await self._annotate_claim(pvc, {POD_PHASE: "Running", A + "storage.pod.ready": "true"})
            return Result(requeue_after=PROGRESS_INTERVAL)
        if "running" in cs.get("state", {}):
            progress, transfer = await self._progress(dv, pod)
            await self._set_status(dv, phase=op.running, bound=bound_cond,
                                   running=("True", "Pod is running", ""), restarts=restarts,
                                   progress=progress, transfer=transfer)
            return Result(requeue_after=PROGRESS_INTERVAL)
        if last is not None:
            message = importpod.running_message(last.get("message", ""))
            await self._set_status(dv, phase=op.running, bound=bound_cond,
                                   running=("False", importpod.failure_reason(message), message),
                                   restarts=restarts,
                                   warn=message)
            return None
        await self._set_status(dv, phase=op.scheduled, bound=bound_cond,
                               running=("False", "Pending", op.pod_scheduled))
        return None

    async def _missing_pull_secret(self, dv: Obj) -> str | None:
        registry = (dv["spec"].get("source") or {}).get("registry") or {}
        name = registry.get("secretRef")  # unused by a node pull (imagevolume)
        if not name or imagevolume.wanted(dv) or \
                await self._get("Secret", name, dv["metadata"]["namespace"]):
            return None
        return f'secret "{name}" not found'

    # -- objects ----------------------------------------------------------------

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

    async def _annotate_claim(self, pvc: Obj, annotations: dict[str, str]) -> None:
        meta = pvc["metadata"]
        await self._store.patch("PersistentVolumeClaim", meta["name"], meta["namespace"],
                                {"metadata": {"annotations": annotations}})

    async def _storage_class(self, pvc: Obj) -> Obj | None:
        name = pvc["spec"].get("storageClassName")
        if name:
            return await self._get("StorageClass", name, "")
        return await self._default_class()

    async def _default_class(self) -> Obj | None:
        for sc in (await self._store.list("StorageClass")).items:
            annotations = sc["metadata"].get("annotations", {})
            if annotations.get("storageclass.kubernetes.io/is-default-class") == "true":
                return sc
        return None

    async def _config(self) -> Obj:
        return await self._get("CDIConfig", "config", "") or {}

    async def _create_claim(self, dv: Obj) -> None:
        meta = dv["metadata"]
        spec = dv["spec"]
        sc_name = (spec.get("storage") or spec.get("pvc") or {}).get("storageClassName")
        sc = await self._get("StorageClass", sc_name, "") if sc_name else \
            await self._default_class()
        profile = await self._get("StorageProfile", sc["metadata"]["name"], "") if sc else None
        config = await self._config()
        overhead = defaults.filesystem_overhead(config.get("status", {}),
                                                sc["metadata"]["name"] if sc else None)
        try:
            pvc_spec = defaults.render_pvc_spec(dv, storage_class=sc, profile=profile,
                                                overhead=overhead)
        except api_errors.APIError as e:
            await self._set_status(dv, phase="Pending", bound=("False", "ErrClaimNotValid",
                                                               e.message), warn=e.message)
            raise TemporaryError(e.message, delay=10.0) from e  # a profile may appear
        preallocation = spec.get("preallocation")
        if preallocation is None:
            preallocation = bool(config.get("status", {}).get("preallocation", False))
        annotations = {
            **({UPLOAD_TARGET: ""} if "upload" in spec["source"] else {}),
            A + "storage.contentType": spec.get("contentType", "kubevirt") or "kubevirt",
            A + "storage.preallocation.requested": "true" if preallocation else "false",
            A + "createdForDataVolume": meta["uid"],
        }
        kind = next((k for k in ("http", "registry", "s3", "blank") if k in spec["source"]), None)
        if kind is not None:
            annotations[A + "storage.import.source"] = "none" if kind == "blank" else kind
        if kind in ("http", "registry", "s3"):
            annotations[A + "storage.import.endpoint"] = spec["source"][kind]["url"]
        # The DataVolume's own annotations pass on, but never over the controller's.
        passed = importpod.passed_annotations(dv)
        annotations = {**passed, **annotations}
        pvc: Obj = {
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {
                "name": meta["name"], "namespace": meta["namespace"],
                "labels": {"app": "containerized-data-importer",
                           **meta.get("labels", {})},
                "annotations": annotations,
                "ownerReferences": [{"apiVersion": dv["apiVersion"], "kind": "DataVolume",
                                     "name": meta["name"], "uid": meta["uid"],
                                     "controller": True, "blockOwnerDeletion": True}],
            },
            "spec": pvc_spec,
        }
        try:
            await self._store.create(pvc)
        except api_errors.AlreadyExists:
            return
        await self._set_status(dv, phase="Pending", claim=meta["name"],
                               bound=("False", "Pending", f"PVC {meta['name']} Pending"))

    async def _create_pod(self, dv: Obj, pvc: Obj, *, scratch: bool) -> None:
        config = await self._config()
        status = config.get("status", {})
        block = pvc["spec"].get("volumeMode") == "Block"
        overhead = 0.0 if block else defaults.filesystem_overhead(
            status, pvc["spec"].get("storageClassName"))
        ann = pvc["metadata"].get("annotations", {})
        preallocation = ann.get(A + "storage.preallocation.requested") == "true"
        resources = status.get("defaultPodResourceRequirements", {})
        if _op(dv) is UPLOAD:
            tls = self._upload_tls
            pod = importpod.upload_pod_spec(
                dv, pvc, block=block, overhead=overhead, preallocation=preallocation,
                resources=resources, workers=self._workers,
                tls_secret=await uploadtls.fresh_secret(self._store, pvc, tls) if tls else None,
                deadline=tls.deadline() if tls else None)
            scratch = True  # uploads always get scratch space, as in CDI
        else:
            proxy = status.get("importProxy", {}) or {}
            build = imagevolume.pod_spec if imagevolume.wanted(dv) else importpod.pod_spec
            pod = build(
                dv, pvc, block=block, overhead=overhead, preallocation=preallocation,
                scratch=scratch, workers=self._workers,
                proxy={"http_proxy": proxy.get("HTTPProxy", ""),
                       "https_proxy": proxy.get("HTTPSProxy", ""),
                       "no_proxy": proxy.get("noProxy", "")},
                resources=resources,
                insecure_registries=tuple((config.get("spec") or {}).get("insecureRegistries")
                                          or ()))
        importpod.place(pod, await importpod.workload(self._store))
        try:
            created = await self._store.create(pod)
        except api_errors.AlreadyExists:
            return
        if scratch:
            await self._create_scratch(pvc, created, status)

    async def _create_scratch(self, pvc: Obj, pod: Obj, config_status: dict[str, Any]) -> None:
        try:
            await self._store.create(importpod.scratch_claim(pvc, pod, config_status))
        except api_errors.AlreadyExists:
            pass
        await self._annotate_claim(pvc, {REQUIRES_SCRATCH: "false"})

    # -- status -----------------------------------------------------------------

    async def _progress(self, dv: Obj, pod: Obj, *,
                        metric: str = "kubevirt_cdi_import_progress_total"
                        ) -> tuple[str | None, dict[str, Any] | None]:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        uid = dv["metadata"]["uid"]
        sample = await importpod.scrape(pod, uid, self._session, metric=metric)
        if sample is None or sample.percent is None:
            return None, None
        now = time.monotonic()
        transfer: dict[str, Any] = {"bytesRead": sample.bytes_read,
                                    "bytesTotal": sample.bytes_total}
        # The rate is measured over at least RATE_WINDOW seconds: reconciles come in
        # bursts (every status write wakes the DataVolume again), and two samples a
        # few milliseconds apart would say 0 bytes/s.
        prev_time, prev_bytes, rate = self._samples.get(uid, (now, sample.bytes_read, None))
        if sample.bytes_read < prev_bytes:
            prev_time, prev_bytes, rate = now, sample.bytes_read, None  # a restarted worker
        elif now - prev_time >= RATE_WINDOW:
            rate = (sample.bytes_read - prev_bytes) / (now - prev_time)
            prev_time, prev_bytes = now, sample.bytes_read
        self._samples[uid] = (prev_time, prev_bytes, rate)
        if rate is not None:
            transfer["bytesPerSecond"] = int(rate)
            if rate > 0 and sample.bytes_total > sample.bytes_read:
                transfer["etaSeconds"] = int((sample.bytes_total - sample.bytes_read) / rate)
        return f"{sample.percent:.2f}%", transfer

    async def _set_status(self, dv: Obj, *, phase: str, progress: str | None = None,
                          bound: tuple[str, str, str] | None = None,
                          running: tuple[str, str, str] | None = None,
                          restarts: int | None = None, claim: str | None = None,
                          warn: str | None = None, warn_reason: str = "Error",
                          transfer: dict[str, Any] | None = None, rewind: bool = False) -> None:
        old = dv.get("status", {}) or {}
        new = copy.deepcopy(old)
        if phase in ("Succeeded", "Failed"):
            self._samples.pop(dv["metadata"]["uid"], None)
        if not rewind and _RANK.get(phase, 9) < _RANK.get(old.get("phase", ""), 0):
            phase = old["phase"]  # never backwards while importing (REWIND: a new upload pod)
        new["phase"] = phase
        new["claimName"] = claim or old.get("claimName") or dv["metadata"]["name"]
        if progress is not None:
            new["progress"] = progress
        new.setdefault("progress", "N/A")
        if restarts is not None:
            new["restartCount"] = restarts
        new.setdefault("restartCount", 0)
        if transfer is not None:
            new["transfer"] = transfer  # beyond CDI: bytes, rate and ETA (docs/control-plane.md)
        elif phase not in ("ImportInProgress", "UploadReady", "CloneInProgress"):
            new.pop("transfer", None)
        conditions = {c["type"]: c for c in new.get("conditions", [])}
        ready = ("True", "", "") if phase == "Succeeded" else ("False", "", "")
        if phase == "ImportInProgress" and running and running[0] == "True":
            ready = ("False", "TransferRunning", "")
        for ctype, value in (("Bound", bound), ("Ready", ready), ("Running", running)):
            if value is None:
                if ctype not in conditions:
                    status_, reason, message = NO_PVC if ctype == "Bound" else ("False", "", "")
                    conditions[ctype] = {"type": ctype, "status": status_, "reason": reason,
                                         "message": message, "lastTransitionTime": _now(),
                                         "lastHeartbeatTime": _now()}
                continue
            status_, reason, message = value
            cur = conditions.get(ctype)
            if cur is None or (cur.get("status"), cur.get("reason"), cur.get("message")) != value:
                conditions[ctype] = {"type": ctype, "status": status_, "reason": reason,
                                     "message": message, "lastTransitionTime": _now(),
                                     "lastHeartbeatTime": _now()}
        new["conditions"] = [conditions[t] for t in ("Bound", "Ready", "Running")]
        if new == old:
            return
        updated = copy.deepcopy(dv)
        updated["status"] = new
        await self._store.replace_status(updated)
        pvc_name = new["claimName"]
        clone = bool({"pvc", "snapshot"} & set(dv["spec"].get("source") or {})) or \
            bool(dv["spec"].get("sourceRef"))
        if old.get("phase") != phase and phase in _PHASE_EVENTS and \
                not (clone and phase == "Succeeded"):  # the clone controller says CloneSucceeded
            reason, message = _PHASE_EVENTS[phase]
            if phase == "Succeeded" and _op(dv) is UPLOAD:
                reason, message = "UploadSucceeded", "Successfully uploaded into {pvc}"
            await events.emit(self._store, dv, reason=reason, message=message.format(pvc=pvc_name),
                              type_="Warning" if phase == "Failed" else "Normal")
        old_bound = {c["type"]: c for c in old.get("conditions", [])}.get("Bound", {})
        if bound is not None and bound[1] and old_bound.get("reason") != bound[1] and \
                bound[0] == "True":
            await events.emit(self._store, dv, reason=bound[1], message=bound[2])
        old_running = {c["type"]: c for c in old.get("conditions", [])}.get("Running", {})
        if warn and old_running.get("message") != warn:
            await events.emit(self._store, dv, reason=warn_reason, message=warn, type_="Warning")
