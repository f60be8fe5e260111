"""How a clone copies its data: ``snapshot``, ``csi-clone`` or host-assisted ``copy``.

The clone controller decides this once per target claim and saves the answer
in the claim's ``cdi.kubevirt.io/cloneType`` annotation; every later step
(the plan of phases, the DataVolume's progress, ``cdi describe``) reads it
back.  Keeping the decision a pure function of the objects, as the REST API
stores them, lets every branch of CDI's planner (``ChooseStrategy`` in
``pkg/controller/clone/planner.go``) be tested as one table row, without a
store, an event loop or a clock.

The answer is one of three things:

- a ``Decision``: the strategy, the snapshot class for ``snapshot``, and for a
  smart clone that had to fall back to ``copy`` CDI's reason constant and
  message; plus the events to record on the target claim;
- ``Wait``: nothing can be decided yet (the claim names no StorageClass, the
  source is missing, an object is not ready); decide again later;
- ``CloneRefused``: the clone as asked cannot work (a target smaller than its
  source, content that does not match); it will not until an object changes.

The strategy asked for is, first to last: the cluster-wide
``cloneStrategyOverride``; the target StorageProfile's ``status.cloneStrategy``;
``snapshot``.  CDI reads the StorageClass annotation
``cdi.kubevirt.io/clone-strategy`` only when it computes the profile's status
(after the profile's ``spec.cloneStrategy``, before what it knows of the
provisioner), so the annotation loses to the profile.  A profile that has no
status yet (just created, not reconciled) gets the same order here, spec then
annotation, where CDI's planner would go straight to ``snapshot``.

Snapshot sources always ask for ``snapshot`` (the override and profiles do not
apply); their only fallback is ``copy`` through a restored claim.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any, Literal, NamedTuple

from cdi.api import units
from cdi.controllers.clone import snapshotclass

Obj = Mapping[str, Any]
StrategyName = Literal["snapshot", "csi-clone", "copy"]

SNAPSHOT: StrategyName = "snapshot"
CSI_CLONE: StrategyName = "csi-clone"
COPY: StrategyName = "copy"
_STRATEGIES: dict[str, StrategyName] = {s: s for s in (SNAPSHOT, CSI_CLONE, COPY)}

ANN_CLONE_TYPE = "cdi.kubevirt.io/cloneType"
ANN_CLONE_FALLBACK_REASON = "cdi.kubevirt.io/cloneFallbackReason"
ANN_CLONE_STRATEGY = "cdi.kubevirt.io/clone-strategy"  # on StorageClasses
ANN_CONTENT_TYPE = "cdi.kubevirt.io/storage.contentType"
ANN_MINIMUM_SUPPORTED_PVC_SIZE = "cdi.kubevirt.io/minimumSupportedPvcSize"  # on profiles

NORMAL = "Normal"
WARNING = "Warning"

# CDI's reasons and messages (planner.go, common/util.go).
CLONE_WITHOUT_SOURCE = "CloneWithoutSource"
MESSAGE_CLONE_WITHOUT_SOURCE = "The source {kind} {name} doesn't exist"
CLONE_VALIDATION_FAILED = "CloneValidationFailed"
MESSAGE_CLONE_VALIDATION_FAILED = "The clone doesn't meet the validation requirements"
ERR_INCOMPATIBLE_PVC = "ErrIncompatiblePVC"
NO_VOLUME_SNAPSHOT_CLASS = "NoVolumeSnapshotClass"
MESSAGE_NO_VOLUME_SNAPSHOT_CLASS = "No compatible volumesnapshotclass found"
INCOMPATIBLE_VOLUME_MODES = "IncompatibleVolumeModes"
MESSAGE_INCOMPATIBLE_VOLUME_MODES = "The volume modes of source and target are incompatible"
NO_VOLUME_EXPANSION = "NoVolumeExpansion"
MESSAGE_NO_VOLUME_EXPANSION = "No volume expansion is possible"
NO_PROVISIONER_MATCH = "NoProvisionerMatch"
MESSAGE_NO_PROVISIONER_MATCH = (
    "The storageclass provisioner does not match the volumesnapshotcontent driver")
INCOMPATIBLE_PROVISIONERS = "IncompatibleProvisioners"
MESSAGE_INCOMPATIBLE_PROVISIONERS = "Provisioners are incompatible"

# Ours: CDI returns a bare error (shown in cloneError) or nothing at these points.
STORAGE_CLASS_UNSET = "StorageClassUnset"
STORAGE_CLASS_EMPTY = "StorageClassEmpty"
STORAGE_CLASS_NOT_FOUND = "StorageClassNotFound"
SOURCE_NOT_READY = "SourceNotReady"
SNAPSHOT_CLASS_NOT_FOUND = "SnapshotClassNotFound"
UNKNOWN_CLONE_STRATEGY = "UnknownCloneStrategy"


class Event(NamedTuple):
    """An event to record on the target claim."""

    type: str
    reason: str
    message: str


@dataclasses.dataclass(frozen=True)
class Decision:
    """The strategy, the snapshot class it uses, why it fell back to copy, what to announce.

    ``fallback_reason`` is CDI's reason constant (the Warning event's reason),
    ``fallback_message`` its message (what ``cloneFallbackReason`` holds).
    """

    strategy: StrategyName
    snapshot_class: str | None = None
    fallback_reason: str | None = None
    fallback_message: str | None = None
    events: tuple[Event, ...] = ()


class NoDecision(Exception):
    """No strategy now: ``reason``, ``message`` and the ``events`` to record anyway."""

    def __init__(self, reason: str, message: str, *, events: tuple[Event, ...] = ()) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.events = events

    def __str__(self) -> str:
        return self.message


class CloneRefused(NoDecision):
    """The clone cannot work as specified; CDI records ``message`` as the clone's error."""


