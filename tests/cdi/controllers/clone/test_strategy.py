"""The clone strategy decision: one row per branch of CDI's planner, then invariants.

Messages and reasons are written out literally (not taken from the module) so
a changed constant fails here: they are what users see in events and in the
``cloneFallbackReason`` annotation, and what CDI's own tests expect.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from collections.abc import Callable
from typing import Any

import pytest

from cdi.controllers.clone import strategy
from cdi.controllers.clone.strategy import CloneRefused, Decision, Event, Wait

DRIVER = "csi.example.com"
OTHER = "other.example.com"
DELETE = object()

SELECTED_DEFAULT = Event("Normal", "VolumeSnapshotClassSelected",
                         "Default VolumeSnapshotClass selected csi-snap")
VALIDATION_FAILED = Event("Warning", "CloneValidationFailed",
                          "The clone doesn't meet the validation requirements")


def _snapshot_class(name: str, driver: str, *, default: bool = False) -> dict[str, Any]:
    annotations = {"snapshot.storage.kubernetes.io/is-default-class": "true"} if default else {}
    return {"kind": "VolumeSnapshotClass", "driver": driver, "deletionPolicy": "Delete",
            "metadata": {"name": name, "annotations": annotations}}


def pvc_world() -> dict[str, Any]:
    """A source claim bound to a CSI volume, a same-class target, a reconciled profile."""
    storage_class = {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
                     "metadata": {"name": "fast", "annotations": {}},
                     "provisioner": DRIVER, "allowVolumeExpansion": False}
    profile = {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "StorageProfile",
               "metadata": {"name": "fast", "annotations": {}},
               "spec": {},
               "status": {"storageClass": "fast", "provisioner": DRIVER,
                          "cloneStrategy": "snapshot"}}
    return {
        "source_name": "src",
        "source": {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                   "metadata": {"name": "src", "namespace": "ns", "annotations": {}},
                   "spec": {"storageClassName": "fast", "volumeMode": "Filesystem",
                            "accessModes": ["ReadWriteOnce"], "volumeName": "pv-src",
                            "resources": {"requests": {"storage": "2Gi"}}},
                   "status": {"phase": "Bound", "capacity": {"storage": "2Gi"}}},
        "source_volume": {"apiVersion": "v1", "kind": "PersistentVolume",
                          "metadata": {"name": "pv-src"},
                          "spec": {"claimRef": {"namespace": "ns", "name": "src"},
                                   "csi": {"driver": DRIVER, "volumeHandle": "h1"}}},
        "source_class": storage_class,
        "source_profile": profile,
        "target": {"storageClassName": "fast", "volumeMode": "Filesystem",
                   "accessModes": ["ReadWriteOnce"],
                   "resources": {"requests": {"storage": "2Gi"}}},
        "target_class": storage_class,
        "target_profile": profile,
        "target_content_type": "kubevirt",
        "snapshot_classes": [_snapshot_class("a-snap", DRIVER),
                             _snapshot_class("csi-snap", DRIVER, default=True),
                             _snapshot_class("other-snap", OTHER, default=True)],
        "cdi_config": {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "CDIConfig",
                       "metadata": {"name": "config"}, "spec": {}},
        "permissive": False,
    }


def snapshot_world() -> dict[str, Any]:
    """A ready VolumeSnapshot of the target class's driver, and a same-size target."""
    world = pvc_world()
    return {
        "snapshot_name": "snap",
        "snapshot": {"apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
                     "metadata": {"name": "snap", "namespace": "ns"},
                     "status": {"boundVolumeSnapshotContentName": "snapcontent-1",
                                "restoreSize": "2Gi", "readyToUse": True}},
        "content": {"apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshotContent",
                    "metadata": {"name": "snapcontent-1"},
                    "spec": {"driver": DRIVER, "sourceVolumeMode": "Filesystem"}},
        "target": world["target"],
        "target_class": world["target_class"],
    }


Mutator = Callable[[dict[str, Any]], None]


def patch(changes: dict[str, Any]) -> Mutator:
    """Set dotted paths in a world ("source.spec.volumeMode"); DELETE removes the key."""
    def apply(world: dict[str, Any]) -> None:
        for path, value in changes.items():
            *parents, last = path.split(".")
            node = world
            for key in parents:
                node = node[key]
            if value is DELETE:
                del node[last]
            else:
                node[last] = copy.deepcopy(value)
    return apply


