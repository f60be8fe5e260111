"""The building blocks every API object shares: the base model, ObjectMeta, conditions, references.

Manifests written for KubeVirt CDI must survive a trip through our types
unchanged, so the base model keeps every field it does not know
(``extra="allow"``), speaks camelCase on the wire and never invents fields:
optional fields default to ``None``, and the few containers that default to an
empty value (``metadata``, ``spec``, ``status``, ``labels``, ...) read ``null``
as absent and are left out of a dump when nobody set or filled them.  The
controllers get non-optional ``obj.metadata.annotations`` without a manifest
growing ``metadata: {}``.
"""

from __future__ import annotations

import datetime
from typing import Any, ClassVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)
from pydantic.alias_generators import to_camel

# A Kubernetes resource quantity as written in a manifest ("10Gi", 1073741824, 0.5).
# Kept as written so a round trip gives back the same text; convert with
# cdi.api.units.to_bytes.
Quantity = str | int | float
ResourceList = dict[str, Quantity]
# RFC 3339 text, or a datetime when YAML parsed an unquoted timestamp.
Timestamp = str | datetime.datetime


class APIModel(BaseModel):
    """Base of every API type: camelCase aliases, unknown fields kept, assignments validated."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        serialize_by_alias=True,
        extra="allow",
        validate_assignment=True,
    )

    @model_validator(mode="before")
    @classmethod
    def _null_means_absent(cls, data: Any) -> Any:
        # JSON null for a container (``metadata: null``) means "not given", as in Go.
        if isinstance(data, dict) and None in data.values():
            containers = {key for name, field in cls.model_fields.items()
                          if field.default_factory is not None
                          for key in (name, field.alias) if key}
            data = {k: v for k, v in data.items() if v is not None or k not in containers}
        return data

    @model_serializer(mode="wrap")
    def _leave_out_untouched_defaults(
        self, handler: SerializerFunctionWrapHandler, info: SerializationInfo
    ) -> Any:
        data = handler(self)
        if not isinstance(data, dict):  # pragma: no cover - models always dump to dicts
            return data
        for name, field in type(self).model_fields.items():
            if field.default_factory is None or name in self.model_fields_set:
                continue
            key = field.alias if info.by_alias is not False and field.alias else name
            if key in data and data[key] in ({}, []):
                del data[key]
        return data


class OwnerReference(APIModel):
    api_version: str | None = None
    kind: str | None = None
    name: str | None = None
    uid: str | None = None
    controller: bool | None = None
    block_owner_deletion: bool | None = None


class ObjectMeta(APIModel):
    name: str | None = None
    generate_name: str | None = None
    namespace: str | None = None
    uid: str | None = None
    resource_version: str | None = None
    generation: int | None = None
    creation_timestamp: Timestamp | None = None
    deletion_timestamp: Timestamp | None = None
    deletion_grace_period_seconds: int | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    owner_references: list[OwnerReference] = Field(default_factory=list)
    finalizers: list[str] = Field(default_factory=list)


class Condition(APIModel):
    """A status condition (DataVolume, DataSource, DataImportCron, StorageProfile, PVC, Pod)."""

    type: str
    status: str  # "True" | "False" | "Unknown"
    last_transition_time: Timestamp | None = None
    last_heartbeat_time: Timestamp | None = None
    reason: str | None = None
    message: str | None = None


class LocalObjectReference(APIModel):
    name: str | None = None


class TypedLocalObjectReference(APIModel):
    api_group: str | None = None
    kind: str | None = None
    name: str | None = None


class TypedObjectReference(APIModel):
    api_group: str | None = None
    kind: str | None = None
    name: str | None = None
    namespace: str | None = None


class ObjectReference(APIModel):
    """core/v1 ObjectReference, as in ``Event.involvedObject``."""

    api_version: str | None = None
    kind: str | None = None
    namespace: str | None = None
    name: str | None = None
    uid: str | None = None
    resource_version: str | None = None
    field_path: str | None = None


class LabelSelector(APIModel):
    match_labels: dict[str, str] | None = None
    match_expressions: list[dict[str, Any]] | None = None


class ResourceRequirements(APIModel):
    requests: ResourceList | None = None
    limits: ResourceList | None = None


class Resource(APIModel):
    """Fields every top-level object has; subclasses name their kind in ``KIND``."""

    KIND: ClassVar[str] = ""

    api_version: str | None = None
    kind: str | None = None
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)

    @property
    def name(self) -> str:
        return self.metadata.name or ""

    @property
    def namespace(self) -> str:
        return self.metadata.namespace or ""
