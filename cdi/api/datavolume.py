"""DataVolume, the object users write: where the data comes from and what volume to fill.

Field names, JSON spellings and the phase list follow ``cdi.kubevirt.io/v1beta1``
(reference section 1.1).  The source variants are typed because validation and
the controllers branch on them; the claim parts reuse the core PVC types.
"""

from __future__ import annotations

import enum

from pydantic import Field

from cdi.api.core import PersistentVolumeClaimSpec
from cdi.api.meta import (
    APIModel,
    Condition,
    Resource,
)


class DataVolumePhase(enum.StrEnum):
    """CDI's DataVolume phases; ``status.phase`` holds one of these (as plain text)."""

    UNSET = ""
    PENDING = "Pending"
    PVC_BOUND = "PVCBound"
    IMPORT_SCHEDULED = "ImportScheduled"
    IMPORT_IN_PROGRESS = "ImportInProgress"
    CLONE_SCHEDULED = "CloneScheduled"
    CLONE_IN_PROGRESS = "CloneInProgress"
    SNAPSHOT_FOR_SMART_CLONE_IN_PROGRESS = "SnapshotForSmartCloneInProgress"
    CLONE_FROM_SNAPSHOT_SOURCE_IN_PROGRESS = "CloneFromSnapshotSourceInProgress"
    SMART_CLONE_PVC_IN_PROGRESS = "SmartClonePVCInProgress"
    CSI_CLONE_IN_PROGRESS = "CSICloneInProgress"
    EXPANSION_IN_PROGRESS = "ExpansionInProgress"
    NAMESPACE_TRANSFER_IN_PROGRESS = "NamespaceTransferInProgress"
    UPLOAD_SCHEDULED = "UploadScheduled"
    UPLOAD_READY = "UploadReady"
    WAIT_FOR_FIRST_CONSUMER = "WaitForFirstConsumer"
    PENDING_POPULATION = "PendingPopulation"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    UNKNOWN = "Unknown"
    PAUSED = "Paused"
    PREP_CLAIM_IN_PROGRESS = "PrepClaimInProgress"
    REBIND_IN_PROGRESS = "RebindInProgress"


class ContentType(enum.StrEnum):
    KUBEVIRT = "kubevirt"
    ARCHIVE = "archive"


class ConditionType(enum.StrEnum):
    READY = "Ready"
    BOUND = "Bound"
    RUNNING = "Running"


# The volume mode that asks CDI to take the mode from the StorageProfile.
FROM_STORAGE_PROFILE = "FromStorageProfile"
DATA_SOURCE_KIND = "DataSource"
PULL_POD = "pod"
PULL_NODE = "node"


# --- Sources ---------------------------------------------------------------------------------


class HTTPSource(APIModel):
    url: str | None = None
    secret_ref: str | None = None
    cert_config_map: str | None = None
    extra_headers: list[str] | None = None
    secret_extra_headers: list[str] | None = None
    checksum: str | None = None
    insecure_skip_verify: bool | None = None


class S3Source(APIModel):
    url: str | None = None
    secret_ref: str | None = None
    cert_config_map: str | None = None


class GCSSource(APIModel):
    url: str | None = None
    secret_ref: str | None = None


class PlatformOptions(APIModel):
    architecture: str | None = None


class RegistrySource(APIModel):
    url: str | None = None
    image_stream: str | None = None
    pull_method: str | None = None  # pod (default) | node
    secret_ref: str | None = None
    cert_config_map: str | None = None
    platform: PlatformOptions | None = None


class NamespacedName(APIModel):
    """A ``{namespace, name}`` reference: clone sources (pvc, snapshot) and DataSource chains."""

    namespace: str | None = None
    name: str | None = None


class UploadSource(APIModel):
    pass


class BlankSource(APIModel):
    pass


class ImageIOSource(APIModel):
    url: str | None = None
    disk_id: str | None = None
    secret_ref: str | None = None
    cert_config_map: str | None = None
    insecure_skip_verify: bool | None = None


class VDDKSource(APIModel):
    url: str | None = None
    uuid: str | None = None
    backing_file: str | None = None
    thumbprint: str | None = None
    secret_ref: str | None = None
    cert_config_map: str | None = None
    init_image_url: str | None = Field(default=None, alias="initImageURL")
    extra_args: str | None = None


class DataVolumeSource(APIModel):
    http: HTTPSource | None = None
    s3: S3Source | None = None
    gcs: GCSSource | None = None
    registry: RegistrySource | None = None
    pvc: NamespacedName | None = None
    upload: UploadSource | None = None
    blank: BlankSource | None = None
    imageio: ImageIOSource | None = None
    vddk: VDDKSource | None = None
    snapshot: NamespacedName | None = None

    def variants(self) -> list[str]:
        """The JSON names of the variants that are set (CDI accepts exactly one)."""
        return [
            field.alias or name
            for name, field in type(self).model_fields.items()
            if getattr(self, name) is not None
        ]

    @property
    def is_clone(self) -> bool:
        return self.pvc is not None or self.snapshot is not None


class SourceRef(APIModel):
    kind: str | None = None
    name: str | None = None
    namespace: str | None = None  # defaults to the DataVolume's namespace


# --- Target ----------------------------------------------------------------------------------


class StorageSpec(PersistentVolumeClaimSpec):
    """``spec.storage``: a claim spec CDI completes from the StorageProfile (same fields)."""


class Checkpoint(APIModel):
    previous: str | None = None
    current: str | None = None


class DataVolumeSpec(APIModel):
    source: DataVolumeSource | None = None
    source_ref: SourceRef | None = None
    pvc: PersistentVolumeClaimSpec | None = None
    storage: StorageSpec | None = None
    priority_class_name: str | None = None
    service_account_name: str | None = None
    content_type: str | None = None  # "" | kubevirt | archive
    checkpoints: list[Checkpoint] | None = None
    final_checkpoint: bool | None = None
    preallocation: bool | None = None

    @property
    def target(self) -> PersistentVolumeClaimSpec | StorageSpec | None:
        """Whichever of ``pvc`` and ``storage`` is set (``pvc`` first)."""
        return self.pvc if self.pvc is not None else self.storage


class DataVolumeStatus(APIModel):
    claim_name: str | None = None
    phase: str | None = None  # a DataVolumePhase value
    progress: str | None = None  # "N/A" | "45.20%"
    restart_count: int | None = None
    conditions: list[Condition] = Field(default_factory=list)


class DataVolume(Resource):
    KIND = "DataVolume"
    spec: DataVolumeSpec = Field(default_factory=DataVolumeSpec)
    status: DataVolumeStatus = Field(default_factory=DataVolumeStatus)