def both(*mutators: Mutator) -> Mutator:
    def apply(world: dict[str, Any]) -> None:
        for mutate in mutators:
            mutate(world)
    return apply


@dataclasses.dataclass(frozen=True)
class Raises:
    kind: type[strategy.NoDecision]
    reason: str
    message: str
    events: tuple[Event, ...] = ()
    error: bool = False


def fallback(reason: str, message: str, *before: Event) -> Decision:
    return Decision("copy", None, reason, message, (*before, Event("Warning", reason, message)))


def refused(message: str) -> Raises:
    return Raises(CloneRefused, "ErrIncompatiblePVC", message,
                  (Event("Warning", "ErrIncompatiblePVC", message), VALIDATION_FAILED))


def check(outcome: Callable[[], Decision], expected: Decision | Raises) -> None:
    if isinstance(expected, Decision):
        assert outcome() == expected
        return
    with pytest.raises(expected.kind) as info:
        outcome()
    assert type(info.value) is expected.kind
    assert (info.value.reason, info.value.message, info.value.events) == (
        expected.reason, expected.message, expected.events)
    assert str(info.value) == expected.message
    assert getattr(info.value, "error", False) is expected.error


NO_CLASS = fallback("NoVolumeSnapshotClass", "No compatible volumesnapshotclass found")
SNAPSHOT = Decision("snapshot", "csi-snap", events=(SELECTED_DEFAULT,))
PROFILE_CSI_CLONE = patch({"target_profile.status.cloneStrategy": "csi-clone"})

