"""DataVolumes with ``source.pvc``: a clone, by snapshot, CSI clone or host-assisted copy.

The strategy is ``strategy.for_pvc``'s (written to the target claim as
``cloneType`` and, after a fallback, ``cloneFallbackReason``).  Then:

- ``csi-clone``: the target claim names the source in ``dataSource``; the
  storage (the reflink class here, a CSI driver on a cluster) makes it a copy.
  Phase CSICloneInProgress until the claim binds.
- ``snapshot``: a VolumeSnapshot ``tmp-snapshot-<dv uid>`` of the source
  (SnapshotForSmartCloneInProgress), then the target claim restored from it
  (CloneFromSnapshotSourceInProgress); the snapshot is removed once bound.
- ``copy``: an upload server in clone mode on the target (CloneScheduled), then
  a clone source worker ``<dv uid>-source-pod`` on the source that sends its
  allocated extents over mutual TLS (CloneInProgress), as in CDI's
  host-assisted clone.  The source must not be in use by another pod
  (CloneSourceInUse); the steps are in ``hostcopy``.

Snapshot and CSI clones need the source and target in one namespace on the
embedded backend (CDI rebinds volumes through populators across namespaces);
a clone across namespaces is copied, with that reason.

Given the apiserver's public key (``cdi controller`` on a cluster), nothing is
done for a clone across namespaces until its DataVolume's clone token checks
out (``clonetoken``); a refusal is Running False ``CloneValidationFailed``.
"""

from __future__ import annotations

import copy as copy_mod
import logging

from cryptography.hazmat.primitives.asymmetric import rsa

from cdi.api import defaults, pki, sourceref
from cdi.api import errors as api_errors
from cdi.backends.port import Obj, ObjectStore
from cdi.controllers import events, importpod
from cdi.controllers.clone import clonetoken, strategy
from cdi.controllers.clone.hostcopy import POLL, HostAssistedCopy
from cdi.controllers.clone.pods import (
    CLONE_FOR,
    snapshot_name,
    temp_source_name,
)
from cdi.controllers.datavolume import (
    NO_PVC,
    POD_PHASE,
    UploadTLS,
)
from cdi.controllers.runtime import Key, Mapper, Result, owner_keys
from cdi.controllers.workers import EMBEDDED, Workers

log = logging.getLogger(__name__)

A = importpod.ANN
CLONE_REQUEST = "k8s.io/CloneRequest"
CROSS_NAMESPACE = "CrossNamespace"
MESSAGE_CROSS_NAMESPACE = ("Snapshot and CSI clones across namespaces are copied on the "
                           "embedded backend")


class _NoSource(Exception):
    """The DataVolume names no clone source (empty reason) or one that cannot be used."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason, self.message = reason, message


def _cross_namespace() -> strategy.Decision:
    return strategy.Decision("copy", None, CROSS_NAMESPACE, MESSAGE_CROSS_NAMESPACE,
                             (strategy.Event("Warning", CROSS_NAMESPACE,
                                             MESSAGE_CROSS_NAMESPACE),))


def _dv_keys(obj: Obj) -> list[Key]:
    """Objects of a clone carry the DataVolume's namespace and name in labels."""
    labels = obj.get("metadata", {}).get("labels", {})
    if CLONE_FOR in labels:
        ns, _, name = labels[CLONE_FOR].partition(".")
        return [(ns, name)]
    return list(owner_keys("DataVolume")(obj))