class Wait(NoDecision):
    """Something the decision needs is missing or not ready; decide again later.

    ``error`` says how CDI shows the wait: False, the clone stays Pending and is
    looked at again after ``REQUEUE_AFTER`` seconds; True, ``message`` becomes the
    clone's error (``cloneError``, phase Error) while it retries with backoff.
    """

    REQUEUE_AFTER = 5.0

    def __init__(self, reason: str, message: str, *, events: tuple[Event, ...] = (),
                 error: bool = False) -> None:
        super().__init__(reason, message, events=events)
        self.error = error


def claim_annotations(decision: Decision,
                      existing: Mapping[str, str] | None = None) -> dict[str, str]:
    """The annotations CDI puts on the target claim for ``decision``.

    ``cloneType`` is the strategy; ``cloneFallbackReason`` holds the fallback
    *message* (as CDI writes it) and is left alone when ``existing`` has one.
    """
    result: dict[str, str] = {ANN_CLONE_TYPE: decision.strategy}
    if decision.fallback_message is not None and not (existing or {}).get(
            ANN_CLONE_FALLBACK_REASON):
        result[ANN_CLONE_FALLBACK_REASON] = decision.fallback_message
    return result


# --- reading the objects ---------------------------------------------------------------------


def _get(obj: Obj | None, *path: str) -> Any:
    value: Any = obj
    for key in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    return value


def _size(value: Any) -> int | None:
    return None if value is None or value == "" else units.to_bytes(value)


def _volume_mode(mode: Any) -> str:
    return "Block" if mode == "Block" else "Filesystem"


def _content_type(value: Any) -> str:
    return "archive" if value == "archive" else "kubevirt"


def _allows_expansion(storage_class: Obj) -> bool:
    return storage_class.get("allowVolumeExpansion") is True


def _fallback(reason: str, message: str, events: tuple[Event, ...] = ()) -> Decision:
    return Decision(COPY, None, reason, message, (*events, Event(WARNING, reason, message)))


def _target_class(target: Obj, target_class: Obj | None) -> Obj:
    """CDI's ``validateTargetStorageClassAssignment``."""
    name = target.get("storageClassName")
    if name is None:
        raise Wait(STORAGE_CLASS_UNSET,
                   "Target PVC has nil storage class, cannot compute strategy")
    if name == "":
        raise CloneRefused(STORAGE_CLASS_EMPTY, "claim has emptystring storageclass, will not work")
    if target_class is None or _get(target_class, "metadata", "name") != name:
        raise Wait(STORAGE_CLASS_NOT_FOUND, "target storage class not found", error=True)
    return target_class


def _refuse(message: str) -> CloneRefused:
    return CloneRefused(ERR_INCOMPATIBLE_PVC, message, events=(
        Event(WARNING, ERR_INCOMPATIBLE_PVC, message),
        Event(WARNING, CLONE_VALIDATION_FAILED, MESSAGE_CLONE_VALIDATION_FAILED)))


