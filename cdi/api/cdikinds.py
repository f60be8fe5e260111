"""The CDI kinds around DataVolume: golden-image sources, storage knowledge, configuration, tokens.

DataSource and DataImportCron keep golden images fresh (reference 1.2, 1.3);
StorageProfile says how to ask a storage class for a claim (1.4); CDIConfig and
the CDI resource carry cluster-wide settings (1.5); UploadTokenRequest hands
out upload tokens (1.6).  A few JSON names are not plain camelCase
(``DataVolumeName``, ``HTTPProxy``, ``uploadProxyURL``); they carry explicit
aliases.
"""

from __future__ import annotations

import enum
from typing import Any

from pydantic import Field

from cdi.api.datavolume import DataVolume, NamespacedName
from cdi.api.meta import (
    APIModel,
    Condition,
    LocalObjectReference,
    Resource,
    ResourceRequirements,
    Timestamp,
)

# Profile annotation: smaller claims are raised to this size.
ANN_MINIMUM_SUPPORTED_PVC_SIZE = "cdi.kubevirt.io/minimumSupportedPvcSize"


class CloneStrategy(enum.StrEnum):
    COPY = "copy"
    SNAPSHOT = "snapshot"
    CSI_CLONE = "csi-clone"


class GarbageCollect(enum.StrEnum):
    OUTDATED = "Outdated"
    NEVER = "Never"


# --- DataSource ------------------------------------------------------------------------------


class DataSourceSource(APIModel):
    pvc: NamespacedName | None = None
    snapshot: NamespacedName | None = None
    data_source: NamespacedName | None = None


class DataSourceSpec(APIModel):
    source: DataSourceSource = Field(default_factory=DataSourceSource)


class DataSourceStatus(APIModel):
    source: DataSourceSource | None = None
    conditions: list[Condition] = Field(default_factory=list)


class DataSource(Resource):
    KIND = "DataSource"
    spec: DataSourceSpec = Field(default_factory=DataSourceSpec)
    status: DataSourceStatus = Field(default_factory=DataSourceStatus)


# --- DataImportCron --------------------------------------------------------------------------


class DataImportCronSpec(APIModel):
    template: DataVolume = Field(default_factory=DataVolume)
    schedule: str | None = None  # 5-field cron; "" never polls
    garbage_collect: str | None = None  # Outdated (default) | Never
    imports_to_keep: int | None = None  # default 3
    managed_data_source: str | None = None
    retention_policy: str | None = None  # All (default) | None
    service_account_name: str | None = None


class ImportStatus(APIModel):
    data_volume_name: str | None = Field(default=None, alias="DataVolumeName")
    digest: str | None = Field(default=None, alias="Digest")


class DataImportCronStatus(APIModel):
    current_imports: list[ImportStatus] | None = None
    last_imported_pvc: NamespacedName | None = Field(default=None, alias="lastImportedPVC")
    last_execution_timestamp: Timestamp | None = None
    last_import_timestamp: Timestamp | None = None
    source_format: str | None = None  # pvc | snapshot
    conditions: list[Condition] = Field(default_factory=list)


class DataImportCron(Resource):
    KIND = "DataImportCron"
    spec: DataImportCronSpec = Field(default_factory=DataImportCronSpec)
    status: DataImportCronStatus = Field(default_factory=DataImportCronStatus)


# --- StorageProfile --------------------------------------------------------------------------


class ClaimPropertySet(APIModel):
    access_modes: list[str] | None = None
    volume_mode: str | None = None


class StorageProfileSpec(APIModel):
    clone_strategy: str | None = None
    claim_property_sets: list[ClaimPropertySet] | None = None
    data_import_cron_source_format: str | None = None
    snapshot_class: str | None = None


class StorageProfileStatus(StorageProfileSpec):
    storage_class: str | None = None
    provisioner: str | None = None
    conditions: list[Condition] = Field(default_factory=list)


class StorageProfile(Resource):
    KIND = "StorageProfile"
    spec: StorageProfileSpec = Field(default_factory=StorageProfileSpec)
    status: StorageProfileStatus = Field(default_factory=StorageProfileStatus)


# --- CDIConfig and the CDI resource ----------------------------------------------------------


class FilesystemOverhead(APIModel):
    """Fractions of a filesystem volume lost to the filesystem, as decimal text ("0.06")."""

    global_: str | None = Field(default=None, alias="global")
    storage_class: dict[str, str] | None = None


class ImportProxy(APIModel):
    http_proxy: str | None = Field(default=None, alias="HTTPProxy")
    https_proxy: str | None = Field(default=None, alias="HTTPSProxy")
    no_proxy: str | None = None
    trusted_ca_proxy: str | None = Field(default=None, alias="trustedCAProxy")


class CDIConfigSpec(APIModel):
    upload_proxy_url_override: str | None = Field(default=None, alias="uploadProxyURLOverride")
    import_proxy: ImportProxy | None = None
    scratch_space_storage_class: str | None = None
    pod_resource_requirements: ResourceRequirements | None = None
    feature_gates: list[str] | None = None
    webhook_pvc_rendering: str | None = None  # Enabled | Disabled
    filesystem_overhead: FilesystemOverhead | None = None
    preallocation: bool | None = None
    insecure_registries: list[str] | None = None
    data_volume_ttl_seconds: int | None = Field(default=None, alias="dataVolumeTTLSeconds")
    tls_security_profile: dict[str, Any] | None = None
    image_pull_secrets: list[LocalObjectReference] | None = None
    log_verbosity: int | None = None


class CDIConfigStatus(APIModel):
    upload_proxy_url: str | None = Field(default=None, alias="uploadProxyURL")
    upload_proxy_ca: str | None = Field(default=None, alias="uploadProxyCA")
    import_proxy: ImportProxy | None = None
    scratch_space_storage_class: str | None = None
    default_pod_resource_requirements: ResourceRequirements | None = None
    filesystem_overhead: FilesystemOverhead | None = None
    preallocation: bool | None = None
    image_pull_secrets: list[LocalObjectReference] | None = None


class CDIConfig(Resource):
    KIND = "CDIConfig"
    spec: CDIConfigSpec = Field(default_factory=CDIConfigSpec)
    status: CDIConfigStatus = Field(default_factory=CDIConfigStatus)


class CDISpec(APIModel):
    clone_strategy_override: str | None = None
    config: CDIConfigSpec | None = None
    uninstall_strategy: str | None = None
    workload: dict[str, Any] | None = None
    cert_config: dict[str, Any] | None = None


class CDI(Resource):
    """The operator's resource; its ``spec.config`` may own CDIConfig's spec."""

    KIND = "CDI"
    spec: CDISpec = Field(default_factory=CDISpec)
    status: dict[str, Any] | None = None


# --- UploadTokenRequest ----------------------------------------------------------------------


class UploadTokenRequestSpec(APIModel):
    pvc_name: str | None = None


class UploadTokenRequestStatus(APIModel):
    token: str | None = None


class UploadTokenRequest(Resource):
    KIND = "UploadTokenRequest"
    spec: UploadTokenRequestSpec = Field(default_factory=UploadTokenRequestSpec)
    status: UploadTokenRequestStatus = Field(default_factory=UploadTokenRequestStatus)