PVC_ROWS = [
    pytest.param(patch({}), SNAPSHOT, id="snapshot-default-class-beats-first-by-name"),
    # 1. the target's StorageClass
    pytest.param(patch({"target.storageClassName": DELETE}),
                 Raises(Wait, "StorageClassUnset",
                        "Target PVC has nil storage class, cannot compute strategy"),
                 id="target-class-unset-waits"),
    pytest.param(patch({"target.storageClassName": ""}),
                 Raises(CloneRefused, "StorageClassEmpty",
                        "claim has emptystring storageclass, will not work"),
                 id="target-class-empty-refused"),
    pytest.param(patch({"target_class": None}),
                 Raises(Wait, "StorageClassNotFound", "target storage class not found",
                        error=True),
                 id="target-class-missing-waits-as-error"),
    pytest.param(patch({"target.storageClassName": DELETE, "source": None}),
                 Raises(Wait, "StorageClassUnset",
                        "Target PVC has nil storage class, cannot compute strategy"),
                 id="target-class-checked-before-source"),
    # 2. the source
    pytest.param(patch({"source": None}),
                 Raises(Wait, "CloneWithoutSource", "The source pvc src doesn't exist",
                        (Event("Warning", "CloneWithoutSource",
                               "The source pvc src doesn't exist"),)),
                 id="source-missing-waits"),
    # 3. validation
    pytest.param(patch({"source.metadata.annotations": {
                     "cdi.kubevirt.io/storage.contentType": "archive"}}),
                 refused("source contentType (archive) and target contentType (kubevirt) "
                         "do not match"),
                 id="content-types-differ-refused"),
    pytest.param(patch({"source.metadata.annotations": {
                     "cdi.kubevirt.io/storage.contentType": "qcow"}}),
                 SNAPSHOT, id="content-type-unknown-counts-as-kubevirt"),
    pytest.param(patch({"source.metadata.annotations": {
                     "cdi.kubevirt.io/storage.contentType": "archive"},
                     "target_content_type": "archive", "target.volumeMode": "Block"}),
                 refused("source volumeMode (Filesystem) and target volumeMode (Block) "
                         "do not match, contentType (archive)"),
                 id="archive-volume-modes-differ-refused"),
    pytest.param(patch({"target.resources.requests.storage": "1Gi"}),
                 refused("target resources requests storage size is smaller than the source "
                         "1073741824 < 2147483648"),
                 id="target-smaller-refused"),
    pytest.param(patch({"source.spec.resources.requests.storage": "2G",
                        "target.resources.requests.storage": "1900M"}),
                 refused("target resources requests storage size is smaller than the source "
                         "1900000000 < 2000000000"),
                 id="target-smaller-decimal-units-refused"),
    pytest.param(patch({"source.spec.resources.requests.storage": "2G",
                        "target.resources.requests.storage": "1.9Gi"}),
                 SNAPSHOT, id="target-larger-mixed-units"),
    pytest.param(patch({"target.resources.requests.storage": "1Gi", "permissive": True}),
                 SNAPSHOT, id="target-smaller-permissive"),
    pytest.param(patch({"target.resources.requests.storage": "1Gi",
                        "target_profile.metadata.annotations": {
                            "cdi.kubevirt.io/minimumSupportedPvcSize": "2Gi"}}),
                 SNAPSHOT, id="target-raised-by-minimum-supported-size"),
    pytest.param(patch({"target.resources.requests.storage": "1Gi",
                        "target_profile.metadata.annotations": {
                            "cdi.kubevirt.io/minimumSupportedPvcSize": "lots"}}),
                 refused("target resources requests storage size is smaller than the source "
                         "1073741824 < 2147483648"),
                 id="minimum-supported-size-invalid-ignored"),
    pytest.param(patch({"source.spec.resources": {}}),
                 refused("source/target missing storage resource requests"),
                 id="source-request-missing-refused"),
    pytest.param(patch({"target.resources": {}}),
                 refused("source/target missing storage resource requests"),
                 id="target-request-missing-refused"),
    # 4. precedence
    pytest.param(patch({"cdi_config.spec.cloneStrategyOverride": "csi-clone"}),
                 Decision("csi-clone"), id="override-beats-profile"),
    pytest.param(patch({"cdi_config.spec.cloneStrategyOverride": "copy",
                        "target_class.metadata.annotations": {
                            "cdi.kubevirt.io/clone-strategy": "csi-clone"}}),
                 Decision("copy"), id="override-beats-class-annotation"),
    pytest.param(PROFILE_CSI_CLONE, Decision("csi-clone"), id="profile-csi-clone"),
    pytest.param(patch({"target_profile.status.cloneStrategy": "copy"}),
                 Decision("copy"), id="profile-copy"),
    pytest.param(patch({"target_class.metadata.annotations": {
                     "cdi.kubevirt.io/clone-strategy": "copy"}}),
                 SNAPSHOT, id="profile-status-beats-class-annotation"),
    pytest.param(patch({"target_profile.status": {},
                        "target_class.metadata.annotations": {
                            "cdi.kubevirt.io/clone-strategy": "csi-clone"}}),
                 Decision("csi-clone"), id="class-annotation-when-profile-unreconciled"),
    pytest.param(patch({"target_profile.status": {},
                        "target_profile.spec.cloneStrategy": "copy",
                        "target_class.metadata.annotations": {
                            "cdi.kubevirt.io/clone-strategy": "csi-clone"}}),
                 Decision("copy"), id="profile-spec-beats-class-annotation-when-unreconciled"),
    pytest.param(patch({"target_profile": None, "source_profile": None}),
                 SNAPSHOT, id="no-profile-defaults-to-snapshot"),
    pytest.param(patch({"target_profile.status.cloneStrategy": "fast-copy"}),
                 Raises(CloneRefused, "UnknownCloneStrategy", "unknown strategy/source fast-copy"),
                 id="unknown-strategy-refused"),
    # 5. snapshot: the VolumeSnapshotClass
    pytest.param(patch({"target_profile.status.snapshotClass": "a-snap"}),
                 Decision("snapshot", "a-snap", events=(Event(
                     "Normal", "VolumeSnapshotClassSelected",
                     "VolumeSnapshotClass selected according to StorageProfile a-snap"),)),
                 id="snapshot-class-from-profile"),
    pytest.param(patch({"target_profile.status.snapshotClass": "other-snap"}),
                 NO_CLASS, id="snapshot-profile-class-other-driver-no-default-fallback"),
    pytest.param(patch({"target_profile.status.snapshotClass": "a-snap",
                        "source_profile": {"status": {"snapshotClass": "csi-snap"}}}),
                 SNAPSHOT, id="snapshot-profile-classes-disagree-use-default"),
    pytest.param(patch({"target_profile.status.snapshotClass": "a-snap",
                        "source_profile": None}),
                 SNAPSHOT, id="snapshot-profile-class-needs-source-profile"),
    pytest.param(patch({"target_profile.status.snapshotClass": "gone"}),
                 Raises(Wait, "SnapshotClassNotFound",
                        'volumesnapshotclasses.snapshot.storage.k8s.io "gone" not found',
                        error=True),
                 id="snapshot-profile-class-missing-waits"),
    pytest.param(patch({"snapshot_classes": [
                     _snapshot_class("z-snap", DRIVER), _snapshot_class("b-snap", DRIVER),
                     _snapshot_class("a-other", OTHER, default=True)]}),
                 Decision("snapshot", "b-snap", events=(Event(
                     "Normal", "VolumeSnapshotClassSelected",
                     "First VolumeSnapshotClass selected b-snap"),)),
                 id="snapshot-class-first-by-name"),
    pytest.param(patch({"snapshot_classes": [_snapshot_class("other-snap", OTHER)]}),
                 NO_CLASS, id="snapshot-no-class-for-driver"),
    pytest.param(patch({"snapshot_classes": []}), NO_CLASS, id="snapshot-no-classes"),
    # 5. snapshot: the common driver
    pytest.param(patch({"source_volume.spec.csi.driver": OTHER}),
                 NO_CLASS, id="snapshot-drivers-differ-no-class"),
    pytest.param(patch({"source_class": {"metadata": {"name": "nfs"}, "provisioner": "nfs"}}),
                 SNAPSHOT, id="snapshot-volume-driver-beats-class-provisioner"),
    pytest.param(patch({"source.spec.volumeName": DELETE,
                        "source_class": {"metadata": {"name": "o"}, "provisioner": OTHER}}),
                 NO_CLASS, id="snapshot-unbound-source-uses-class-provisioner"),
    pytest.param(patch({"source_class": None}),
                 SNAPSHOT, id="snapshot-source-class-missing-volume-driver-suffices"),
    pytest.param(patch({"source_class": None, "source_volume": None}),
                 NO_CLASS, id="snapshot-no-source-class-no-volume-no-driver"),
    pytest.param(patch({"source_volume.spec.csi": None}),
                 SNAPSHOT, id="snapshot-in-tree-volume-uses-class-provisioner"),
    pytest.param(patch({"source_volume.spec.claimRef.name": "someone-else"}),
                 Raises(Wait, "SourceNotReady", "pvc does not match volume claim ref",
                        error=True),
                 id="volume-bound-to-other-claim-waits"),
    # 6. snapshot: after the class
    pytest.param(patch({"target.volumeMode": "Block"}),
                 fallback("IncompatibleVolumeModes",
                          "The volume modes of source and target are incompatible",
                          SELECTED_DEFAULT),
                 id="snapshot-volume-modes-differ"),
    pytest.param(patch({"target.resources.requests.storage": "3Gi"}),
                 fallback("NoVolumeExpansion", "No volume expansion is possible",
                          SELECTED_DEFAULT),
                 id="snapshot-no-volume-expansion"),
    pytest.param(patch({"target.resources.requests.storage": "3Gi",
                        "target_class.allowVolumeExpansion": True}),
                 SNAPSHOT, id="snapshot-volume-expansion-allowed"),
    pytest.param(patch({"source.spec.resources.requests.storage": "1Gi",
                        "target.resources.requests.storage": "2Gi"}),
                 SNAPSHOT, id="expansion-check-uses-source-capacity"),
    pytest.param(patch({"source.status": {"phase": "Pending"}}),
                 Raises(Wait, "SourceNotReady", "source/target size info missing",
                        (SELECTED_DEFAULT,), error=True),
                 id="snapshot-source-capacity-missing-waits"),
    # 6. csi-clone
    pytest.param(both(PROFILE_CSI_CLONE, patch({"source_volume.spec.csi.driver": OTHER})),
                 fallback("IncompatibleProvisioners", "Provisioners are incompatible"),
                 id="csi-clone-drivers-differ"),
    pytest.param(both(PROFILE_CSI_CLONE, patch({"target.volumeMode": "Block"})),
                 fallback("IncompatibleVolumeModes",
                          "The volume modes of source and target are incompatible"),
                 id="csi-clone-volume-modes-differ"),
    pytest.param(both(PROFILE_CSI_CLONE, patch({"target.resources.requests.storage": "3Gi"})),
                 fallback("NoVolumeExpansion", "No volume expansion is possible"),
                 id="csi-clone-no-volume-expansion"),
    pytest.param(both(PROFILE_CSI_CLONE, patch({
                     "snapshot_classes": [], "target.resources.requests.storage": "3Gi",
                     "target_class.allowVolumeExpansion": True})),
                 Decision("csi-clone"), id="csi-clone-needs-no-snapshot-class"),
    pytest.param(patch({"target_profile.status.cloneStrategy": "copy",
                        "source_volume.spec.csi.driver": OTHER, "target.volumeMode": "Block",
                        "target.resources.requests.storage": "3Gi"}),
                 Decision("copy"), id="copy-skips-smart-clone-checks"),
]


