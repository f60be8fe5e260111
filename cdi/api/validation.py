"""Admission rules: what CDI's webhooks and CRD schemas refuse, with CDI's own messages.

``validate(obj, old)`` is the one entry point; the REST API calls it on create
(``old=None``) and update.  DataVolume and DataImportCron follow CDI's
validating webhooks (checks in CDI's order, first failure wins, message text
unchanged so scripts and tests written against CDI keep matching);
StorageProfile and CDIConfig follow the CRD schema rules Kubernetes enforces
for CDI, with Kubernetes' wording.  A rejection raises ``errors.Invalid``
whose message is the causes' messages joined by spaces, as the webhook
reports them, and whose ``causes`` name the fields.

Not here: the create-time refusal of a DataVolume whose name is taken by a PVC
the DataVolume may not adopt ("Destination PVC <ns>/<name> already exists") —
it needs the object store, so the REST API layer owns it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, NoReturn

from cdi.api import cron, errors, objects, source_rules, units
from cdi.api.cdikinds import (
    CDI,
    CDIConfig,
    DataImportCron,
    FilesystemOverhead,
    GarbageCollect,
    StorageProfile,
)
from cdi.api.core import ACCESS_MODES
from cdi.api.datavolume import (
    DATA_SOURCE_KIND,
    ContentType,
    DataVolume,
    DataVolumeSpec,
    SourceRef,
)
from cdi.api.meta import APIModel, TypedLocalObjectReference, TypedObjectReference
from cdi.api.source_rules import Cause

__all__ = ["MAX_NAME", "MAX_SHORT_NAME", "datavolume_spec_causes", "default_source_namespace",
           "validate"]

MAX_NAME = 253  # DNS-1123 subdomain
MAX_SHORT_NAME = 63  # DNS-1035 label: DataImportCron and its managed DataSource
_MAX_CLAIM_PROPERTY_SETS = 8
_MAX_ACCESS_MODES = 4
_PERCENT = re.compile(r"^(0(?:\.\d{1,3})?|1)$")
_QUANTITY_PATTERN = r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"


def validate(obj: dict[str, Any], old: dict[str, Any] | None = None) -> None:
    """Raise ``errors.Invalid`` if CDI would refuse ``obj`` (replacing ``old`` on update).

    Kinds without admission rules pass.  Like CDI's mutating webhook, a clone
    source without a namespace gets the DataVolume's (``obj`` is changed).
    """
    if obj.get("kind") == "DataVolume":
        default_source_namespace(obj)
    rule = _RULES.get(str(obj.get("kind") or ""))
    if rule is not None:
        rule(obj, old)


def default_source_namespace(obj: dict[str, Any]) -> None:
    """CDI's mutating webhook: a clone source without a namespace is in the DataVolume's."""
    source = (obj.get("spec") or {}).get("source") or {}
    for kind in ("pvc", "snapshot"):
        ref = source.get(kind)
        if isinstance(ref, dict) and ref.get("name") and not ref.get("namespace"):
            ref["namespace"] = (obj.get("metadata") or {}).get("namespace") or "default"


# --- DataVolume ------------------------------------------------------------------------------


def _validate_datavolume(obj: dict[str, Any], old: dict[str, Any] | None) -> None:
    dv = objects.load_as(DataVolume, obj)
    if old is not None:
        before = objects.load_as(DataVolume, old)
        if not _checkpoint_update(dv.spec, before.spec) and \
                _semantic(dv.spec) != _semantic(before.spec):
            _reject(dv, [Cause("Cannot update DataVolume Spec", "DataVolume.Spec",
                               "FieldValueDuplicate")])
    if len(dv.name) > MAX_NAME:
        _reject(dv, [_name_too_long(MAX_NAME)])
    causes = datavolume_spec_causes(dv.spec, "spec")
    if causes:
        _reject(dv, causes)


def datavolume_spec_causes(spec: DataVolumeSpec, field: str) -> list[Cause]:
    """Why CDI refuses a DataVolume spec (empty if it does not); ``field`` prefixes paths."""
    if spec.pvc is None and spec.storage is None:
        return [Cause("Missing Data volume PVC", f"{field}.PVC")]
    if spec.pvc is not None and spec.storage is not None:
        return [Cause("Duplicate storage definition, both target storage and target pvc defined",
                      f"{field}.PVC.Storage")]
    cause = _size_cause(spec, field)
    if cause is not None:
        return [cause]
    target = spec.pvc if spec.pvc is not None else spec.storage
    assert target is not None
    if len(target.storage_class_name or "") > MAX_NAME:
        return [_name_too_long(MAX_NAME)]
    modes = target.access_modes or []
    modes_field = f"{field}.PVC.accessModes"
    if spec.pvc is not None:
        if not modes:
            return [Cause("Required value: at least 1 access mode is required", modes_field)]
        if len(modes) > 1:
            return [Cause("PVC multiple accessModes", modes_field)]
    for mode in modes:
        if mode not in ACCESS_MODES:
            supported = ", ".join(f'"{m}"' for m in ACCESS_MODES)
            return [Cause(f'Unsupported value: "{mode}": supported values: {supported}',
                          modes_field)]

    if target.data_source is not None or target.data_source_ref is not None:
        return _external_population_causes(spec, target.data_source, target.data_source_ref,
                                           field)
    if (spec.source is None) == (spec.source_ref is None):
        return [Cause("Data volume should have either Source or SourceRef, or be externally "
                      "populated", f"{field}.source")]
    if spec.source_ref is not None:
        return _source_ref_causes(spec.source_ref, field)
    assert spec.source is not None
    variants = spec.source.variants()
    if not variants:
        return [Cause("Missing Data volume source", f"{field}.source")]
    if len(variants) > 1:
        return [Cause("Multiple Data volume sources", f"{field}.source")]
    content_type = spec.content_type or ""
    if content_type not in ("", ContentType.KUBEVIRT, ContentType.ARCHIVE):
        return [Cause(f"ContentType not one of: {ContentType.KUBEVIRT}, {ContentType.ARCHIVE}",
                      f"{field}.contentType")]
    return source_rules.causes(spec.source, content_type, field)


def _size_cause(spec: DataVolumeSpec, field: str) -> Cause | None:
    """CDI's size rules: > 0 and >= 1 MiB; omitted only with ``storage`` and a clone source."""
    target = spec.pvc if spec.pvc is not None else spec.storage
    assert target is not None
    which = "PVC" if spec.pvc is not None else "Storage"
    size_field = f"{field}.{which}.resources.requests.size"
    requested = target.requested_storage()
    is_clone = spec.source_ref is not None or (spec.source is not None and spec.source.is_clone)
    if requested is None:
        if spec.storage is None or not is_clone:
            return Cause(f"{which} size is missing", size_field)
        return None
    try:
        size = units.to_bytes(requested)
    except ValueError:
        return Cause(f'Invalid value: "{requested}": quantities must match the regular '
                     f"expression '{_QUANTITY_PATTERN}'", size_field)
    if size <= 0:
        return Cause(f"{which} size can't be equal or less than zero", size_field)
    if size < units.MiB:
        return Cause(f"{which} size should be at least 1MiB", size_field)
    return None


