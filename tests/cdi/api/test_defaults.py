"""Rendering a DataVolume's claim: profile defaults, overhead inflation, minimum sizes."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from cdi.api import defaults, errors

GI = 1 << 30
CLASS = {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
         "metadata": {"name": "local"}, "provisioner": "example.com/local"}


def profile(*sets: dict[str, Any], minimum: str | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "local"}
    if minimum is not None:
        meta["annotations"] = {"cdi.kubevirt.io/minimumSupportedPvcSize": minimum}
    return {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "StorageProfile", "metadata": meta,
            "status": {"storageClass": "local", "claimPropertySets": list(sets)}}


RWO_FS = {"accessModes": ["ReadWriteOnce"], "volumeMode": "Filesystem"}
RWX_BLOCK = {"accessModes": ["ReadWriteMany"], "volumeMode": "Block"}


def dv(storage: dict[str, Any] | None = None, *, size: str | None = "1Gi",
       source: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    target = copy.deepcopy(storage or {})
    if size is not None:
        target.setdefault("resources", {}).setdefault("requests", {})["storage"] = size
    body = {"source": source or {"http": {"url": "https://example.com/d.img"}},
            "storage": target, **spec}
    return {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
            "metadata": {"name": "disk", "namespace": "ns"}, "spec": body}


def render(obj: dict[str, Any], *, storage_class: dict[str, Any] | None = CLASS,
           prof: dict[str, Any] | None = None, overhead: float = 0.06) -> dict[str, Any]:
    return defaults.render_pvc_spec(obj, storage_class=storage_class,
                                    profile=prof if prof is not None else profile(RWO_FS),
                                    overhead=overhead)


def requested(spec: dict[str, Any]) -> Any:
    return spec["resources"]["requests"]["storage"]


def test_storage_gets_profile_modes_class_and_inflated_size() -> None:
    assert render(dv()) == {
        "accessModes": ["ReadWriteOnce"],
        "volumeMode": "Filesystem",
        "storageClassName": "local",
        "resources": {"requests": {"storage": "1138166334"}},  # ceil(1Gi * 1.06)
    }


@pytest.mark.parametrize(("size", "overhead", "expected"), [
    ("1Gi", 0.06, "1138166334"),
    ("1Gi", 0.1, "1181116007"),
    ("5Gi", 0.055, "5663988122"),
    # rounded up to whole MiB before inflating: 1025 MiB * 1.06
    (str(GI + 1), 0.06, "1112576Ki"),  # = 1139277824, an exact KiB multiple
    ("1Mi", 1.0, "2Mi"),
    ("1Gi", 0.0, "1Gi"),
])
def test_filesystem_inflation(size: str, overhead: float, expected: str) -> None:
    assert requested(render(dv(size=size), overhead=overhead)) == expected


def test_block_from_profile_is_not_inflated() -> None:
    spec = render(dv(), prof=profile(RWX_BLOCK, RWO_FS))
    assert spec["accessModes"] == ["ReadWriteMany"] and spec["volumeMode"] == "Block"
    assert requested(spec) == "1Gi"


def test_block_requested_is_not_inflated_and_gets_matching_access_modes() -> None:
    spec = render(dv({"volumeMode": "Block"}), prof=profile(RWO_FS, RWX_BLOCK))
    assert spec["accessModes"] == ["ReadWriteMany"] and spec["volumeMode"] == "Block"
    assert requested(spec) == "1Gi"


def test_access_modes_given_pick_the_matching_volume_mode() -> None:
    spec = render(dv({"accessModes": ["ReadWriteMany"]}), prof=profile(RWO_FS, RWX_BLOCK))
    assert spec["volumeMode"] == "Block" and requested(spec) == "1Gi"


def test_access_modes_without_match_leave_volume_mode_to_kubernetes() -> None:
    spec = render(dv({"accessModes": ["ReadOnlyMany"]}), prof=profile(RWX_BLOCK))
    assert "volumeMode" not in spec
    assert requested(spec) == "1138166334"  # Kubernetes' default mode is Filesystem


def test_from_storage_profile_sentinel_means_ask_the_profile() -> None:
    spec = render(dv({"volumeMode": "FromStorageProfile"}), prof=profile(RWX_BLOCK))
    assert spec["volumeMode"] == "Block" and spec["accessModes"] == ["ReadWriteMany"]


def test_named_class_and_user_modes_are_kept() -> None:
    storage = {"accessModes": ["ReadWriteOnce"], "volumeMode": "Filesystem",
               "storageClassName": "local", "selector": {"matchLabels": {"a": "b"}},
               "futureField": 1}
    spec = render(dv(storage), prof=profile(RWX_BLOCK))
    assert spec == {**storage, "resources": {"requests": {"storage": "1138166334"}}}


def test_pvc_is_used_verbatim() -> None:
    pvc = {"accessModes": ["ReadWriteOnce"], "volumeMode": "Filesystem",
           "resources": {"requests": {"storage": "1Gi"}}, "storageClassName": "other",
           "futureField": {"x": 1}}
    obj = dv()
    del obj["spec"]["storage"]
    obj["spec"]["pvc"] = copy.deepcopy(pvc)
    assert render(obj, prof=profile(RWX_BLOCK, minimum="4Gi"), overhead=0.5) == pvc


def test_minimum_size_raises_small_claims() -> None:
    assert requested(render(dv(), prof=profile(RWO_FS, minimum="4Gi"))) == "4Gi"
    assert requested(render(dv({"volumeMode": "Block"}), prof=profile(RWX_BLOCK, minimum="4Gi"))
                     ) == "4Gi"


def test_minimum_size_applies_after_inflation() -> None:
    # 1Gi inflates to 1138166334, above a 1.05Gi minimum: the minimum does not apply.
    assert requested(render(dv(), prof=profile(RWO_FS, minimum="1075Mi"))) == "1138166334"
    assert requested(render(dv(), prof=profile(RWO_FS, minimum="1086Mi"))) == "1086Mi"


def test_malformed_minimum_is_ignored() -> None:
    assert requested(render(dv(), prof=profile(RWO_FS, minimum="big"))) == "1138166334"


def test_no_storage_class_keeps_user_access_modes() -> None:
    spec = render(dv({"accessModes": ["ReadWriteOnce"]}), storage_class=None)
    assert "storageClassName" not in spec
    assert requested(spec) == "1138166334"


def test_archive_forces_filesystem() -> None:
    spec = render(dv(contentType="archive"), prof=profile(RWX_BLOCK, RWO_FS))
    assert spec["volumeMode"] == "Filesystem"
    assert spec["accessModes"] == ["ReadWriteOnce"]


def test_clone_without_size_leaves_sizing_to_the_clone() -> None:
    spec = render(dv(size=None, source={"pvc": {"namespace": "a", "name": "b"}}))
    assert "resources" not in spec
    spec = render(dv(size=None, source=None, sourceRef={"kind": "DataSource", "name": "f"}))
    assert "resources" not in spec


def test_input_is_not_modified() -> None:
    obj = dv({"volumeMode": "FromStorageProfile"})
    before = copy.deepcopy(obj)
    render(obj)
    assert obj == before


@pytest.mark.parametrize(("obj", "kwargs", "message"), [
    (dv(), {"prof": profile()}, "no accessMode specified in StorageProfile local"),
    (dv(), {"prof": profile({"volumeMode": "Block", "accessModes": []})},
     "no accessMode specified in StorageProfile local"),
    (dv({"volumeMode": "Block"}), {"prof": profile(RWO_FS)},
     "no matching accessMode specified in StorageProfile local"),
    (dv(), {"storage_class": None},
     "PVC spec is missing accessMode and no storageClass to choose profile"),
    (dv({"volumeMode": "Block"}, contentType="archive"), {},
     "ContentType Archive cannot have block volumeMode"),
    (dv(size=None), {}, "PVC Spec is not valid - missing storage size"),
    (dv(size="1000Ki"), {}, "PVC Spec is not valid - storage size should be at least 1MiB"),
    ({"kind": "DataVolume", "metadata": {"name": "disk"}, "spec": {}}, {},
     "datavolume one of {pvc, storage} field is required"),
])
def test_render_errors(obj: dict[str, Any], kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(errors.Invalid) as e:
        render(obj, **kwargs)
    assert e.value.message == message
    assert (e.value.kind, e.value.name) == ("DataVolume", "disk")


def test_missing_profile() -> None:
    with pytest.raises(errors.Invalid) as e:
        defaults.render_pvc_spec(dv(), storage_class=CLASS, profile=None, overhead=0.06)
    assert e.value.message == "no accessMode specified and cannot get StorageProfile local"
    with pytest.raises(errors.Invalid) as e:
        defaults.render_pvc_spec(dv({"volumeMode": "Block"}), storage_class=CLASS, profile=None,
                                 overhead=0.06)
    assert e.value.message == "no accessMode specified and cannot get StorageProfile local"


STATUS = {"filesystemOverhead": {"global": "0.08", "storageClass": {"local": "0.1", "fast": "0"}}}


@pytest.mark.parametrize(("status", "storage_class", "expected"), [
    (STATUS, "local", 0.1),
    (STATUS, "fast", 0.0),
    (STATUS, "other", 0.08),
    (STATUS, None, 0.08),
    (STATUS, "", 0.0),
    ({"filesystemOverhead": {"storageClass": {"local": "0.1"}}}, "other", 0.06),
    ({}, "local", 0.06),
    ({"filesystemOverhead": None}, "local", 0.06),
    ({"filesystemOverhead": {"global": "1"}}, "local", 1.0),
])
def test_filesystem_overhead(status: dict[str, Any], storage_class: str | None,
                             expected: float) -> None:
    assert defaults.filesystem_overhead(status, storage_class) == expected


@pytest.mark.parametrize("value", ["6%", "1.5", 0.06])
def test_filesystem_overhead_rejects_garbage(value: Any) -> None:
    with pytest.raises(ValueError, match="filesystem overhead"):
        defaults.filesystem_overhead({"filesystemOverhead": {"global": value}}, "local")