@pytest.mark.parametrize(("mutate", "expected"), PVC_ROWS)
def test_for_pvc(mutate: Mutator, expected: Decision | Raises) -> None:
    world = pvc_world()
    mutate(world)
    check(lambda: strategy.for_pvc(**world), expected)


SNAPSHOT_ROWS = [
    pytest.param(patch({}), Decision("snapshot"), id="snapshot-source"),
    pytest.param(patch({"target.storageClassName": DELETE}),
                 Raises(Wait, "StorageClassUnset",
                        "Target PVC has nil storage class, cannot compute strategy"),
                 id="snapshot-source-target-class-unset-waits"),
    pytest.param(patch({"target_class": None}),
                 Raises(Wait, "StorageClassNotFound", "target storage class not found",
                        error=True),
                 id="snapshot-source-target-class-missing-waits"),
    pytest.param(patch({"snapshot": None}),
                 Raises(Wait, "CloneWithoutSource", "The source snapshot snap doesn't exist",
                        (Event("Warning", "CloneWithoutSource",
                               "The source snapshot snap doesn't exist"),)),
                 id="snapshot-source-missing-waits"),
    pytest.param(patch({"snapshot.status": DELETE}),
                 Raises(Wait, "SourceNotReady", "volumeSnapshotContent name not found",
                        error=True),
                 id="snapshot-source-content-unbound-waits"),
    pytest.param(patch({"content": None}),
                 Raises(Wait, "SourceNotReady",
                        'volumesnapshotcontents.snapshot.storage.k8s.io "snapcontent-1" '
                        'not found', error=True),
                 id="snapshot-source-content-missing-waits"),
    pytest.param(patch({"content.spec.driver": OTHER, "target.resources.requests.storage": "3Gi"}),
                 fallback("NoProvisionerMatch", "The storageclass provisioner does not match "
                          "the volumesnapshotcontent driver"),
                 id="snapshot-source-no-provisioner-match"),
    pytest.param(patch({"snapshot.status.restoreSize": DELETE}),
                 Raises(Wait, "SourceNotReady", "snapshot has no RestoreSize", error=True),
                 id="snapshot-source-no-restore-size-waits"),
    pytest.param(patch({"target.resources.requests.storage": "3Gi", "target.volumeMode": "Block"}),
                 fallback("NoVolumeExpansion", "No volume expansion is possible"),
                 id="snapshot-source-no-volume-expansion"),
    pytest.param(patch({"target.resources.requests.storage": "3Gi",
                        "target_class.allowVolumeExpansion": True}),
                 Decision("snapshot"), id="snapshot-source-volume-expansion-allowed"),
    pytest.param(patch({"target.resources.requests.storage": "1Gi"}),
                 Decision("snapshot"), id="snapshot-source-target-smaller-not-validated"),
    pytest.param(patch({"target.resources": {}}),
                 Decision("snapshot"), id="snapshot-source-no-target-request-uses-restore-size"),
    pytest.param(patch({"target.volumeMode": "Block"}),
                 fallback("IncompatibleVolumeModes",
                          "The volume modes of source and target are incompatible"),
                 id="snapshot-source-volume-modes-differ"),
    pytest.param(patch({"content.spec.sourceVolumeMode": DELETE, "target.volumeMode": "Block"}),
                 fallback("IncompatibleVolumeModes",
                          "The volume modes of source and target are incompatible"),
                 id="snapshot-source-volume-mode-unset-is-filesystem"),
]