def _validate_source(source: Obj, target: Obj, target_content_type: str,
                     target_profile: Obj | None, permissive: bool) -> None:
    """Content types, volume modes of archives, and sizes; refusals carry the planner's events.

    CDI's planner checks only the sizes (requests, the target raised to the
    profile's minimum).  The content-type and archive volume-mode rules are
    those of its host-assisted clone and upload controllers, which would refuse
    the same clone later, after any fallback; here they refuse it up front.
    """
    source_ct = _content_type(_get(source, "metadata", "annotations", ANN_CONTENT_TYPE))
    target_ct = _content_type(target_content_type)
    if source_ct != target_ct:
        raise _refuse(f"source contentType ({source_ct}) and target contentType ({target_ct}) "
                      "do not match")
    source_mode = _volume_mode(_get(source, "spec", "volumeMode"))
    target_mode = _volume_mode(target.get("volumeMode"))
    if source_mode != target_mode and source_ct != "kubevirt":
        raise _refuse(f"source volumeMode ({source_mode}) and target volumeMode ({target_mode}) "
                      f"do not match, contentType ({source_ct})")
    if permissive:
        return
    source_size = _size(_get(source, "spec", "resources", "requests", "storage"))
    target_size = _size(_get(target, "resources", "requests", "storage"))
    if target_size is not None:
        target_size = max(target_size, _minimum_size(target_profile))
    if source_size is None or target_size is None:
        raise _refuse("source/target missing storage resource requests")
    if source_size > target_size:
        raise _refuse("target resources requests storage size is smaller than the source "
                      f"{target_size} < {source_size}")


def _minimum_size(profile: Obj | None) -> int:
    """The profile's minimumSupportedPvcSize annotation; CDI ignores a bad value."""
    text = _get(profile, "metadata", "annotations", ANN_MINIMUM_SUPPORTED_PVC_SIZE)
    try:
        return _size(text) or 0
    except ValueError:
        return 0


def requested_strategy(*, cdi_config: Obj | None, target_profile: Obj | None,
                       target_class: Obj | None) -> StrategyName:
    """The strategy asked for, before the checks that may fall back to ``copy``.

    Raises CloneRefused for a value that is not a strategy.
    """
    value = _get(cdi_config, "spec", "cloneStrategyOverride")
    if not value:
        value = _get(target_profile, "status", "cloneStrategy")
    if not value:  # a profile not reconciled yet: what its status will say
        value = (_get(target_profile, "spec", "cloneStrategy")
                 or _get(target_class, "metadata", "annotations", ANN_CLONE_STRATEGY))
    if not value:
        return SNAPSHOT
    if value not in _STRATEGIES:
        raise CloneRefused(UNKNOWN_CLONE_STRATEGY, f"unknown strategy/source {value}")
    return _STRATEGIES[value]


# --- PVC sources -----------------------------------------------------------------------------


def for_pvc(*, source_name: str, source: Obj | None, target: Obj, target_class: Obj | None,
            source_volume: Obj | None = None, source_class: Obj | None = None,
            source_profile: Obj | None = None, target_profile: Obj | None = None,
            target_content_type: str = "kubevirt", snapshot_classes: Iterable[Obj] = (),
            cdi_config: Obj | None = None, permissive: bool = False) -> Decision:
    """The strategy for cloning the claim ``source`` into a claim with spec ``target``.

    ``source`` is None when the claim ``source_name`` does not exist;
    ``source_volume`` is the PersistentVolume it is bound to, if any.  The
    classes and profiles are the objects the claims name (None if missing);
    ``source_profile`` matters only for the snapshot class the profiles agree
    on.  ``cdi_config`` carries ``spec.cloneStrategyOverride``.
    """
    target_sc = _target_class(target, target_class)
    if source is None:
        message = MESSAGE_CLONE_WITHOUT_SOURCE.format(kind="pvc", name=source_name)
        raise Wait(CLONE_WITHOUT_SOURCE, message,
                   events=(Event(WARNING, CLONE_WITHOUT_SOURCE, message),))
    _validate_source(source, target, target_content_type, target_profile, permissive)
    strategy = requested_strategy(cdi_config=cdi_config, target_profile=target_profile,
                                  target_class=target_sc)
    if strategy == COPY:
        return Decision(COPY)
    try:
        source_driver = snapshotclass.claim_driver(source, source_volume, source_class)
    except snapshotclass.ClaimRefMismatch as e:
        raise Wait(SOURCE_NOT_READY, e.message, error=True) from e
    # The target claim is not bound yet: its driver is its class's provisioner.
    driver = snapshotclass.common_driver(source_driver, target_sc.get("provisioner") or None)
    events: tuple[Event, ...] = ()
    selected: str | None = None
    if strategy == SNAPSHOT:
        selection = _snapshot_class(driver, source_class, source_profile, target_profile,
                                    snapshot_classes)
        if selection is None:
            return _fallback(NO_VOLUME_SNAPSHOT_CLASS, MESSAGE_NO_VOLUME_SNAPSHOT_CLASS)
        selected = selection.name
        events = (Event(NORMAL, snapshotclass.VOLUME_SNAPSHOT_CLASS_SELECTED, selection.message),)
    if driver is None:  # only csi-clone gets here: snapshot already fell back, no class
        return _fallback(INCOMPATIBLE_PROVISIONERS, MESSAGE_INCOMPATIBLE_PROVISIONERS, events)
    if _volume_mode(_get(source, "spec", "volumeMode")) != _volume_mode(target.get("volumeMode")):
        return _fallback(INCOMPATIBLE_VOLUME_MODES, MESSAGE_INCOMPATIBLE_VOLUME_MODES, events)
    capacity = _size(_get(source, "status", "capacity", "storage"))
    request = _size(_get(target, "resources", "requests", "storage"))
    if capacity is None or request is None:
        raise Wait(SOURCE_NOT_READY, "source/target size info missing", events=events, error=True)
    if capacity < request and not _allows_expansion(target_sc):
        return _fallback(NO_VOLUME_EXPANSION, MESSAGE_NO_VOLUME_EXPANSION, events)
    return Decision(strategy, selected, events=events)


