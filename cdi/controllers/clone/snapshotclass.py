"""Which CSI driver a claim lives on, and which VolumeSnapshotClass a smart clone uses.

A snapshot or CSI clone only works inside one CSI driver, and a snapshot needs a
VolumeSnapshotClass of that driver.  CDI decides both from the cluster's objects
(``GetCommonDriver`` and ``GetCompatibleVolumeSnapshotClass`` in
``pkg/controller/clone/common.go``, ``GetVolumeSnapshotClass`` in
``pkg/controller/common/util.go``); this module is that lookup over plain dicts,
kept apart from the strategy rules in ``strategy`` because it answers a
narrower question that the snapshot phase asks again when it creates the
snapshot.

The rules, in CDI's order:

- A claim's driver is ``spec.csi.driver`` of its bound PersistentVolume; a claim
  that is not bound, or whose volume is not CSI, uses its StorageClass's
  provisioner; without a StorageClass it has no driver.  A volume whose
  ``claimRef`` names another claim is an error, not a guess.
- The class the StorageProfiles name (``status.snapshotClass``) counts only when
  the source's and the target's profiles name the same one.  It is then the
  answer if its driver matches, and there is *no* answer if it does not: CDI
  does not go on to the default class in that case.
- Otherwise, among the classes of the driver, the first (by name) annotated
  ``snapshot.storage.kubernetes.io/is-default-class: "true"``, else the first by
  name.  The choice is announced with a Normal ``VolumeSnapshotClassSelected``
  event whose message says which rule picked it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

Obj = Mapping[str, Any]

DEFAULT_CLASS_ANNOTATION = "snapshot.storage.kubernetes.io/is-default-class"

VOLUME_SNAPSHOT_CLASS_SELECTED = "VolumeSnapshotClassSelected"
MESSAGE_PROFILE_CLASS_SELECTED = "VolumeSnapshotClass selected according to StorageProfile"
MESSAGE_DEFAULT_CLASS_SELECTED = "Default VolumeSnapshotClass selected"
MESSAGE_FIRST_CLASS_SELECTED = "First VolumeSnapshotClass selected"


class ClaimRefMismatch(Exception):
    """The volume a claim names is bound to another claim (CDI: an error, retried)."""

    message = "pvc does not match volume claim ref"

    def __str__(self) -> str:
        return self.message


class ClassNotFound(Exception):
    """The profiles name a VolumeSnapshotClass that does not exist (CDI: the Get fails)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name
        self.message = f'volumesnapshotclasses.snapshot.storage.k8s.io "{name}" not found'

    def __str__(self) -> str:
        return self.message


@dataclasses.dataclass(frozen=True)
class Selection:
    """A chosen VolumeSnapshotClass and the message of its ``VolumeSnapshotClassSelected`` event."""

    name: str
    message: str


def _meta(obj: Obj) -> Mapping[str, Any]:
    return obj.get("metadata") or {}


def _spec(obj: Obj) -> Mapping[str, Any]:
    return obj.get("spec") or {}


def volume_driver(claim: Obj, volume: Obj | None) -> str | None:
    """``spec.csi.driver`` of the volume bound to ``claim``, if there is one and it is CSI.

    Raises ClaimRefMismatch when the volume is bound to a different claim.
    """
    volume_name = _spec(claim).get("volumeName") or ""
    if not volume_name or volume is None or _meta(volume).get("name") != volume_name:
        return None
    claim_ref = _spec(volume).get("claimRef")
    if not claim_ref:
        return None
    meta = _meta(claim)
    if (claim_ref.get("namespace") != meta.get("namespace")
            or claim_ref.get("name") != meta.get("name")):
        raise ClaimRefMismatch()
    csi = _spec(volume).get("csi")
    if not csi:
        return None
    driver = csi.get("driver")
    return str(driver) if driver else None


def claim_driver(claim: Obj, volume: Obj | None, storage_class: Obj | None) -> str | None:
    """The CSI driver ``claim`` lives on: its volume's, else its class's provisioner."""
    driver = volume_driver(claim, volume)
    if driver is not None:
        return driver
    if storage_class is None:
        return None
    provisioner = storage_class.get("provisioner")
    return str(provisioner) if provisioner else None


def common_driver(*drivers: str | None) -> str | None:
    """The driver all of ``drivers`` share, or None if one is unknown or they differ."""
    result: str | None = None
    for driver in drivers:
        if driver is None or (result is not None and driver != result):
            return None
        result = driver
    return result


def profile_class(profile: Obj | None) -> str | None:
    """``status.snapshotClass`` of a StorageProfile (what CDI reads; the spec feeds it)."""
    if profile is None:
        return None
    name = (profile.get("status") or {}).get("snapshotClass")
    return str(name) if name else None


def common_profile_class(*profiles: Obj | None) -> str | None:
    """The class every profile names, or None if one names none or they disagree."""
    result: str | None = None
    for profile in profiles:
        name = profile_class(profile)
        if name is None or (result is not None and name != result):
            return None
        result = name
    return result


def select(driver: str, named: str | None, classes: Iterable[Obj]) -> Selection | None:
    """The VolumeSnapshotClass for a snapshot of ``driver``, or None if there is none.

    ``named`` is the class the profiles agree on; ``classes`` all VolumeSnapshotClasses.
    Raises ClassNotFound if ``named`` is not among them.
    """
    by_name = {str(_meta(c).get("name", "")): c for c in classes}
    if named is not None:
        if named not in by_name:
            raise ClassNotFound(named)
        if by_name[named].get("driver") != driver:
            return None
        return Selection(named, f"{MESSAGE_PROFILE_CLASS_SELECTED} {named}")
    candidates = sorted(n for n, c in by_name.items() if c.get("driver") == driver)
    for name in candidates:
        annotations = _meta(by_name[name]).get("annotations") or {}
        if annotations.get(DEFAULT_CLASS_ANNOTATION) == "true":
            return Selection(name, f"{MESSAGE_DEFAULT_CLASS_SELECTED} {name}")
    if candidates:
        return Selection(candidates[0], f"{MESSAGE_FIRST_CLASS_SELECTED} {candidates[0]}")
    return None
