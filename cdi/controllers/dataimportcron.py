"""DataImportCron controller: keep a DataSource on the newest import of a registry image.

CDI's ``dataimportcron-controller.go`` (reference 1.3, 6.1-6.4), for
``docker://`` registry sources with the default pod pull:

- **Schedule.**  The next run lives in the ``storage.import.nextCronTime``
  annotation (RFC 3339), written in the same update as the poll's result, so
  a restart of ``cdi serve`` neither skips a run nor runs one twice.  A cron
  without the annotation (a new one) is polled at once, like CDI's initial
  Job; an empty schedule never polls (users may set
  ``storage.import.sourceDesiredDigest`` themselves).  Setting
  ``nextCronTime`` to a past time forces a poll.
- **Poll** (``cronpoll``): one manifest request; the digest goes to
  ``storage.import.sourceDesiredDigest``, the time to
  ``storage.import.lastCronTime`` and ``status.lastExecutionTimestamp``.
- **Import.**  A new digest makes a DataVolume ``<managedDataSource>-<12 hex>``
  from the template, importing ``<url without tag>@<digest>``, labelled (not
  owned) for the cron; an existing claim of that name is reused.
- **Completion.**  Only a Succeeded DataVolume moves the managed DataSource to
  it; a failed import keeps the DataSource on the last good volume and is
  deleted when a newer digest arrives.  Then old imports are garbage-collected.
- **Storage** (``cronsource``): the class and the PVC or snapshot format come from
  the template and the class's StorageProfile; a new class re-imports; with the
  snapshot format the DataSource moves only once the new snapshot is ready.
- **Deletion.**  With ``retentionPolicy: None`` the labelled DataSource,
  DataVolumes and claims go with the cron; by default they stay.

Conditions and their reasons/messages are CDI's (``dataimportcron-conditions.go``).
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import logging
from collections.abc import Callable
from typing import Any

from cdi.api import cron
from cdi.api import errors as api_errors
from cdi.backends.port import Obj, ObjectStore
from cdi.controllers import cronhttp, cronpoll, cronpvc, cronquiet, cronsource, events
from cdi.controllers.cronnames import (
    ANN_LAST_USE_TIME,
    digested_url,
    dv_name,
    parse_time,
    rfc3339,
    rfc3339nano,
    set_condition,
    utcnow,
)
from cdi.controllers.runtime import Key, Mapper, Result

log = logging.getLogger(__name__)

A = "cdi.kubevirt.io/"
ANN_DESIRED_DIGEST = A + "storage.import.sourceDesiredDigest"
ANN_NEXT_CRON_TIME = A + "storage.import.nextCronTime"
ANN_LAST_CRON_TIME = A + "storage.import.lastCronTime"
ANN_IMMEDIATE_BIND = A + "storage.bind.immediate.requested"
ANN_RETAIN_AFTER_COMPLETION = A + "storage.pod.retainAfterCompletion"
LABEL_CRON = A + "dataImportCron"
LABEL_CLEANUP = A + "dataImportCron.cleanup"

PROGRESSING = "Progressing"
UP_TO_DATE = "UpToDate"
# Reasons, as CDI's dataimportcron-conditions.go spells them.
REASON_NO_DIGEST = "NoDigest"
REASON_NO_IMPORT = "NoImport"
REASON_OUTDATED = "Outdated"
REASON_SCHEDULED = "ImportScheduled"
REASON_IN_PROGRESS = "ImportProgressing"
REASON_UP_TO_DATE = "UpToDate"
MSG_NO_DIGEST = "No source digest"
MSG_NO_IMPORT = "No current import"
MSG_OUTDATED = "Source digest updated since last import"
MSG_SCHEDULED = "Import is scheduled"
MSG_IN_PROGRESS = "Import is progressing"
MSG_UP_TO_DATE = "Latest import is up to date"
MSG_DV_PHASE = "Import DataVolume phase {phase}"
ERR_ALREADY_MANAGED = "ErrDataSourceAlreadyManaged"
MSG_ALREADY_MANAGED = "DataSource {ds} is already managed by DataImportCron {cron}"

FAILED_REASONS = ("Error", "ImagePullFailed")  # Running reasons that let a new digest replace
POLL_RETRY = 30.0  # seconds before a failed poll is tried again (sooner if the schedule says)


def _cron_of(obj: Obj) -> list[Key]:
    meta = obj.get("metadata", {})
    name = (meta.get("labels") or {}).get(LABEL_CRON)
    return [(meta.get("namespace", ""), name)] if name else []


def _registry(dic: Obj) -> Obj | None:
    source = (((dic.get("spec") or {}).get("template") or {}).get("spec") or {}).get("source")
    registry = (source or {}).get("registry")
    return registry if isinstance(registry, dict) else None


def polled(dic: Obj) -> bool:
    """Whether this controller polls the cron's source (a docker:// URL, pod pull; or an
    HTTP URL, see ``cronhttp``)."""
    if cronhttp.polled(dic):
        return True
    if cronpvc.source(dic) is not None:
        return bool((dic.get("spec") or {}).get("schedule"))
    reg = _registry(dic)
    return (reg is not None and str(reg.get("url") or "").startswith("docker://")
            and reg.get("pullMethod") != "node" and bool((dic.get("spec") or {}).get("schedule")))


Poller = Callable[[cronpoll.PollTarget], str]


class DataImportCronController:
    name = "dataimportcron"
    kind = "DataImportCron"

    def __init__(self, store: ObjectStore, *,
                 clock: Callable[[], datetime.datetime] = utcnow,
                 poller: Poller = cronpoll.poll_digest,
                 authorize_clone: cronpvc.CloneAuthorizer | None = None) -> None:
        self._store = store
        self._clock = clock
        self._poller = poller
        self._authorize_clone = authorize_clone
        self._poll_errors: dict[Key, str] = {}  # the last failure reported, per cron
        # Per cron: its storage class and whether the template names it (for the mappers).
        self._classes: dict[Key, tuple[str, bool]] = {}
        # Per cron: (newest import, DataSource source) when garbage was last collected.
        self._collected: dict[Key, tuple[str, str]] = {}
        # Crons in the steady state get a short pass (cronquiet); the event count per
        # cron at the start of its running pass.
        self._quiet = cronquiet.Quiet()
        self._marks: dict[Key, int] = {}

    def watches(self) -> dict[str, Mapper]:
        mappers: dict[str, Mapper] = {
            "DataVolume": _cron_of, "PersistentVolumeClaim": _cron_of,
            "DataSource": _cron_of, "VolumeSnapshot": _cron_of,
            "StorageClass": self._crons_of_class, "StorageProfile": self._crons_of_class}
        return {kind: self._quiet.watching(m) for kind, m in mappers.items()}

    def _crons_of_class(self, obj: Obj) -> list[Key]:
        """Crons whose imports go to this class, or to whatever class is the default."""
        name = obj.get("metadata", {}).get("name", "")
        return [key for key, (cls, explicit) in self._classes.items()
                if cls == name or not explicit]

    # -- reconcile ----------------------------------------------------------------------

    async def reconcile(self, key: Key) -> Result | None:
        ns, name = key
        mark = self._marks[key] = self._quiet.mark(key)
        dic = await self._get("DataImportCron", name, ns)
        if dic is None or dic["metadata"].get("deletionTimestamp"):
            self._poll_errors.pop(key, None)
            self._classes.pop(key, None)
            self._collected.pop(key, None)
            self._quiet.forget(key)
            self._marks.pop(key, None)
            await self.cleanup(ns, name)
            return None
        if self._quiet.unchanged(key, dic):
            return await self._quiet.steady_pass(self._store, dic, self._clock(),
                                                 self._poll_if_due,
                                                 lambda: key in self._poll_errors, mark)
        if not await self._should_reconcile(dic):
            return None
        return await self._update(dic)

    async def _should_reconcile(self, dic: Obj) -> bool:
        ns, name = dic["metadata"]["namespace"], dic["metadata"]["name"]
        ds_name = dic["spec"].get("managedDataSource") or ""
        ds = await self._get("DataSource", ds_name, ns)
        owner = ((ds or {}).get("metadata", {}).get("labels") or {}).get(LABEL_CRON, "")
        if ds is None or owner in ("", name):
            return True
        other = await self._get("DataImportCron", owner, ns)
        if other is not None and other["spec"].get("managedDataSource") == ds_name:
            message = MSG_ALREADY_MANAGED.format(ds=ds_name, cron=owner)
            log.info("[%s/%s] dataimportcron: %s", ns, name, message)
            await events.emit(self._store, dic, reason=ERR_ALREADY_MANAGED, message=message,
                              type_="Warning")
            return False
        return True

    async def _update(self, dic: Obj) -> Result | None:
        ns = dic["metadata"]["namespace"]
        now = self._clock()
        stamp = rfc3339(now)
        new = copy.deepcopy(dic)
        ann: dict[str, str] = new["metadata"].setdefault("annotations", {})
        status: Obj = new.setdefault("status", {})
        conditions: list[Obj] = status.setdefault("conditions", [])
        imports: list[Obj] = list(status.get("currentImports") or [])
        dv = pvc = None
        if imports:
            dv = await self._get("DataVolume", imports[0].get("DataVolumeName", ""), ns)
            pvc = await self._get("PersistentVolumeClaim",
                                  imports[0].get("DataVolumeName", ""), ns)

        key = (ns, dic["metadata"]["name"])
        sc = await cronsource.desired_class(self._store, dic)
        sc_name = sc["metadata"]["name"] if sc is not None else ""
        self._classes[key] = (sc_name, bool(cronsource.explicit_class(dic)))
        if sc is not None:
            if await cronsource.delete_outdated_pending(self._store, pvc, sc_name,
                                                        key[1], LABEL_CRON):
                return None  # its deletion brings us back
            current_sc = ann.get(cronsource.ANN_STORAGE_CLASS)
            if current_sc and current_sc != sc_name:
                await cronsource.change_class(self._store, dic, current_sc, sc_name,
                                              ANN_DESIRED_DIGEST)
                return Result(requeue_after=1.0)
            ann[cronsource.ANN_STORAGE_CLASS] = sc_name
        fmt = await cronsource.source_format(self._store, sc)
        snapshot = await self._get("VolumeSnapshot", imports[0].get("DataVolumeName", ""),
                                   ns) if imports else None

        succeeded = False
        if dv is not None:
            phase = str((dv.get("status") or {}).get("phase") or "")
            if phase == "Succeeded":
                succeeded = True
            elif phase == "ImportScheduled":
                set_condition(conditions, PROGRESSING, "False", REASON_SCHEDULED, MSG_SCHEDULED,
                              stamp)
            elif phase == "ImportInProgress":
                set_condition(conditions, PROGRESSING, "True", REASON_IN_PROGRESS,
                              MSG_IN_PROGRESS, stamp)
            else:
                set_condition(conditions, PROGRESSING, "False", phase,
                              MSG_DV_PHASE.format(phase=phase), stamp)
        elif pvc is not None and (pvc.get("status") or {}).get("phase") == "Bound":
            succeeded = True
        elif snapshot is not None:
            if fmt == cronsource.PVC:
                log.info("[%s/%s] dataimportcron: the format is pvc again; deleting snapshot %s",
                         ns, key[1], snapshot["metadata"]["name"])
                await self._delete("VolumeSnapshot", snapshot["metadata"]["name"], ns)
                return Result(requeue_after=1.0)
            if sc is not None and await cronsource.snapshot_class_changed(
                    self._store, snapshot, sc_name, dic):
                return Result(requeue_after=1.0)
            succeeded = True
        else:
            imports = imports[1:]
            set_condition(conditions, PROGRESSING, "False", REASON_NO_IMPORT, MSG_NO_IMPORT,
                          stamp)

        if succeeded:
            current = imports[0]["DataVolumeName"]
            last = {"namespace": ns, "name": current}
            if status.get("lastImportedPVC") != last:
                status["lastImportedPVC"] = last
                status["lastImportTimestamp"] = stamp
                await self._mark_used(dic, current, now)
            set_condition(conditions, PROGRESSING, "False", REASON_NO_IMPORT, MSG_NO_IMPORT,
                          stamp)
            if fmt == cronsource.SNAPSHOT and pvc is not None:
                await cronsource.snapshot_import(self._store, dic, pvc, sc_name,
                                                 self._labels(dic), now)

        point_at = status.get("lastImportedPVC")
        if fmt == cronsource.SNAPSHOT and isinstance(point_at, dict) and not cronsource.ready(
                await self._get("VolumeSnapshot", point_at.get("name", ""), ns)):
            point_at = None  # keep the last good source until the new snapshot is ready
        await cronsource.update_data_source(self._store, dic, point_at, fmt,
                                            self._labels, LABEL_CRON)
        # After the DataSource moved: what it served before may go now.  Only when the
        # newest import or the DataSource changed (a listing per pass costs O(imports)).
        seen = (imports[0]["DataVolumeName"], repr(point_at)) if succeeded else None
        if seen is not None and self._collected.get(key) != seen:
            await cronsource.collect_garbage(self._store, dic, LABEL_CRON)
            self._collected[key] = seen

        result: Result | None = None
        if polled(new):
            result = await self._poll_if_due(new, ann, now)

        desired = ann.get(ANN_DESIRED_DIGEST, "")
        if desired and (not imports or desired != imports[0].get("Digest")):
            set_condition(conditions, UP_TO_DATE, "False", REASON_OUTDATED, MSG_OUTDATED, stamp)
            if dv is not None and await self._delete_if_failed(dv):
                imports = []
            allowed, why = await cronpvc.authorized(self._authorize_clone, new)
            if not allowed:
                log.info("[%s/%s] dataimportcron: %s: %s", ns, key[1],
                         cronpvc.MSG_NOT_AUTHORIZED, why)
                set_condition(conditions, PROGRESSING, "False", cronpvc.REASON_NOT_AUTHORIZED,
                              cronpvc.MSG_NOT_AUTHORIZED, stamp)
            elif succeeded or not imports:
                created = await self._create_import(new, desired, now)
                if created is not None:
                    imports = [{"DataVolumeName": created, "Digest": desired}]
        elif succeeded:
            status["sourceFormat"] = fmt
            if fmt == cronsource.PVC or cronsource.ready(snapshot):
                set_condition(conditions, UP_TO_DATE, "True", REASON_UP_TO_DATE,
                              MSG_UP_TO_DATE, stamp)
            elif snapshot is not None:  # a new snapshot's creation brings us back
                set_condition(conditions, UP_TO_DATE, "False", REASON_IN_PROGRESS,
                              cronsource.MSG_SNAPSHOT_PROGRESSING, stamp)
        elif imports:
            set_condition(conditions, UP_TO_DATE, "False", REASON_IN_PROGRESS, MSG_IN_PROGRESS,
                          stamp)
        else:
            set_condition(conditions, UP_TO_DATE, "False", REASON_NO_DIGEST,
                          cronhttp.condition_message(new, MSG_NO_DIGEST,
                                                     self._poll_errors.get(key)), stamp)

        if imports:
            status["currentImports"] = imports
        else:
            status.pop("currentImports", None)
        last_cron = ann.get(ANN_LAST_CRON_TIME)
        if last_cron and parse_time(last_cron) is not None:
            status["lastExecutionTimestamp"] = last_cron
        rv = await self._write(dic, new)
        self._quiet.settle(key, new, rv, self._marks.get(key, -1), key in self._poll_errors)
        return result

    # -- schedule and poll ----------------------------------------------------------------

    async def _poll_if_due(self, dic: Obj, ann: dict[str, str],
                           now: datetime.datetime) -> Result | None:
        """Poll if the run is due; set the next run; return when to look again."""
        ns, name = dic["metadata"]["namespace"], dic["metadata"]["name"]
        try:
            schedule = cron.parse(dic["spec"]["schedule"])
        except cron.CronError as e:
            log.warning("[%s/%s] dataimportcron: bad schedule: %s", ns, name, e)
            return None
        next_text = ann.get(ANN_NEXT_CRON_TIME, "")
        due_at = parse_time(next_text) if next_text else None
        if due_at is not None and due_at > now:
            return Result(requeue_after=max((due_at - now).total_seconds(), 0.0))
        # Due (or never run, or an unreadable annotation): poll now.
        registry = _registry(dic) or {}
        try:
            if cronhttp.source(dic) is not None:
                digest = await cronhttp.poll_cron(self._store, dic, ann)
            elif cronpvc.source(dic) is not None:
                digest = await cronpvc.poll_digest(self._store, dic)
            else:
                target = await cronpoll.gather(self._store, ns, registry)
                digest = await asyncio.to_thread(self._poller, target)
        except cronpoll.PollError as e:
            log.warning("[%s/%s] dataimportcron: poll failed: %s", ns, name, e)
            if self._poll_errors.get((ns, name)) != str(e):  # one event per new failure
                self._poll_errors[(ns, name)] = str(e)
                await events.emit(self._store, dic, reason="PollFailed", type_="Warning",
                                  message=f"Failed to poll the source digest: {e}")
            nxt = schedule.next(now)
            return Result(requeue_after=min(POLL_RETRY, (nxt - now).total_seconds()))
        self._poll_errors.pop((ns, name), None)
        ann[ANN_LAST_CRON_TIME] = rfc3339(now)
        if ann.get(ANN_DESIRED_DIGEST) != digest:
            log.info("[%s/%s] dataimportcron: new digest %s", ns, name, digest)
            ann[ANN_DESIRED_DIGEST] = digest
        nxt = schedule.next(now)
        ann[ANN_NEXT_CRON_TIME] = rfc3339(nxt)
        return Result(requeue_after=max((nxt - now).total_seconds(), 0.0))

    # -- imports ------------------------------------------------------------------------

    def _labels(self, dic: Obj, existing: dict[str, str] | None = None) -> dict[str, str]:
        labels = dict(existing or {})
        labels[LABEL_CRON] = dic["metadata"]["name"]
        if dic["spec"].get("retentionPolicy") == "None":
            labels[LABEL_CLEANUP] = "true"
        return labels

    async def _create_import(self, dic: Obj, digest: str,
                             now: datetime.datetime) -> str | None:
        ns = dic["metadata"]["namespace"]
        try:
            name = dv_name(dic["spec"]["managedDataSource"], digest)
        except ValueError as e:
            log.warning("[%s/%s] dataimportcron: digest %r: %s", ns, dic["metadata"]["name"],
                        digest, e)
            return None
        for kind in ("VolumeSnapshot", "PersistentVolumeClaim"):
            if await self._get(kind, name, ns) is not None:
                await self._mark_used(dic, name, now, kind)
                return name  # an earlier import of this digest: reuse it
        template: Obj = copy.deepcopy(dic["spec"].get("template") or {})
        spec: Obj = template.get("spec") or {}
        registry = (spec.get("source") or {}).get("registry")
        if isinstance(registry, dict) and registry.get("url"):
            registry["url"] = digested_url(str(registry["url"]), digest)
        cronhttp.pin(spec, dic, digest)
        meta: Obj = template.get("metadata") or {}
        annotations = dict(meta.get("annotations") or {})
        annotations[ANN_IMMEDIATE_BIND] = "true"
        annotations[ANN_LAST_USE_TIME] = rfc3339nano(now)
        retain = (dic["metadata"].get("annotations") or {}).get(ANN_RETAIN_AFTER_COMPLETION)
        if retain:
            annotations[ANN_RETAIN_AFTER_COMPLETION] = retain
        dv: Obj = {
            "apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
            "metadata": {"name": name, "namespace": ns,
                         "labels": self._labels(dic, meta.get("labels")),
                         "annotations": annotations},
            "spec": spec,
        }
        try:
            await self._store.create(dv)
            log.info("[%s/%s] dataimportcron: importing %s into %s", ns,
                     dic["metadata"]["name"], digest, name)
        except api_errors.AlreadyExists:
            pass
        return name

    async def _delete_if_failed(self, dv: Obj) -> bool:
        """Delete an import whose Running condition says it failed (CDI: Error or
        ImagePullFailed) so the newer digest can be imported instead."""
        running: Obj = next((c for c in (dv.get("status") or {}).get("conditions") or []
                        if c.get("type") == "Running"), {})
        if running.get("status") != "False" or running.get("reason") not in FAILED_REASONS:
            return False
        meta = dv["metadata"]
        log.info("[%s/%s] dataimportcron: deleting failed import: %s", meta["namespace"],
                 meta["name"], running.get("message", ""))
        try:
            # Unlabel first, so its deletion does not look like one of ours going away.
            await self._store.patch("DataVolume", meta["name"], meta["namespace"],
                                    {"metadata": {"labels": {LABEL_CRON: ""}}})
            await self._store.delete("DataVolume", meta["name"], meta["namespace"])
        except api_errors.NotFound:
            pass
        return True

    async def _mark_used(self, dic: Obj, name: str, now: datetime.datetime,
                         kind: str = "PersistentVolumeClaim") -> None:
        """Refresh ``lastUseTime`` (and the cron's labels) on an imported claim or snapshot."""
        ns = dic["metadata"]["namespace"]
        obj = await self._get(kind, name, ns)
        if obj is None:
            return
        labels = self._labels(dic, obj["metadata"].get("labels"))
        patch = {"metadata": {"annotations": {ANN_LAST_USE_TIME: rfc3339nano(now)},
                              "labels": labels}}
        try:
            await self._store.patch(kind, name, ns, patch)
        except api_errors.NotFound:
            pass

    async def _delete(self, kind: str, name: str, ns: str) -> None:
        try:
            await self._store.delete(kind, name, ns)
        except api_errors.NotFound:
            pass

    # -- deletion -------------------------------------------------------------------------

    async def cleanup(self, ns: str, name: str) -> None:
        """The cron is gone: delete what it labelled for cleanup (retentionPolicy None)."""
        selector = f"{LABEL_CRON}={name},{LABEL_CLEANUP}=true"
        for kind in ("DataSource", "DataVolume", "PersistentVolumeClaim", "VolumeSnapshot"):
            for obj in (await self._store.list(kind, ns, label_selector=selector)).items:
                try:
                    await self._store.delete(kind, obj["metadata"]["name"], ns)
                    log.info("[%s/%s] dataimportcron: deleted %s %s", ns, name, kind,
                             obj["metadata"]["name"])
                except api_errors.NotFound:
                    pass

    # -- helpers --------------------------------------------------------------------------

    async def _write(self, old: Obj, new: Obj) -> str:
        """Patch what changed; return the cron's resourceVersion after it."""
        patch: Obj = {}
        if new["metadata"].get("annotations") != (old["metadata"].get("annotations") or {}):
            patch["metadata"] = {"annotations": new["metadata"]["annotations"]}
        if new.get("status") != old.get("status"):
            patch["status"] = new["status"]
            if "currentImports" not in new["status"] and "currentImports" in (
                    old.get("status") or {}):
                patch["status"] = dict(new["status"], currentImports=None)
        if not patch:
            return str(old["metadata"]["resourceVersion"])
        patch.setdefault("metadata", {})["resourceVersion"] = old["metadata"]["resourceVersion"]
        meta = old["metadata"]
        written = await self._store.patch("DataImportCron", meta["name"], meta["namespace"],
                                          patch)
        return str(written["metadata"]["resourceVersion"])

    async def _get(self, kind: str, name: str, ns: str) -> Any:
        if not name:
            return None
        try:
            return await self._store.get(kind, name, ns)
        except api_errors.NotFound:
            return None
