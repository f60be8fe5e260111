"""Typed objects: manifests survive load/dump unchanged, malformed ones fail by field."""

from __future__ import annotations

import copy
import datetime
from typing import Any

import pytest
import yaml

from cdi.api import errors, objects, units
from cdi.api.cdikinds import CDIConfig, DataImportCron
from cdi.api.datavolume import DataVolume, DataVolumePhase
from cdi.api.meta import Resource

DV_WITH_UNKNOWNS = """
apiVersion: cdi.kubevirt.io/v1beta1
kind: DataVolume
metadata:
  name: fedora
  namespace: vms
  uid: 5f0e-11
  resourceVersion: "42"
  generation: 3
  creationTimestamp: 2024-05-01T10:00:00Z
  labels: {app: demo}
  annotations:
    cdi.kubevirt.io/storage.bind.immediate.requested: "true"
  ownerReferences:
  - {apiVersion: kubevirt.io/v1, kind: VirtualMachine, name: vm, uid: u1, controller: true}
  finalizers: [example.com/keep]
  managedFields:
  - {manager: kubectl, operation: Apply}
spec:
  source:
    http:
      url: https://example.com/fedora.qcow2
      checksum: sha256:0000000000000000000000000000000000000000000000000000000000000000
      extraHeaders: ["X-A: 1"]
      someFutureHttpOption: {deep: [1, 2, {x: null}]}
  storage:
    accessModes: [ReadWriteOnce]
    resources:
      requests: {storage: 10Gi}
    futureStorageField: 7
  contentType: kubevirt
  preallocation: false
  priorityClassName: high
  checkpoints:
  - {previous: "", current: snap-1}
  finalCheckpoint: false
  aBrandNewSpecField: keep me
status:
  phase: ImportInProgress
  progress: "45.20%"
  restartCount: 2
  claimName: fedora
  conditions:
  - type: Ready
    status: "False"
    reason: TransferRunning
    lastTransitionTime: "2024-05-01T10:01:00Z"
    observedGeneration: 3
  newStatusField: true
"""

OTHER_KINDS = """
apiVersion: cdi.kubevirt.io/v1beta1
kind: DataImportCron
metadata: {name: fedora-cron}
spec:
  template:
    spec:
      source:
        registry: {url: "docker://quay.io/fedora:latest", pullMethod: node}
      storage: {resources: {requests: {storage: 5Gi}}}
  schedule: "0 */12 * * *"
  managedDataSource: fedora
  importsToKeep: 2
  garbageCollect: Outdated
status:
  currentImports: [{DataVolumeName: fedora-abc, Digest: "sha256:ab"}]
  lastImportedPVC: {namespace: ns, name: fedora-abc}
  unknownStatus: 1
---
apiVersion: cdi.kubevirt.io/v1beta1
kind: DataSource
metadata: {name: fedora}
spec:
  source:
    pvc: {namespace: ns, name: fedora-abc}
status:
  conditions: [{type: Ready, status: "True"}]
---
apiVersion: cdi.kubevirt.io/v1beta1
kind: StorageProfile
metadata:
  name: local
  annotations: {cdi.kubevirt.io/minimumSupportedPvcSize: 4Gi}
spec:
  claimPropertySets: [{accessModes: [ReadWriteOnce], volumeMode: Block}]
status:
  storageClass: local
  provisioner: kubernetes.io/no-provisioner
  cloneStrategy: copy
  claimPropertySets: [{accessModes: [ReadWriteOnce], volumeMode: Block}]
---
apiVersion: cdi.kubevirt.io/v1beta1
kind: CDIConfig
metadata: {name: config}
spec:
  uploadProxyURLOverride: https://upload.example.com
  dataVolumeTTLSeconds: -1
  importProxy: {HTTPProxy: "http://p:3128", HTTPSProxy: "http://p:3128", noProxy: ".svc",
                trustedCAProxy: ca}
  filesystemOverhead: {global: "0.06", storageClass: {local: "0.1"}}
status:
  uploadProxyURL: https://upload.example.com
  uploadProxyCA: "---CA---"
  filesystemOverhead: {global: "0.06", storageClass: {local: "0.1"}}
---
apiVersion: upload.cdi.kubevirt.io/v1beta1
kind: UploadTokenRequest
metadata: {name: t, namespace: ns}
spec: {pvcName: disk}
status: {token: abc.def}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: disk, namespace: ns}
spec:
  accessModes: [ReadWriteOnce]
  volumeMode: Filesystem
  resources: {requests: {storage: "1138166334"}}
  storageClassName: local
  dataSourceRef: {apiGroup: cdi.kubevirt.io, kind: VolumeImportSource, name: src}
status: {phase: Bound, capacity: {storage: 2Gi}}
---
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: local
  annotations: {storageclass.kubernetes.io/is-default-class: "true"}
provisioner: kubernetes.io/no-provisioner
volumeBindingMode: WaitForFirstConsumer
---
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshot
metadata: {name: snap, namespace: ns}
spec: {source: {persistentVolumeClaimName: disk}, volumeSnapshotClassName: csi}
status: {readyToUse: true, restoreSize: 1Gi, boundVolumeSnapshotContentName: c1}
---
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshotClass
metadata: {name: csi}
driver: hostpath.csi.k8s.io
deletionPolicy: Delete
---
apiVersion: v1
kind: Pod
metadata: {name: importer-disk, namespace: ns}
spec:
  restartPolicy: OnFailure
  containers:
  - name: importer
    image: cdi-importer
    args: ["-v=1"]
    env: [{name: IMPORTER_SOURCE, value: http}]
    volumeDevices: [{name: cdi-data-vol, devicePath: /dev/cdi-block-volume}]
    resources: {limits: {cpu: 750m, memory: 600M}, requests: {cpu: 0.1}}
  volumes: [{name: cdi-data-vol, persistentVolumeClaim: {claimName: disk}}]
  securityContext: {fsGroup: 107}
status:
  phase: Running
  podIP: 10.0.0.7
  containerStatuses:
  - name: importer
    restartCount: 1
    state: {terminated: {exitCode: 0, message: Import Complete}}
---
apiVersion: v1
kind: Service
metadata: {name: cdi-upload-disk, namespace: ns}
spec:
  clusterIP: None
  selector: {app: x}
  ports: [{name: https, port: 443, targetPort: 8443, protocol: TCP}]
---
apiVersion: v1
kind: Event
metadata: {name: fedora.17a, namespace: vms}
involvedObject: {apiVersion: cdi.kubevirt.io/v1beta1, kind: DataVolume, name: fedora}
reason: ImportSucceeded
message: Successfully imported into PVC fedora
type: Normal
count: 1
---
apiVersion: cdi.kubevirt.io/v1beta1
kind: CDI
metadata: {name: cdi}
spec:
  config: {filesystemOverhead: {global: "0.08"}}
  workload: {nodeSelector: {a: b}}
---
apiVersion: v1
kind: Namespace
metadata: {name: vms}
spec: {finalizers: [kubernetes]}
"""