@pytest.mark.parametrize(("mutate", "expected"), SNAPSHOT_ROWS)
def test_for_snapshot(mutate: Mutator, expected: Decision | Raises) -> None:
    world = snapshot_world()
    mutate(world)
    check(lambda: strategy.for_snapshot(**world), expected)


@pytest.mark.parametrize(("decision", "existing", "expected"), [
    pytest.param(Decision("snapshot", "csi-snap"), None,
                 {"cdi.kubevirt.io/cloneType": "snapshot"}, id="snapshot"),
    pytest.param(Decision("csi-clone"), {}, {"cdi.kubevirt.io/cloneType": "csi-clone"},
                 id="csi-clone"),
    pytest.param(Decision("copy"), None, {"cdi.kubevirt.io/cloneType": "copy"},
                 id="copy-asked-for"),
    pytest.param(NO_CLASS, None,
                 {"cdi.kubevirt.io/cloneType": "copy",
                  "cdi.kubevirt.io/cloneFallbackReason": "No compatible volumesnapshotclass found"},
                 id="fallback-writes-message"),
    pytest.param(NO_CLASS, {"cdi.kubevirt.io/cloneFallbackReason": "earlier"},
                 {"cdi.kubevirt.io/cloneType": "copy"}, id="fallback-reason-kept"),
])
def test_claim_annotations(decision: Decision, existing: dict[str, str] | None,
                           expected: dict[str, str]) -> None:
    assert strategy.claim_annotations(decision, existing) == expected


