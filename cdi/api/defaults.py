"""How a DataVolume's target becomes a PVC spec: CDI's defaulting of ``spec.storage``.

``spec.pvc`` is a claim spec the user wrote in full, and CDI uses it verbatim.
``spec.storage`` is a wish CDI completes: the storage class (named, or the
cluster default the caller resolved), access and volume modes from the class's
StorageProfile, and a size inflated for filesystem overhead (reference 3.7)
then raised to the profile's minimum.  The DataVolume controller calls
``render_pvc_spec`` with the objects it looked up, so this module stays pure
and the controller tests can check the numbers without a cluster.
"""

from __future__ import annotations

import re
from typing import Any

from cdi.api import errors, objects, units
from cdi.api.cdikinds import ANN_MINIMUM_SUPPORTED_PVC_SIZE, ClaimPropertySet, StorageProfile
from cdi.api.core import BLOCK, FILESYSTEM, PersistentVolumeClaimSpec, StorageClass
from cdi.api.datavolume import FROM_STORAGE_PROFILE, ContentType, DataVolume
from cdi.api.meta import ResourceRequirements
from importer import space

__all__ = ["DEFAULT_FILESYSTEM_OVERHEAD", "filesystem_overhead", "render_pvc_spec"]

DEFAULT_FILESYSTEM_OVERHEAD = 0.06
_PERCENT = re.compile(r"^(0(?:\.\d{1,3})?|1)$")


def filesystem_overhead(cdiconfig_status: dict[str, Any], storage_class: str | None) -> float:
    """The fraction of a Filesystem volume of ``storage_class`` lost to the filesystem.

    The class's entry in CDIConfig ``status.filesystemOverhead.storageClass``, else
    the global value, else 0.06.  The empty class name means "no class" and gets 0.
    Block volumes have no overhead; their callers pass 0 without asking.
    """
    if storage_class == "":
        return 0.0
    overhead = cdiconfig_status.get("filesystemOverhead") or {}
    per_class = overhead.get("storageClass") or {}
    for value in (per_class.get(storage_class) if storage_class else None, overhead.get("global")):
        if value is not None and value != "":
            if not isinstance(value, str) or not _PERCENT.match(value):
                raise ValueError(f"filesystem overhead {value!r} is not a fraction like '0.055'")
            return float(value)
    return DEFAULT_FILESYSTEM_OVERHEAD


def render_pvc_spec(
    dv: dict[str, Any],
    *,
    storage_class: dict[str, Any] | None,
    profile: dict[str, Any] | None,
    overhead: float,
) -> dict[str, Any]:
    """The PVC spec CDI would create for ``dv``.

    ``storage_class`` is the class the claim goes to (the one named in
    ``spec.storage``, or the cluster default when none is named; None when
    there is neither), ``profile`` its StorageProfile (None if missing) and
    ``overhead`` that class's filesystem overhead (see ``filesystem_overhead``).
    Raises ``errors.Invalid`` with CDI's message when the spec cannot be completed.
    """
    volume = objects.load_as(DataVolume, dv)
    spec = volume.spec
    if spec.pvc is not None:
        return objects.dump(spec.pvc)
    if spec.storage is None:
        raise _invalid(volume, "datavolume one of {pvc, storage} field is required")

    pvc = objects.load_as(PersistentVolumeClaimSpec, objects.dump(spec.storage))
    if pvc.volume_mode in (FROM_STORAGE_PROFILE, ""):
        pvc.volume_mode = None
    if spec.content_type == ContentType.ARCHIVE:
        if pvc.volume_mode == BLOCK:
            raise _invalid(volume, "ContentType Archive cannot have block volumeMode")
        pvc.volume_mode = FILESYSTEM
    sp = objects.load_as(StorageProfile, profile) if profile is not None else None
    if storage_class is None:
        if not pvc.access_modes:
            raise _invalid(volume, "PVC spec is missing accessMode and no storageClass to "
                                   "choose profile")
    else:
        pvc.storage_class_name = objects.load_as(StorageClass, storage_class).name
        _complete_modes(volume, pvc, sp)

    is_clone = spec.source_ref is not None or (spec.source is not None and spec.source.is_clone)
    _render_size(volume, pvc, sp, overhead, is_clone=is_clone)
    return objects.dump(pvc)


def _complete_modes(volume: DataVolume, pvc: PersistentVolumeClaimSpec,
                    profile: StorageProfile | None) -> None:
    """Fill access and volume modes from the profile's claim property sets, as CDI does."""
    class_name = pvc.storage_class_name or ""
    if pvc.access_modes and pvc.volume_mode:
        return
    sets: list[ClaimPropertySet] = []
    if profile is not None:
        sets = profile.status.claim_property_sets or []
    if not pvc.access_modes and pvc.volume_mode is None:
        if profile is None:
            raise _invalid(volume, f"no accessMode specified and cannot get StorageProfile "
                                   f"{class_name}")
        if not sets or not sets[0].access_modes:
            raise _invalid(volume, f"no accessMode specified in StorageProfile {profile.name}")
        pvc.access_modes = list(sets[0].access_modes)
        pvc.volume_mode = sets[0].volume_mode
    elif not pvc.access_modes:
        if profile is None:
            raise _invalid(volume, f"no accessMode specified and cannot get StorageProfile "
                                   f"{class_name}")
        for cps in sets:
            if cps.volume_mode == pvc.volume_mode and cps.access_modes:
                pvc.access_modes = list(cps.access_modes)
                return
        raise _invalid(volume, f"no matching accessMode specified in StorageProfile "
                               f"{profile.name}")
    else:
        wanted = set(pvc.access_modes)
        for cps in sets:
            if wanted & set(cps.access_modes or []):
                pvc.volume_mode = cps.volume_mode
                return
        # No match: leave volumeMode unset, Kubernetes defaults it to Filesystem.


def _render_size(volume: DataVolume, pvc: PersistentVolumeClaimSpec,
                 profile: StorageProfile | None, overhead: float, *, is_clone: bool) -> None:
    requested = pvc.requested_storage()
    if requested is None:
        if not is_clone:
            raise _invalid(volume, "PVC Spec is not valid - missing storage size")
        return  # the clone controller sizes the claim from its source
    try:
        size = units.to_bytes(requested)
    except ValueError as e:
        raise _invalid(volume, f"PVC Spec is not valid - {e}") from e
    if size < units.MiB:
        raise _invalid(volume, "PVC Spec is not valid - storage size should be at least 1MiB")

    rendered: str | int | float = requested
    if (pvc.volume_mode or FILESYSTEM) == FILESYSTEM:
        inflated = space.required(overhead, size)
        if inflated != size:
            size, rendered = inflated, units.format_quantity(inflated)
    minimum = _minimum_size(profile)
    if minimum is not None and size < minimum[0]:
        rendered = minimum[1]

    resources = pvc.resources or ResourceRequirements()
    resources.requests = {**(resources.requests or {}), "storage": rendered}
    pvc.resources = resources


def _minimum_size(profile: StorageProfile | None) -> tuple[int, str] | None:
    """The profile's minimum claim size in bytes and as written; None if absent or unreadable."""
    if profile is None:
        return None
    text = profile.metadata.annotations.get(ANN_MINIMUM_SUPPORTED_PVC_SIZE)
    if not text:
        return None
    try:
        return units.to_bytes(text), text
    except ValueError:
        return None  # CDI ignores a malformed annotation too


def _invalid(volume: DataVolume, message: str) -> errors.Invalid:
    return errors.Invalid(message, kind=DataVolume.KIND, name=volume.name)