class CloneController(HostAssistedCopy):
    name = "clone"
    kind = "DataVolume"

    def __init__(self, store: ObjectStore, *, upload_tls: UploadTLS | None = None,
                 client_signer: pki.Signer | None = None,
                 service_addresses: bool = False,
                 token_key: rsa.RSAPublicKey | None = None,
                 workers: Workers = EMBEDDED) -> None:
        super().__init__(store, upload_tls=upload_tls, workers=workers)
        self._client_signer = client_signer
        # Clone tokens are checked only with the apiserver's key (see clonetoken).
        self._tokens = clonetoken.Verifier(token_key) if token_key is not None else None
        # On a cluster the target's upload server is reached through its Service (the
        # embedded pod runner publishes a loopback address in an annotation instead).
        self._service_addresses = service_addresses
        self._waiting_on: dict[Key, set[Key]] = {}  # DataSource -> DataVolumes naming it

    def watches(self) -> dict[str, Mapper]:
        return {"PersistentVolumeClaim": _dv_keys, "Pod": self._pod_keys,
                "VolumeSnapshot": _dv_keys, "DataSource": self._datasource_keys}

    def _datasource_keys(self, ds: Obj) -> list[Key]:
        """A DataSource that appears or changes wakes the DataVolumes waiting on it."""
        return list(self._waiting_on.get((ds["metadata"].get("namespace", ""),
                                           ds["metadata"]["name"]), ()))

    def _pod_keys(self, pod: Obj) -> list[Key]:
        keys = _dv_keys(pod)
        for ns, claim in owner_keys("PersistentVolumeClaim")(pod):
            keys.append((ns, claim))  # the target's upload pod: claim and DataVolume share names
        return keys

    async def reconcile(self, key: Key) -> Result | None:
        ns, name = key
        dv = await self._get("DataVolume", name, ns)
        if dv is None:
            await self._remove_leftovers(ns, name)
            return None
        if dv["metadata"].get("deletionTimestamp"):
            return None
        phase = (dv.get("status") or {}).get("phase", "")
        if phase in ("Succeeded", "Failed"):
            return None
        try:
            kind, src_ns, src_name = await self._source_of(dv)
        except _NoSource as e:
            if e.message:
                await self._set_status(dv, phase="Pending", bound=NO_PVC,
                                       running=("False", e.reason, e.message))
                return Result(requeue_after=strategy.Wait.REQUEUE_AFTER)
            return None
        if self._tokens is not None:
            refusal = self._tokens.refusal(dv, kind=kind, source_namespace=src_ns,
                                           source_name=src_name)
            if refusal is not None:
                await self._refuse(dv, refusal)
                return None
        target = await self._get("PersistentVolumeClaim", name, ns)
        if target is None:
            if kind == "snapshot":
                return await self._start_from_snapshot(dv, src_ns, src_name)
            return await self._start(dv, src_ns, src_name)
        if kind == "snapshot":  # restored into a claim of its own for a host-assisted copy
            src_name = temp_source_name(dv)
        if not any(r.get("uid") == dv["metadata"]["uid"]
                   for r in target["metadata"].get("ownerReferences", [])):
            await self._set_status(dv, phase="Pending", bound=(
                "False", "ErrResourceExists",
                f'Resource "{name}" already exists and is not managed by DataVolume'))
            return None
        kind = target["metadata"].get("annotations", {}).get(strategy.ANN_CLONE_TYPE, "copy")
        bound = target.get("status", {}).get("phase") == "Bound"
        bound_cond = (("True", "Bound", f"PVC {name} Bound") if bound
                      else ("False", "Pending", f"PVC {name} Pending"))
        if kind in ("csi-clone", "snapshot"):
            if not bound:
                error = target["metadata"].get("annotations", {}).get(
                    "embedded.cdi.kubevirt.io/provisioning-error", "")
                await self._set_status(dv, phase="CSICloneInProgress" if kind == "csi-clone"
                                       else "CloneFromSnapshotSourceInProgress",
                                       bound=bound_cond,
                                       running=("False", "Pending" if not error else "Error",
                                                error))
                return Result(requeue_after=POLL)
            if kind == "snapshot":
                await self._delete("VolumeSnapshot", snapshot_name(dv), src_ns)
            return await self._succeeded(dv, target, src_ns, src_name, bound_cond)
        return await self._copy(dv, target, src_ns, src_name, bound_cond)

    # -- sources ------------------------------------------------------------------

    async def _source_of(self, dv: Obj) -> tuple[str, str, str]:
        """("pvc" | "snapshot", namespace, name) of what the DataVolume clones, resolved as
        admission resolved it for the permission check and the token (``sourceref``)."""
        key = (dv["metadata"]["namespace"], dv["metadata"]["name"])

        async def datasource(ns: str, name: str) -> Obj | None:
            # Noted before the read, so a DataSource made or changed after it wakes us.
            self._waiting_on.setdefault((ns, name), set()).add(key)
            return await self._get("DataSource", name, ns)

        try:
            source = await sourceref.clone_source(dv, datasource)
        except sourceref.Unresolved as e:
            raise _NoSource(e.reason, e.message) from e
        if source is None:
            raise _NoSource("", "")
        return source.kind, source.namespace, source.name

    async def _start_from_snapshot(self, dv: Obj, snap_ns: str, snap_name: str
                                   ) -> Result | None:
        """Restore a VolumeSnapshot: directly where its driver allows, else copy a restore."""
        ns, name = dv["metadata"]["namespace"], dv["metadata"]["name"]
        snap = await self._get("VolumeSnapshot", snap_name, snap_ns)
        content_name = ((snap or {}).get("status") or {}).get("boundVolumeSnapshotContentName")
        content = await self._get("VolumeSnapshotContent", content_name, "") \
            if content_name else None
        spec = await self._target_spec(dv, None, size=((snap or {}).get("status") or {})
                                       .get("restoreSize"))
        if spec is None:
            return Result(requeue_after=strategy.Wait.REQUEUE_AFTER)
        target_sc = await self._get("StorageClass", spec["storageClassName"], "") \
            if spec.get("storageClassName") else None
        try:
            decision = strategy.for_snapshot(snapshot_name=snap_name, snapshot=snap,
                                             content=content, target=spec,
                                             target_class=target_sc)
        except strategy.NoDecision as e:
            return await self._no_decision(dv, e)
        if decision.strategy == "snapshot" and snap_ns != ns:
            decision = _cross_namespace()
        for ev in decision.events:
            await events.emit(self._store, dv, reason=ev.reason, message=ev.message,
                              type_=ev.type)
        annotations = strategy.claim_annotations(decision)
        if decision.strategy == "snapshot":
            await self._create_target(dv, None, annotations, {
                "apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot",
                "name": snap_name}, spec=spec)
            await self._set_status(dv, phase="CloneFromSnapshotSourceInProgress",
                                   bound=("False", "Pending", f"PVC {name} Pending"))
            return Result(requeue_after=0.01)
        # Host-assisted: restore the snapshot into a claim of its own driver, copy from it.
        assert snap is not None and content is not None
        temp = temp_source_name(dv)
        driver = content["spec"].get("driver")
        classes = sorted((c for c in (await self._store.list("StorageClass")).items
                          if c.get("provisioner") == driver),
                         key=lambda c: str(c["metadata"]["name"]))
        if not classes:
            return await self._no_decision(dv, strategy.Wait(
                "NoStorageClass", f"no storage class for the snapshot's driver {driver}"))
        mode = content["spec"].get("sourceVolumeMode") or "Filesystem"
        claim: Obj = {
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": temp, "namespace": snap_ns,
                         "labels": {CLONE_FOR: f"{ns}.{name}"}},
            "spec": {"accessModes": ["ReadWriteOnce"], "volumeMode": mode,
                     "storageClassName": classes[0]["metadata"]["name"],
                     "resources": {"requests": {"storage": snap["status"]["restoreSize"]}},
                     "dataSource": {"apiGroup": "snapshot.storage.k8s.io",
                                    "kind": "VolumeSnapshot", "name": snap_name}}}
        try:
            await self._store.create(claim)
        except api_errors.AlreadyExists:
            pass
        annotations[CLONE_REQUEST] = f"{snap_ns}/{temp}"
        await self._create_target(dv, None, annotations, None, spec=spec)
        await self._set_status(dv, phase="CloneScheduled",
                               bound=("False", "Pending", f"PVC {name} Pending"))
        return Result(requeue_after=0.01)

    async def _refuse(self, dv: Obj, message: str) -> None:
        """Stop a clone its token does not allow; a change to the DataVolume looks again."""
        old = {c["type"]: c for c in (dv.get("status") or {}).get("conditions", [])}
        if old.get("Running", {}).get("message") != message:
            log.warning("CLONE %s/%s refused: %s", dv["metadata"]["namespace"],
                        dv["metadata"]["name"], message)
        await self._set_status(dv, phase="Pending", running=("False", clonetoken.REASON, message),
                               warn=message, warn_reason=clonetoken.REASON)

    async def _no_decision(self, dv: Obj, e: strategy.NoDecision) -> Result:
        old = {c["type"]: c for c in (dv.get("status") or {}).get("conditions", [])}
        if old.get("Running", {}).get("message") != e.message:
            for ev in e.events:
                await events.emit(self._store, dv, reason=ev.reason, message=ev.message,
                                  type_=ev.type)
        await self._set_status(dv, phase="Pending", bound=NO_PVC,
                               running=("False", e.reason, e.message))
        return Result(requeue_after=strategy.Wait.REQUEUE_AFTER)

    # -- deciding ------------------------------------------------------------------

    async def _remove_leftovers(self, ns: str, name: str) -> None:
        """A deleted clone DataVolume: what it made outside its own claim goes too (the
        source pod and its key, the temporary snapshot and restore, in any namespace)."""
        selector = f"{CLONE_FOR}={ns}.{name}"
        for kind in ("Pod", "Secret", "VolumeSnapshot", "PersistentVolumeClaim"):
            for obj in (await self._store.list(kind, None, label_selector=selector)).items:
                meta = obj["metadata"]
                log.info("CLONE %s/%s deleted: removing %s %s/%s", ns, name, kind,
                         meta.get("namespace"), meta["name"])
                await self._delete(kind, meta["name"], meta.get("namespace", ""))

    async def _unpopulated(self, src: Obj) -> str | None:
        """Why the source claim holds no finished data yet (None: it does)."""
        meta = src["metadata"]
        owner = await self._get("DataVolume", meta["name"], meta["namespace"])
        if owner is not None and (owner.get("status") or {}).get("phase") != "Succeeded":
            return (f"The source pvc {meta['name']} is not populated yet: DataVolume "
                    f"{meta['name']} is {(owner.get('status') or {}).get('phase') or 'Pending'}")
        ann = meta.get("annotations") or {}
        if A + "storage.upload.target" in ann and ann.get(POD_PHASE) != "Succeeded":
            return f"The source pvc {meta['name']} is not populated yet: its upload is not done"
        return None

    async def _start(self, dv: Obj, src_ns: str, src_name: str) -> Result | None:
        ns, name = dv["metadata"]["namespace"], dv["metadata"]["name"]
        src = await self._get("PersistentVolumeClaim", src_name, src_ns)
        why = await self._unpopulated(src) if src is not None else None
        if why is not None:
            await self._set_status(dv, phase="CloneScheduled", bound=NO_PVC,
                                   running=("False", "CloneSourceNotPopulated", why))
            return Result(requeue_after=POLL)
        snap = await self._get("VolumeSnapshot", snapshot_name(dv), src_ns)
        if snap is not None:  # the snapshot strategy was chosen: restore when it is ready
            if not (snap.get("status") or {}).get("readyToUse"):
                error = ((snap.get("status") or {}).get("error") or {}).get("message")
                await self._set_status(
                    dv, phase="SnapshotForSmartCloneInProgress", bound=NO_PVC,
                    running=("False", "SnapshotFailed", str(error)) if error else None,
                    warn=str(error) if error else None, warn_reason="SnapshotFailed")
                return Result(requeue_after=POLL)
            await self._create_target(dv, src, {strategy.ANN_CLONE_TYPE: "snapshot"}, {
                "apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot",
                "name": snapshot_name(dv)})
            return Result(requeue_after=0.01)
        spec = await self._target_spec(dv, src)
        if spec is None:
            return Result(requeue_after=strategy.Wait.REQUEUE_AFTER)
        decision, wait = await self._decide(dv, src, src_name, spec)
        if decision is None:
            return wait
        annotations = strategy.claim_annotations(decision)
        if decision.strategy != "copy" and src_ns != ns:
            decision = _cross_namespace()
            annotations = strategy.claim_annotations(decision)
        for e in decision.events:
            await events.emit(self._store, dv, reason=e.reason, message=e.message, type_=e.type)
        if decision.strategy == "snapshot":
            assert src is not None
            await self._store.create({
                "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
                "metadata": {"name": snapshot_name(dv), "namespace": src_ns,
                             "labels": {CLONE_FOR: f"{ns}.{name}"}},
                "spec": {"source": {"persistentVolumeClaimName": src_name},
                         "volumeSnapshotClassName": decision.snapshot_class}})
            await self._set_status(dv, phase="SnapshotForSmartCloneInProgress", bound=NO_PVC)
            return Result(requeue_after=POLL)
        data_source = ({"kind": "PersistentVolumeClaim", "name": src_name}
                       if decision.strategy == "csi-clone" else None)
        if decision.strategy == "copy":
            annotations[CLONE_REQUEST] = f"{src_ns}/{src_name}"
        await self._create_target(dv, src, annotations, data_source)
        await self._set_status(dv, phase="CloneScheduled" if decision.strategy == "copy"
                               else "CSICloneInProgress",
                               bound=("False", "Pending", f"PVC {name} Pending"))
        return Result(requeue_after=0.01)

    async def _target_spec(self, dv: Obj, src: Obj | None, *, size: str | None = None
                           ) -> Obj | None:
        """The target claim's spec; an empty size is the source's (or ``size``)."""
        dv = copy_mod.deepcopy(dv)
        spec = dv["spec"]
        storage = spec.get("storage") if spec.get("storage") is not None else spec.get("pvc")
        requests = (storage or {}).setdefault("resources", {}).setdefault("requests", {})
        if not requests.get("storage") and size:
            requests["storage"] = size
        if not requests.get("storage"):
            if src is None:
                return {"storageClassName": (storage or {}).get("storageClassName"),
                        "resources": {"requests": {}}}
            requests["storage"] = (src.get("status", {}).get("capacity", {}).get("storage")
                                   or src["spec"]["resources"]["requests"]["storage"])
        sc_name = (storage or {}).get("storageClassName")
        sc = await self._get("StorageClass", sc_name, "") if sc_name else \
            await self._default_class()
        profile = await self._get("StorageProfile", sc["metadata"]["name"], "") if sc else None
        config = await self._config()
        overhead = defaults.filesystem_overhead(config.get("status", {}),
                                                sc["metadata"]["name"] if sc else None)
        try:
            rendered: Obj = defaults.render_pvc_spec(dv, storage_class=sc, profile=profile,
                                                     overhead=overhead)
        except api_errors.APIError as e:
            await self._set_status(dv, phase="Pending", bound=("False", "ErrClaimNotValid",
                                                               e.message), warn=e.message)
            return None
        if sc is not None:
            rendered.setdefault("storageClassName", sc["metadata"]["name"])
        return rendered

    async def _decide(self, dv: Obj, src: Obj | None, src_name: str, spec: Obj
                      ) -> tuple[strategy.Decision | None, Result | None]:
        target_sc = await self._get("StorageClass", spec["storageClassName"], "") \
            if spec.get("storageClassName") else None
        source_volume = await self._get("PersistentVolume", src["spec"]["volumeName"], "") \
            if src is not None and src["spec"].get("volumeName") else None
        source_sc = await self._get("StorageClass", src["spec"]["storageClassName"], "") \
            if src is not None and src["spec"].get("storageClassName") else None
        profiles = {}
        for sc in (source_sc, target_sc):
            if sc is not None:
                profiles[sc["metadata"]["name"]] = await self._get(
                    "StorageProfile", sc["metadata"]["name"], "")
        try:
            decision = strategy.for_pvc(
                source_name=src_name, source=src, target=spec, target_class=target_sc,
                source_volume=source_volume, source_class=source_sc,
                source_profile=profiles.get(source_sc["metadata"]["name"]) if source_sc else None,
                target_profile=profiles.get(target_sc["metadata"]["name"]) if target_sc else None,
                target_content_type=dv["spec"].get("contentType") or "kubevirt",
                snapshot_classes=(await self._store.list("VolumeSnapshotClass")).items,
                cdi_config=await self._config(),
                permissive=A + "permissiveClone" in dv["metadata"].get("annotations", {}))
        except strategy.NoDecision as e:
            return None, await self._no_decision(dv, e)
        return decision, None

    async def _create_target(self, dv: Obj, src: Obj | None, annotations: dict[str, str],
                             data_source: Obj | None, *, spec: Obj | None = None) -> None:
        meta = dv["metadata"]
        spec = spec if spec is not None else await self._target_spec(dv, src)
        if spec is None:
            return
        if data_source is not None:
            spec["dataSource"] = data_source
        passed = importpod.passed_annotations(dv)
        pvc: Obj = {
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {
                "name": meta["name"], "namespace": meta["namespace"],
                "labels": {"app": "containerized-data-importer", **meta.get("labels", {})},
                "annotations": {**passed, **annotations,
                                A + "storage.contentType":
                                    dv["spec"].get("contentType") or "kubevirt",
                                A + "createdForDataVolume": meta["uid"]},
                "ownerReferences": [{"apiVersion": dv["apiVersion"], "kind": "DataVolume",
                                     "name": meta["name"], "uid": meta["uid"],
                                     "controller": True, "blockOwnerDeletion": True}],
            },
            "spec": spec,
        }
        try:
            await self._store.create(pvc)
        except api_errors.AlreadyExists:
            pass

    # -- host-assisted copy ------------------------------------------------------------