# --- properties over many worlds --------------------------------------------------------------

STRATEGIES = [None, "snapshot", "csi-clone", "copy"]


def _worlds(*, driver: str) -> list[dict[str, Any]]:
    worlds = []
    for override, profile, annotation, mode, size, expand, named in itertools.product(
            STRATEGIES, STRATEGIES, STRATEGIES, ["Filesystem", "Block"], ["2Gi", "3Gi"],
            [True, False], [None, "a-snap", "other-snap"]):
        world = pvc_world()
        world["source_volume"]["spec"]["csi"]["driver"] = driver
        world["cdi_config"]["spec"]["cloneStrategyOverride"] = override
        world["target_profile"]["status"]["cloneStrategy"] = profile
        world["target_class"]["metadata"]["annotations"] = (
            {"cdi.kubevirt.io/clone-strategy": annotation} if annotation else {})
        world["target"]["volumeMode"] = mode
        world["target"]["resources"]["requests"]["storage"] = size
        world["target_class"]["allowVolumeExpansion"] = expand
        world["target_profile"]["status"]["snapshotClass"] = named
        worlds.append(world)
    return worlds


def test_drivers_differ_always_copy() -> None:
    for world in _worlds(driver=OTHER):
        decision = strategy.for_pvc(**world)
        assert decision.strategy == "copy", world
        assert decision.snapshot_class is None


def test_decisions_are_consistent() -> None:
    for world in _worlds(driver=DRIVER):
        decision = strategy.for_pvc(**world)
        asked = strategy.requested_strategy(cdi_config=world["cdi_config"],
                                            target_profile=world["target_profile"],
                                            target_class=world["target_class"])
        warnings = [e for e in decision.events if e.type == "Warning"]
        if decision.strategy != asked:
            # A fallback: always to copy, named once, as the last event.
            assert decision.strategy == "copy"
            assert decision.fallback_reason and decision.fallback_message
            assert warnings == [Event("Warning", decision.fallback_reason,
                                      decision.fallback_message)]
            assert decision.events[-1] == warnings[0]
        else:
            assert decision.fallback_reason is None and decision.fallback_message is None
            assert warnings == []
        if decision.strategy == "snapshot":
            classes = {c["metadata"]["name"]: c for c in world["snapshot_classes"]}
            assert classes[decision.snapshot_class]["driver"] == DRIVER
        else:
            assert decision.snapshot_class is None
        annotations = strategy.claim_annotations(decision)
        assert annotations["cdi.kubevirt.io/cloneType"] == decision.strategy
        assert annotations.get("cdi.kubevirt.io/cloneFallbackReason") == decision.fallback_message


def test_override_decides_whatever_the_profile_says() -> None:
    for world in _worlds(driver=DRIVER):
        override = world["cdi_config"]["spec"]["cloneStrategyOverride"]
        decision = strategy.for_pvc(**world)
        if override is not None and decision.fallback_reason is None:
            assert decision.strategy == override


def test_smaller_target_refused_unless_permissive() -> None:
    for source, target in [("2Gi", "1Gi"), ("1Gi", "1023Mi"), ("1000M", "999999999")]:
        world = pvc_world()
        world["source"]["spec"]["resources"]["requests"]["storage"] = source
        world["target"]["resources"]["requests"]["storage"] = target
        with pytest.raises(CloneRefused) as info:
            strategy.for_pvc(**world)
        assert info.value.reason == "ErrIncompatiblePVC"
        world["permissive"] = True
        assert strategy.for_pvc(**world).strategy == "snapshot"