def test_round_trip_keeps_unknown_fields() -> None:
    manifest = yaml.safe_load(DV_WITH_UNKNOWNS)
    original = copy.deepcopy(manifest)
    dv = objects.load(manifest)
    assert isinstance(dv, DataVolume)
    assert dv.model_dump(by_alias=True, exclude_none=True) == original
    assert objects.dump(dv) == original
    assert manifest == original, "load must not modify its input"


def test_round_trip_keeps_yaml_timestamps_as_given() -> None:
    manifest = yaml.safe_load(DV_WITH_UNKNOWNS)
    assert isinstance(manifest["metadata"]["creationTimestamp"], datetime.datetime)
    assert objects.dump(objects.load(manifest))["metadata"]["creationTimestamp"] == \
        manifest["metadata"]["creationTimestamp"]


@pytest.mark.parametrize("manifest", list(yaml.safe_load_all(OTHER_KINDS)),
                         ids=lambda m: str(m["kind"]))
def test_round_trip_every_kind(manifest: dict[str, Any]) -> None:
    obj = objects.load(copy.deepcopy(manifest))
    expected = objects.MODELS.get(manifest["kind"], Resource)
    assert type(obj) is expected
    assert objects.dump(obj) == manifest


def test_typed_access_to_fields() -> None:
    dv = objects.load_as(DataVolume, yaml.safe_load(DV_WITH_UNKNOWNS))
    assert dv.name == "fedora" and dv.namespace == "vms"
    assert dv.spec.source is not None and dv.spec.source.http is not None
    assert dv.spec.source.variants() == ["http"]
    assert dv.spec.storage is not None and dv.spec.storage.requested_storage() == "10Gi"
    assert dv.status.phase == DataVolumePhase.IMPORT_IN_PROGRESS
    assert dv.status.conditions[0].reason == "TransferRunning"
    assert dv.metadata.owner_references[0].controller is True
    assert dv.model_extra == {}
    assert dv.spec.model_extra == {"aBrandNewSpecField": "keep me"}

    cron, *_ = yaml.safe_load_all(OTHER_KINDS)
    dic = objects.load_as(DataImportCron, cron)
    assert dic.status.current_imports is not None
    assert dic.status.current_imports[0].data_volume_name == "fedora-abc"


def test_irregular_json_names() -> None:
    config = objects.load_as(CDIConfig, list(yaml.safe_load_all(OTHER_KINDS))[3])
    assert config.spec.upload_proxy_url_override == "https://upload.example.com"
    assert config.spec.data_volume_ttl_seconds == -1
    assert config.spec.import_proxy is not None
    assert config.spec.import_proxy.http_proxy == "http://p:3128"
    assert config.spec.import_proxy.trusted_ca_proxy == "ca"
    assert config.spec.filesystem_overhead is not None
    assert config.spec.filesystem_overhead.global_ == "0.06"
    assert config.status.upload_proxy_ca == "---CA---"
    vddk = objects.load_as(DataVolume, {"spec": {"source": {"vddk": {"initImageURL": "q/i"}}}})
    assert vddk.spec.source is not None and vddk.spec.source.vddk is not None
    assert vddk.spec.source.vddk.init_image_url == "q/i"
    assert objects.dump(vddk) == {"spec": {"source": {"vddk": {"initImageURL": "q/i"}}}}