def _external_population_causes(
    spec: DataVolumeSpec,
    data_source: TypedLocalObjectReference | None,
    data_source_ref: TypedObjectReference | None,
    field: str,
) -> list[Cause]:
    causes = []
    if spec.source is not None or spec.source_ref is not None:
        causes.append(Cause("External population is incompatible with Source and SourceRef",
                            f"{field}.source"))
    if data_source is not None and data_source_ref is not None:
        same = (data_source.api_group, data_source.kind, data_source.name) == \
            (data_source_ref.api_group, data_source_ref.kind, data_source_ref.name)
        if not same or data_source_ref.namespace:
            causes.append(Cause("DataSourceRef and DataSource must match", ""))
    if data_source is not None:
        causes += _typed_ref_causes("DataSource", data_source, f"{field}.dataSource")
    if data_source_ref is not None:
        if data_source_ref.namespace:
            causes.append(Cause("Invalid value: DataSourceRef namespace not supported",
                                f"{field}.dataSourceRef.namespace"))
        causes += _typed_ref_causes("DataSourceRef", data_source_ref, f"{field}.dataSourceRef")
    return causes


def _typed_ref_causes(what: str, ref: TypedLocalObjectReference | TypedObjectReference,
                      field: str) -> list[Cause]:
    causes = []
    if not ref.name:
        causes.append(Cause(f"Required value: {what} name", f"{field}.name"))
    if not ref.kind:
        causes.append(Cause(f"Required value: {what} kind", f"{field}.kind"))
    if not ref.api_group and ref.kind != "PersistentVolumeClaim":
        causes.append(Cause(f"Required value: {what} apiGroup when kind is not "
                            "'PersistentVolumeClaim'", f"{field}.apiGroup"))
    return causes


