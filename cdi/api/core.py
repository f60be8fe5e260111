"""The Kubernetes kinds CDI's controllers read and write, typed as far as the controllers look.

CDI creates claims, worker pods and their services, snapshots for smart clones
and events; it reads storage classes and snapshot classes to choose how.  Only
the fields those decisions use are typed here; everything else a real cluster
puts into these objects rides along untouched (``extra="allow"``), so an object
read from a cluster and written back loses nothing.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from cdi.api.meta import (
    APIModel,
    Condition,
    LabelSelector,
    LocalObjectReference,
    ObjectReference,
    Quantity,
    Resource,
    ResourceList,
    ResourceRequirements,
    Timestamp,
    TypedLocalObjectReference,
    TypedObjectReference,
)

# PersistentVolumeAccessMode values, in the order Kubernetes lists them in its messages.
ACCESS_MODES = ("ReadOnlyMany", "ReadWriteMany", "ReadWriteOnce", "ReadWriteOncePod")
FILESYSTEM = "Filesystem"
BLOCK = "Block"


# --- PersistentVolumeClaim -------------------------------------------------------------------


class PersistentVolumeClaimSpec(APIModel):
    access_modes: list[str] | None = None
    selector: LabelSelector | None = None
    resources: ResourceRequirements | None = None
    volume_name: str | None = None
    storage_class_name: str | None = None
    volume_mode: str | None = None
    data_source: TypedLocalObjectReference | None = None
    data_source_ref: TypedObjectReference | None = None

    def requested_storage(self) -> Quantity | None:
        """``resources.requests.storage`` as written, or None."""
        if self.resources is None or self.resources.requests is None:
            return None
        return self.resources.requests.get("storage")


class PersistentVolumeClaimStatus(APIModel):
    phase: str | None = None  # Pending | Bound | Lost
    access_modes: list[str] | None = None
    capacity: ResourceList | None = None
    conditions: list[Condition] | None = None


class PersistentVolumeClaim(Resource):
    KIND = "PersistentVolumeClaim"
    spec: PersistentVolumeClaimSpec = Field(default_factory=PersistentVolumeClaimSpec)
    status: PersistentVolumeClaimStatus = Field(default_factory=PersistentVolumeClaimStatus)


# --- Storage and snapshot classes, snapshots -------------------------------------------------


class StorageClass(Resource):
    KIND = "StorageClass"
    provisioner: str | None = None
    parameters: dict[str, str] | None = None
    reclaim_policy: str | None = None
    volume_binding_mode: str | None = None  # Immediate | WaitForFirstConsumer
    allow_volume_expansion: bool | None = None
    mount_options: list[str] | None = None


class VolumeSnapshotClass(Resource):
    KIND = "VolumeSnapshotClass"
    driver: str | None = None
    deletion_policy: str | None = None  # Delete | Retain
    parameters: dict[str, str] | None = None


class VolumeSnapshotSource(APIModel):
    persistent_volume_claim_name: str | None = None
    volume_snapshot_content_name: str | None = None


class VolumeSnapshotSpec(APIModel):
    source: VolumeSnapshotSource | None = None
    volume_snapshot_class_name: str | None = None


class VolumeSnapshotError(APIModel):
    message: str | None = None
    time: Timestamp | None = None


class VolumeSnapshotStatus(APIModel):
    bound_volume_snapshot_content_name: str | None = None
    creation_time: Timestamp | None = None
    ready_to_use: bool | None = None
    restore_size: Quantity | None = None
    error: VolumeSnapshotError | None = None


class VolumeSnapshot(Resource):
    KIND = "VolumeSnapshot"
    spec: VolumeSnapshotSpec = Field(default_factory=VolumeSnapshotSpec)
    status: VolumeSnapshotStatus = Field(default_factory=VolumeSnapshotStatus)


# --- Pod ---------------------------------------------------------------------------------------


class EnvVar(APIModel):
    name: str
    value: str | None = None
    value_from: dict[str, Any] | None = None


class VolumeMount(APIModel):
    name: str
    mount_path: str
    read_only: bool | None = None
    sub_path: str | None = None


class VolumeDevice(APIModel):
    name: str
    device_path: str


class ContainerPort(APIModel):
    container_port: int
    name: str | None = None
    protocol: str | None = None


class Container(APIModel):
    name: str
    image: str | None = None
    image_pull_policy: str | None = None
    command: list[str] | None = None
    args: list[str] | None = None
    env: list[EnvVar] | None = None
    ports: list[ContainerPort] | None = None
    volume_mounts: list[VolumeMount] | None = None
    volume_devices: list[VolumeDevice] | None = None
    resources: ResourceRequirements | None = None
    termination_message_path: str | None = None


class PersistentVolumeClaimVolumeSource(APIModel):
    claim_name: str
    read_only: bool | None = None


class Volume(APIModel):
    """A pod volume; only the claim variant is typed, the others are kept as written."""

    name: str
    persistent_volume_claim: PersistentVolumeClaimVolumeSource | None = None


class PodSpec(APIModel):
    containers: list[Container] = Field(default_factory=list)
    init_containers: list[Container] | None = None
    volumes: list[Volume] | None = None
    restart_policy: str | None = None
    node_name: str | None = None
    node_selector: dict[str, str] | None = None
    service_account_name: str | None = None
    priority_class_name: str | None = None
    image_pull_secrets: list[LocalObjectReference] | None = None


class ContainerStatus(APIModel):
    name: str
    ready: bool | None = None
    restart_count: int | None = None
    # {"waiting": {...}} | {"running": {...}} | {"terminated": {"exitCode", "reason", "message"}}
    state: dict[str, Any] | None = None
    last_state: dict[str, Any] | None = None


class PodStatus(APIModel):
    phase: str | None = None  # Pending | Running | Succeeded | Failed | Unknown
    conditions: list[Condition] | None = None
    container_statuses: list[ContainerStatus] | None = None
    pod_ip: str | None = Field(default=None, alias="podIP")
    host_ip: str | None = Field(default=None, alias="hostIP")
    start_time: Timestamp | None = None
    reason: str | None = None
    message: str | None = None


class Pod(Resource):
    KIND = "Pod"
    spec: PodSpec = Field(default_factory=PodSpec)
    status: PodStatus = Field(default_factory=PodStatus)


# --- Service ---------------------------------------------------------------------------------


class ServicePort(APIModel):
    port: int
    name: str | None = None
    protocol: str | None = None
    target_port: int | str | None = None


class ServiceSpec(APIModel):
    selector: dict[str, str] | None = None
    ports: list[ServicePort] | None = None
    cluster_ip: str | None = Field(default=None, alias="clusterIP")
    type: str | None = None


class Service(Resource):
    KIND = "Service"
    spec: ServiceSpec = Field(default_factory=ServiceSpec)
    status: dict[str, Any] | None = None


# --- Event -----------------------------------------------------------------------------------


class EventSource(APIModel):
    component: str | None = None
    host: str | None = None


class Event(Resource):
    KIND = "Event"
    involved_object: ObjectReference = Field(default_factory=ObjectReference)
    reason: str | None = None
    message: str | None = None
    type: str | None = None  # Normal | Warning
    count: int | None = None
    first_timestamp: Timestamp | None = None
    last_timestamp: Timestamp | None = None
    event_time: Timestamp | None = None
    source: EventSource | None = None
    reporting_component: str | None = None
    action: str | None = None