def test_unset_containers_are_not_invented() -> None:
    assert objects.dump(objects.load({"kind": "DataVolume"})) == {"kind": "DataVolume"}
    dv = DataVolume(api_version="cdi.kubevirt.io/v1beta1", kind="DataVolume")
    assert objects.dump(dv) == {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume"}


def test_filled_default_containers_are_dumped() -> None:
    dv = DataVolume(kind="DataVolume")
    dv.metadata.annotations["a"] = "b"
    dv.status.phase = DataVolumePhase.SUCCEEDED
    dumped = objects.dump(dv)
    assert dumped == {"kind": "DataVolume", "metadata": {"annotations": {"a": "b"}},
                      "status": {"phase": "Succeeded"}}
    assert type(dumped["status"]["phase"]) is str


def test_explicit_empty_values_are_kept() -> None:
    manifest = {"kind": "DataVolume", "metadata": {}, "spec": {"source": {"blank": {}}},
                "status": {"conditions": []}}
    assert objects.dump(objects.load(copy.deepcopy(manifest))) == manifest


def test_null_container_reads_as_absent() -> None:
    profile = objects.load({"kind": "StorageProfile", "metadata": None, "spec": None})
    assert profile.name == ""
    assert objects.dump(profile) == {"kind": "StorageProfile"}


def test_phases_are_cdis_list() -> None:
    assert [p.value for p in DataVolumePhase] == [
        "", "Pending", "PVCBound", "ImportScheduled", "ImportInProgress", "CloneScheduled",
        "CloneInProgress", "SnapshotForSmartCloneInProgress",
        "CloneFromSnapshotSourceInProgress", "SmartClonePVCInProgress", "CSICloneInProgress",
        "ExpansionInProgress", "NamespaceTransferInProgress", "UploadScheduled", "UploadReady",
        "WaitForFirstConsumer", "PendingPopulation", "Succeeded", "Failed", "Unknown", "Paused",
        "PrepClaimInProgress", "RebindInProgress"]


def test_malformed_object_names_the_field() -> None:
    bad = {"kind": "DataVolume", "metadata": {"name": "x", "labels": {"a": True}},
           "spec": {"checkpoints": [{"previous": 1}]}}
    with pytest.raises(errors.Invalid) as e:
        objects.load(bad)
    assert e.value.code == 422
    assert e.value.message.startswith('DataVolume "x" is invalid: ')
    assert [c["field"] for c in e.value.causes] == ["metadata.labels.a",
                                                     "spec.checkpoints[0].previous"]


@pytest.mark.parametrize("obj", [{}, {"kind": ""}, {"kind": 3}])
def test_load_needs_a_kind(obj: dict[str, Any]) -> None:
    with pytest.raises(errors.BadRequest, match="Kind"):
        objects.load(obj)


def test_models_table_covers_the_kinds_controllers_use() -> None:
    assert set(objects.MODELS) == {
        "DataVolume", "DataSource", "DataImportCron", "StorageProfile", "CDIConfig", "CDI",
        "UploadTokenRequest", "PersistentVolumeClaim", "StorageClass", "VolumeSnapshot",
        "VolumeSnapshotClass", "Pod", "Service", "Event"}
    assert all(kind == model.KIND for kind, model in objects.MODELS.items())


@pytest.mark.parametrize(("quantity", "size"), [
    ("1Gi", 1 << 30), ("500M", 500_000_000), (1073741824, 1073741824), ("-1Gi", -(1 << 30)),
    ("+2Ki", 2048), ("0.5", 1), (1.5, 2), (" 3Mi ", 3 << 20),
])
def test_to_bytes(quantity: str | int | float, size: int) -> None:
    assert units.to_bytes(quantity) == size


@pytest.mark.parametrize("quantity", ["", "Gi", "1GB", "ten", "1.2.3Gi", True])
def test_to_bytes_rejects(quantity: str | bool) -> None:
    with pytest.raises(ValueError):
        units.to_bytes(quantity)


@pytest.mark.parametrize(("size", "text"), [
    (1 << 30, "1Gi"), (3 << 20, "3Mi"), (1536, "1536"), (1138166334, "1138166334"), (0, "0"),
    (5 << 40, "5Ti"), (1024, "1Ki"), (3 << 10 << 20, "3Gi"),
])
def test_format_quantity(size: int, text: str) -> None:
    assert units.format_quantity(size) == text
    assert units.to_bytes(text) == size