def _source_ref_causes(ref: SourceRef, field: str) -> list[Cause]:
    if not ref.kind:
        return [Cause("Missing sourceRef kind", f"{field}.sourceRef.Kind")]
    if ref.kind != DATA_SOURCE_KIND:
        return [Cause(f"Unsupported sourceRef kind {ref.kind}, currently only "
                      f"{DATA_SOURCE_KIND} is supported", f"{field}.sourceRef.Kind")]
    if not ref.name:
        return [Cause("Missing sourceRef name", f"{field}.sourceRef.Name")]
    return []


def _checkpoint_update(new: DataVolumeSpec, old: DataVolumeSpec) -> bool:
    """A warm (multi-stage) import may change only its checkpoints and final flag."""
    source = new.source
    if source is None or not new.checkpoints or (source.vddk is None and source.imageio is None):
        return False
    drop = {"checkpoints": None, "final_checkpoint": None}
    return bool(_semantic(new.model_copy(update=drop)) == _semantic(old.model_copy(update=drop)))


# --- DataImportCron --------------------------------------------------------------------------


def _validate_dataimportcron(obj: dict[str, Any], old: dict[str, Any] | None) -> None:
    dic = objects.load_as(DataImportCron, obj)
    if len(dic.name) > MAX_SHORT_NAME:
        _reject(dic, [_name_too_long(MAX_SHORT_NAME)])
    if old is not None:
        before = objects.load_as(DataImportCron, old)
        if _semantic(dic.spec) != _semantic(before.spec):
            _reject(dic, [Cause("Cannot update DataImportCron Spec", "DataImportCron.Spec",
                                "FieldValueDuplicate")])
        return
    spec = dic.spec
    template = spec.template.spec
    source = template.source
    # http: polled by its validator (ETag/Last-Modified), beyond CDI (docs/dataimportcron.md).
    if source is None or (source.registry is None and source.pvc is None
                          and source.http is None):
        _reject(dic, [Cause("Missing source", "spec.Template")])
    if template.source_ref is not None or template.content_type or template.checkpoints or \
            template.final_checkpoint:
        _reject(dic, [Cause("Unsettable fields: SourceRef, ContentType, Checkpoints, "
                            "FinalCheckpoint", "spec.Template")])
    causes = datavolume_spec_causes(template, "Template")
    if causes:
        _reject(dic, causes)
    if spec.schedule is None:
        _reject(dic, [_required("spec.schedule")])
    if spec.schedule:
        try:
            cron.parse(spec.schedule)
        except cron.CronError:
            _reject(dic, [Cause("Illegal cron schedule", "spec.Schedule")])
    if spec.imports_to_keep is not None and spec.imports_to_keep < 0:
        _reject(dic, [Cause("Illegal ImportsToKeep value", "spec.ImportsToKeep")])
    if spec.garbage_collect is not None and spec.garbage_collect not in tuple(GarbageCollect):
        _reject(dic, [Cause("Illegal GarbageCollect value", "spec.GarbageCollect")])
    if not spec.managed_data_source:
        _reject(dic, [Cause("Illegal ManagedDataSource value", "spec.ManagedDataSource")])
    if len(spec.managed_data_source) > MAX_SHORT_NAME:
        _reject(dic, [_name_too_long(MAX_SHORT_NAME)])


# --- StorageProfile, CDIConfig, CDI (CRD schema rules, Kubernetes' wording) ------------------