def _snapshot_class(driver: str | None, source_class: Obj | None, source_profile: Obj | None,
                    target_profile: Obj | None,
                    classes: Iterable[Obj]) -> snapshotclass.Selection | None:
    if driver is None:
        return None
    # A profile counts only if its StorageClass exists (CDI looks the class up first).
    named = snapshotclass.common_profile_class(
        source_profile if source_class is not None else None, target_profile)
    try:
        return snapshotclass.select(driver, named, classes)
    except snapshotclass.ClassNotFound as e:
        raise Wait(SNAPSHOT_CLASS_NOT_FOUND, e.message, error=True) from e


# --- snapshot sources ------------------------------------------------------------------------


def for_snapshot(*, snapshot_name: str, snapshot: Obj | None, content: Obj | None,
                 target: Obj, target_class: Obj | None) -> Decision:
    """The strategy for restoring the VolumeSnapshot ``snapshot`` into a claim with spec ``target``.

    ``snapshot`` is None when ``snapshot_name`` does not exist; ``content`` is the
    VolumeSnapshotContent it is bound to (None if missing).
    """
    target_sc = _target_class(target, target_class)
    if snapshot is None:
        message = MESSAGE_CLONE_WITHOUT_SOURCE.format(kind="snapshot", name=snapshot_name)
        raise Wait(CLONE_WITHOUT_SOURCE, message,
                   events=(Event(WARNING, CLONE_WITHOUT_SOURCE, message),))
    content_name = _get(snapshot, "status", "boundVolumeSnapshotContentName")
    if not content_name:
        raise Wait(SOURCE_NOT_READY, "volumeSnapshotContent name not found", error=True)
    if content is None or _get(content, "metadata", "name") != content_name:
        raise Wait(SOURCE_NOT_READY, 'volumesnapshotcontents.snapshot.storage.k8s.io '
                   f'"{content_name}" not found', error=True)
    if target_sc.get("provisioner") != _get(content, "spec", "driver"):
        return _fallback(NO_PROVISIONER_MATCH, MESSAGE_NO_PROVISIONER_MATCH)
    restore_size = _size(_get(snapshot, "status", "restoreSize"))
    if restore_size is None:
        raise Wait(SOURCE_NOT_READY, "snapshot has no RestoreSize", error=True)
    request = _size(_get(target, "resources", "requests", "storage"))
    if request is not None and restore_size < request and not _allows_expansion(target_sc):
        return _fallback(NO_VOLUME_EXPANSION, MESSAGE_NO_VOLUME_EXPANSION)
    source_mode = _volume_mode(_get(content, "spec", "sourceVolumeMode"))
    if source_mode != _volume_mode(target.get("volumeMode")):
        return _fallback(INCOMPATIBLE_VOLUME_MODES, MESSAGE_INCOMPATIBLE_VOLUME_MODES)
    return Decision(SNAPSHOT)
