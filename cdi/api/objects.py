"""One door between plain dicts (what the store, the REST API and YAML hold) and typed objects.

``load`` picks the model by ``kind`` and turns a malformed object into a
Kubernetes-style ``Invalid`` error naming the field; ``dump`` gives the dict
back with the manifest's own spelling, keeping every field we do not model.
The models themselves live in ``meta``, ``core``, ``datavolume`` and
``cdikinds``; the top-level kinds are re-exported here for callers that only
need ``objects.DataVolume``.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from cdi.api import errors
from cdi.api.cdikinds import (
    CDI,
    CDIConfig,
    DataImportCron,
    DataSource,
    StorageProfile,
    UploadTokenRequest,
)
from cdi.api.core import (
    Event,
    PersistentVolumeClaim,
    Pod,
    Service,
    StorageClass,
    VolumeSnapshot,
    VolumeSnapshotClass,
)
from cdi.api.datavolume import DataVolume
from cdi.api.meta import Resource

__all__ = [
    "CDI",
    "MODELS",
    "CDIConfig",
    "DataImportCron",
    "DataSource",
    "DataVolume",
    "Event",
    "PersistentVolumeClaim",
    "Pod",
    "Resource",
    "Service",
    "StorageClass",
    "StorageProfile",
    "UploadTokenRequest",
    "VolumeSnapshot",
    "VolumeSnapshotClass",
    "dump",
    "load",
    "load_as",
]

M = TypeVar("M", bound=BaseModel)

MODELS: dict[str, type[Resource]] = {
    cls.KIND: cls
    for cls in (
        DataVolume, DataSource, DataImportCron, StorageProfile, CDIConfig, CDI,
        UploadTokenRequest, PersistentVolumeClaim, StorageClass, VolumeSnapshot,
        VolumeSnapshotClass, Pod, Service, Event,
    )
}


def load(obj: dict[str, Any]) -> Resource:
    """The typed object for ``obj``, chosen by its ``kind``.

    Kinds without a model of their own (PersistentVolume, Namespace, foreign
    kinds) load as a plain ``Resource`` that still keeps every field.
    """
    if not isinstance(obj, dict):
        raise errors.BadRequest(f"an object must be a mapping, not {type(obj).__name__}")
    kind = obj.get("kind")
    if not isinstance(kind, str) or not kind:
        raise errors.BadRequest("Object 'Kind' is missing")
    return load_as(MODELS.get(kind, Resource), obj)


def load_as(model: type[M], obj: dict[str, Any]) -> M:
    """``obj`` as ``model`` whatever its ``kind`` says (templates often have none)."""
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        raise _invalid(obj, e) from e


def dump(model: BaseModel) -> dict[str, Any]:
    """The object as a manifest dict: camelCase keys, unset fields left out, unknown ones kept."""
    return model.model_dump(by_alias=True, exclude_none=True)


def _invalid(obj: dict[str, Any], e: ValidationError) -> errors.Invalid:
    kind = str(obj.get("kind") or "object")
    meta = obj.get("metadata")
    name = str(meta.get("name") or "") if isinstance(meta, dict) else ""
    causes = []
    for err in e.errors():
        field = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in err["loc"])
        field = field.replace(".[", "[")
        causes.append({"reason": "FieldValueInvalid", "message": f"{field}: {err['msg']}",
                       "field": field})
    detail = ", ".join(c["message"] for c in causes)
    return errors.Invalid(f'{kind} "{name}" is invalid: {detail}', kind=kind, name=name,
                          causes=causes)