def _validate_storageprofile(obj: dict[str, Any], old: dict[str, Any] | None) -> None:
    profile = objects.load_as(StorageProfile, obj)
    sets = profile.spec.claim_property_sets
    if sets is None:
        return
    causes = []
    if len(sets) > _MAX_CLAIM_PROPERTY_SETS:
        causes.append(_too_many("spec.claimPropertySets", len(sets), _MAX_CLAIM_PROPERTY_SETS))
    for i, cps in enumerate(sets):
        field = f"spec.claimPropertySets[{i}]"
        if cps.access_modes is None:
            causes.append(_required(f"{field}.accessModes"))
        elif len(cps.access_modes) > _MAX_ACCESS_MODES:
            causes.append(_too_many(f"{field}.accessModes", len(cps.access_modes),
                                    _MAX_ACCESS_MODES))
        elif any(mode not in ACCESS_MODES for mode in cps.access_modes):
            causes.append(Cause(f'{field}.accessModes: Invalid value: "array": Illegal AccessMode',
                                f"{field}.accessModes"))
        if cps.volume_mode is None:
            causes.append(_required(f"{field}.volumeMode"))
        elif cps.volume_mode not in ("Block", "Filesystem"):
            causes.append(Cause(f'{field}.volumeMode: Unsupported value: "{cps.volume_mode}": '
                                'supported values: "Block", "Filesystem"',
                                f"{field}.volumeMode", "FieldValueNotSupported"))
    if causes:
        _reject(profile, causes)


def _validate_cdiconfig(obj: dict[str, Any], old: dict[str, Any] | None) -> None:
    config = objects.load_as(CDIConfig, obj)
    causes = _overhead_causes(config.spec.filesystem_overhead, "spec.filesystemOverhead")
    if causes:
        _reject(config, causes)


def _validate_cdi(obj: dict[str, Any], old: dict[str, Any] | None) -> None:
    cdi = objects.load_as(CDI, obj)
    if cdi.spec.config is not None:
        causes = _overhead_causes(cdi.spec.config.filesystem_overhead,
                                  "spec.config.filesystemOverhead")
        if causes:
            _reject(cdi, causes)


def _overhead_causes(overhead: FilesystemOverhead | None, field: str) -> list[Cause]:
    if overhead is None:
        return []
    values = [(f"{field}.global", overhead.global_)]
    values += [(f"{field}.storageClass.{sc}", v)
               for sc, v in sorted((overhead.storage_class or {}).items())]
    return [Cause(f'{path}: Invalid value: "{value}": {path} in body should match '
                  f"'{_PERCENT.pattern}'", path)
            for path, value in values if value is not None and not _PERCENT.match(value)]


# --- Helpers ---------------------------------------------------------------------------------


def _reject(obj: objects.Resource, causes: list[Cause]) -> NoReturn:
    raise errors.Invalid(
        " ".join(c.message for c in causes),
        kind=obj.KIND, name=obj.name,
        causes=[{"reason": c.reason, "message": c.message, "field": c.field} for c in causes],
    )


def _name_too_long(limit: int) -> Cause:
    return Cause(f"Name cannot be longer than {limit} characters", "")


def _required(field: str) -> Cause:
    return Cause(f"{field}: Required value", field, "FieldValueRequired")


def _too_many(field: str, count: int, limit: int) -> Cause:
    return Cause(f"{field}: Too many: {count}: must have at most {limit} items", field,
                 "FieldValueTooMany")


def _semantic(model: APIModel) -> Any:
    """A spec as Kubernetes compares specs: unset, empty text, empty lists and a false
    ``finalCheckpoint`` count as absent; quantities compare by value ("1Gi" == "1024Mi")."""
    return _normalize(objects.dump(model), "")


def _normalize(value: Any, key: str) -> Any:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if key in ("requests", "limits"):
                try:
                    v = units.to_bytes(v)
                except (ValueError, TypeError, AttributeError):
                    pass
            v = _normalize(v, k)
            if v is None or v == "" or v == [] or (k == "finalCheckpoint" and v is False):
                continue
            out[k] = v
        return out
    if isinstance(value, list):
        return [_normalize(v, key) for v in value]
    return value


_Rule = Callable[[dict[str, Any], "dict[str, Any] | None"], None]
_RULES: dict[str, _Rule] = {
    "DataVolume": _validate_datavolume,
    "DataImportCron": _validate_dataimportcron,
    "StorageProfile": _validate_storageprofile,
    "CDIConfig": _validate_cdiconfig,
    "CDI": _validate_cdi,
}
