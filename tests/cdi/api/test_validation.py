"""Admission: one row per CDI rule, accepted and refused, with CDI's exact message."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from cdi.api import errors, validation

SIZE = {"resources": {"requests": {"storage": "1Gi"}}}
STORAGE = {"storage": SIZE}
PVC = {"pvc": {"accessModes": ["ReadWriteOnce"], **SIZE}}
HTTP = {"http": {"url": "https://example.com/disk.qcow2"}}
SHA256 = "sha256:" + "ab" * 32
IMAGEIO = {"url": "https://engine.example.com/ovirt-engine/api", "diskId": "d1",
           "secretRef": "engine", "certConfigMap": "engine-ca"}
VDDK = {"url": "https://vcenter.example.com", "uuid": "u1", "backingFile": "[ds] vm/vm.vmdk",
        "thumbprint": "AA:BB", "secretRef": "vsphere"}
NAME_253 = "a" * 253
PVC_MODES = '"ReadOnlyMany", "ReadWriteMany", "ReadWriteOnce", "ReadWriteOncePod"'


def dv(spec: dict[str, Any], name: str = "disk") -> dict[str, Any]:
    return {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
            "metadata": {"name": name, "namespace": "ns"}, "spec": copy.deepcopy(spec)}


def storage(**fields: Any) -> dict[str, Any]:
    return {"storage": {**copy.deepcopy(SIZE), **fields}}


def size(quantity: str, target: str = "storage") -> dict[str, Any]:
    extra = {"accessModes": ["ReadWriteOnce"]} if target == "pvc" else {}
    return {target: {"resources": {"requests": {"storage": quantity}}, **extra}}


def rejected(obj: dict[str, Any], old: dict[str, Any] | None = None) -> str:
    with pytest.raises(errors.Invalid) as e:
        validation.validate(obj, old)
    assert e.value.code == 422
    assert e.value.causes, "every refusal names its causes"
    return e.value.message


ACCEPTED = {
    "http+storage": {"source": HTTP, **STORAGE},
    "http+pvc": {"source": HTTP, **PVC},
    "http checksum, any case": {"source": {"http": {**HTTP["http"],
                                                    "checksum": "SHA256:" + "AB" * 32}},
                                **STORAGE},
    "http checksums md5/sha1/sha512": {"source": {"http": {**HTTP["http"],
                                                           "checksum": "md5:" + "0" * 32}},
                                       **STORAGE},
    "http plain http": {"source": {"http": {"url": "http://10.0.0.1:8080/d.img"}}, **STORAGE},
    "http gs scheme": {"source": {"http": {"url": "gs://bucket/disk.img"}}, **STORAGE},
    "s3": {"source": {"s3": {"url": "https://s3.example.com/bucket/disk.img"}}, **STORAGE},
    "gcs": {"source": {"gcs": {"url": "gs://bucket/disk.img"}}, **STORAGE},
    "registry docker": {"source": {"registry": {"url": "docker://quay.io/fedora:40"}},
                        **STORAGE},
    "registry oci-archive": {"source": {"registry": {"url": "oci-archive:/images/f.tar"}},
                             **STORAGE},
    "registry kubevirt content": {"source": {"registry": {"url": "docker://q/f"}},
                                  "contentType": "kubevirt", **STORAGE},
    "registry imageStream+node": {"source": {"registry": {"imageStream": "fedora",
                                                          "pullMethod": "node"}}, **STORAGE},
    "registry pullMethod pod": {"source": {"registry": {"url": "docker://q/f",
                                                        "pullMethod": "pod"}}, **STORAGE},
    "upload": {"source": {"upload": {}}, **STORAGE},
    "blank": {"source": {"blank": {}}, **STORAGE},
    "archive http": {"source": HTTP, "contentType": "archive", **STORAGE},
    "imageio": {"source": {"imageio": IMAGEIO}, **STORAGE},
    "imageio insecure, no CA": {"source": {"imageio": {**IMAGEIO, "certConfigMap": None,
                                                       "insecureSkipVerify": True}},
                                **STORAGE},
    "vddk": {"source": {"vddk": VDDK}, **STORAGE},
    "pvc clone without size": {"source": {"pvc": {"namespace": "a", "name": "b"}},
                               "storage": {}},
    "snapshot clone without size": {"source": {"snapshot": {"namespace": "a", "name": "b"}},
                                    "storage": {}},
    "sourceRef without size": {"sourceRef": {"kind": "DataSource", "name": "fedora"},
                               "storage": {}},
    "size exactly 1Mi": {"source": HTTP, **size("1Mi")},
    "size as bytes": {"source": HTTP, **size("1048576")},
    "storage with several access modes": {"source": HTTP, **storage(
        accessModes=["ReadWriteMany", "ReadWriteOnce"])},
    "storage class name of 253": {"source": HTTP, **storage(storageClassName=NAME_253)},
    "externally populated": {"storage": {**SIZE, "dataSourceRef": {
        "apiGroup": "example.com", "kind": "Populator", "name": "p"}}},
    "externally populated from a PVC": {"pvc": {**PVC["pvc"], "dataSource": {
        "kind": "PersistentVolumeClaim", "name": "p"}}},
    "dataSource and dataSourceRef alike": {"storage": {
        **SIZE, "dataSource": {"apiGroup": "x.io", "kind": "P", "name": "p"},
        "dataSourceRef": {"apiGroup": "x.io", "kind": "P", "name": "p"}}},
}


@pytest.mark.parametrize("spec", ACCEPTED.values(), ids=ACCEPTED.keys())
def test_accepted(spec: dict[str, Any]) -> None:
    validation.validate(dv(spec))


REFUSED: dict[str, tuple[dict[str, Any], str]] = {
    # target
    "no pvc or storage": ({"source": HTTP}, "Missing Data volume PVC"),
    "pvc and storage": ({"source": HTTP, **PVC, **STORAGE},
                        "Duplicate storage definition, both target storage and target pvc "
                        "defined"),
    # size
    "storage size zero": ({"source": HTTP, **size("0")},
                          "Storage size can't be equal or less than zero"),
    "pvc size zero": ({"source": HTTP, **size("0Gi", "pvc")},
                      "PVC size can't be equal or less than zero"),
    "negative size": ({"source": HTTP, **size("-1Gi")},
                      "Storage size can't be equal or less than zero"),
    "size under 1MiB": ({"source": HTTP, **size("1023Ki")},
                        "Storage size should be at least 1MiB"),
    "pvc size under 1MiB": ({"source": HTTP, **size("1M", "pvc")},
                            "PVC size should be at least 1MiB"),
    "size missing for import": ({"source": HTTP, "storage": {}}, "Storage size is missing"),
    "size missing with pvc clone": ({"source": {"pvc": {"namespace": "a", "name": "b"}},
                                     "pvc": {"accessModes": ["ReadWriteOnce"]}},
                                    "PVC size is missing"),
    "size not a quantity": ({"source": HTTP, **size("lots")},
                            'Invalid value: "lots": quantities must match the regular '
                            "expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'"),
    "storage class name too long": ({"source": HTTP, **storage(storageClassName="a" * 254)},
                                    "Name cannot be longer than 253 characters"),
    # access modes
    "pvc without access mode": ({"source": HTTP, "pvc": SIZE},
                                "Required value: at least 1 access mode is required"),
    "pvc with two access modes": ({"source": HTTP, "pvc": {
        **SIZE, "accessModes": ["ReadWriteOnce", "ReadWriteMany"]}}, "PVC multiple accessModes"),
    "pvc unknown access mode": ({"source": HTTP, "pvc": {**SIZE, "accessModes": ["RWO"]}},
                                f'Unsupported value: "RWO": supported values: {PVC_MODES}'),
    "storage unknown access mode": ({"source": HTTP, **storage(
        accessModes=["ReadWriteOnce", "Shared"])},
        f'Unsupported value: "Shared": supported values: {PVC_MODES}'),
    # external population
    "external population with source": ({"source": HTTP, "storage": {**SIZE, "dataSourceRef": {
        "apiGroup": "x.io", "kind": "P", "name": "p"}}},
        "External population is incompatible with Source and SourceRef"),
    "dataSource and dataSourceRef differ": ({"storage": {
        **SIZE, "dataSource": {"apiGroup": "x.io", "kind": "P", "name": "p"},
        "dataSourceRef": {"apiGroup": "x.io", "kind": "P", "name": "q"}}},
        "DataSourceRef and DataSource must match"),
    "dataSource incomplete": ({"storage": {**SIZE, "dataSource": {"apiGroup": ""}}},
                              "Required value: DataSource name Required value: DataSource kind "
                              "Required value: DataSource apiGroup when kind is not "
                              "'PersistentVolumeClaim'"),
    "dataSourceRef with namespace": ({"storage": {**SIZE, "dataSourceRef": {
        "apiGroup": "x.io", "kind": "P", "name": "p", "namespace": "other"}}},
        "Invalid value: DataSourceRef namespace not supported"),
    "dataSourceRef without apiGroup": ({"storage": {**SIZE, "dataSourceRef": {
        "kind": "P", "name": "p"}}},
        "Required value: DataSourceRef apiGroup when kind is not 'PersistentVolumeClaim'"),
    # source XOR sourceRef
    "neither source nor sourceRef": (STORAGE, "Data volume should have either Source or "
                                              "SourceRef, or be externally populated"),
    "both source and sourceRef": ({"source": HTTP, "sourceRef": {"kind": "DataSource",
                                                                  "name": "f"}, **STORAGE},
                                  "Data volume should have either Source or SourceRef, or be "
                                  "externally populated"),
    "sourceRef without kind": ({"sourceRef": {"name": "f"}, **STORAGE},
                               "Missing sourceRef kind"),
    "sourceRef of another kind": ({"sourceRef": {"kind": "PersistentVolumeClaim", "name": "f"},
                                   **STORAGE},
                                  "Unsupported sourceRef kind PersistentVolumeClaim, currently "
                                  "only DataSource is supported"),
    "sourceRef without name": ({"sourceRef": {"kind": "DataSource"}, **STORAGE},
                               "Missing sourceRef name"),
    # one variant
    "empty source": ({"source": {}, **STORAGE}, "Missing Data volume source"),
    "unknown variant only": ({"source": {"glance": {}}, **STORAGE}, "Missing Data volume source"),
    "two variants": ({"source": {**HTTP, "blank": {}}, **STORAGE},
                     "Multiple Data volume sources"),
    "unknown content type": ({"source": HTTP, "contentType": "qcow2", **STORAGE},
                             "ContentType not one of: kubevirt, archive"),
    # URLs
    "http url empty": ({"source": {"http": {"url": ""}}, **STORAGE},
                       "spec.source source URL is empty"),
    "http url missing": ({"source": {"http": {}}, **STORAGE}, "spec.source source URL is empty"),
    "http url not absolute": ({"source": {"http": {"url": "example.com/d.img"}}, **STORAGE},
                              "spec.source Invalid source URL: example.com/d.img"),
    "http url with space in host": ({"source": {"http": {"url": "http://exa mple.com/d"}},
                                     **STORAGE},
                                    "spec.source Invalid source URL: http://exa mple.com/d"),
    "http url scheme": ({"source": {"http": {"url": "ftp://example.com/d"}}, **STORAGE},
                        "spec.source Invalid source URL scheme: ftp://example.com/d"),
    "s3 url scheme": ({"source": {"s3": {"url": "s3://bucket/d"}}, **STORAGE},
                      "spec.source Invalid source URL scheme: s3://bucket/d"),
    "gcs url empty": ({"source": {"gcs": {"url": ""}}, **STORAGE},
                      "spec.source source URL is empty"),
    # checksum
    "checksum without algorithm": ({"source": {"http": {**HTTP["http"], "checksum": "ab" * 16}},
                                    **STORAGE},
                                   "Invalid checksum format: invalid checksum format: expected "
                                   f"'algorithm:hash', got '{'ab' * 16}'"),
    "checksum empty hash": ({"source": {"http": {**HTTP["http"], "checksum": "md5: "}},
                             **STORAGE},
                            "Invalid checksum format: checksum hash value cannot be empty"),
    "checksum unknown algorithm": ({"source": {"http": {**HTTP["http"],
                                                        "checksum": "CRC32:abcd"}}, **STORAGE},
                                   "Invalid checksum format: unsupported hash algorithm 'crc32': "
                                   "supported algorithms are: md5, sha1, sha256, sha512"),
    "checksum wrong length": ({"source": {"http": {**HTTP["http"],
                                                   "checksum": "sha1:" + "a" * 39}}, **STORAGE},
                              "Invalid checksum format: invalid sha1 hash length: expected 40 "
                              "hex characters, got 39"),
    "checksum sha512 length": ({"source": {"http": {**HTTP["http"],
                                                    "checksum": "sha512:" + "a" * 64}},
                                **STORAGE},
                               "Invalid checksum format: invalid sha512 hash length: expected "
                               "128 hex characters, got 64"),
    "checksum not hex": ({"source": {"http": {**HTTP["http"], "checksum": "md5:" + "g" * 32}},
                          **STORAGE},
                         "Invalid checksum format: checksum hash is not valid hexadecimal: "
                         "encoding/hex: invalid byte: U+0067 'g'"),
    "url and checksum both wrong": ({"source": {"http": {"url": "", "checksum": "x:y"}},
                                     **STORAGE},
                                    "spec.source source URL is empty Invalid checksum format: "
                                    "unsupported hash algorithm 'x': supported algorithms are: "
                                    "md5, sha1, sha256, sha512"),
    # content type per source
    "blank archive": ({"source": {"blank": {}}, "contentType": "archive", **STORAGE},
                      "SourceType cannot be blank and the contentType be archive"),
    "registry archive": ({"source": {"registry": {"url": "docker://q/f"}},
                          "contentType": "archive", **STORAGE},
                         "ContentType must be kubevirt when Source is Registry"),
    "imageio archive": ({"source": {"imageio": IMAGEIO}, "contentType": "archive", **STORAGE},
                        "ContentType must be kubevirt when Source is ImageIO"),
    # registry
    "registry url and imageStream": ({"source": {"registry": {
        "url": "docker://q/f", "imageStream": "f", "pullMethod": "node"}}, **STORAGE},
        "Source registry should have either URL or ImageStream"),
    "registry neither url nor imageStream": ({"source": {"registry": {}}, **STORAGE},
                                             "Source registry should have either URL or "
                                             "ImageStream"),
    "registry url without scheme": ({"source": {"registry": {"url": "quay.io/fedora"}},
                                     **STORAGE},
                                    "Illegal registry source URL scheme quay.io/fedora"),
    "registry url http": ({"source": {"registry": {"url": "https://quay.io/fedora"}},
                           **STORAGE}, "Illegal registry source URL scheme https://quay.io/fedora"),
    "registry url unparsable": ({"source": {"registry": {"url": "docker://q/%zz"}}, **STORAGE},
                                "Illegal registry source URL docker://q/%zz"),
    "registry pull method": ({"source": {"registry": {"url": "docker://q/f",
                                                      "pullMethod": "always"}}, **STORAGE},
                             'ImportMethod always is neither pod, node or ""'),
    "registry empty imageStream": ({"source": {"registry": {"imageStream": "",
                                                            "pullMethod": "node"}}, **STORAGE},
                                   "Source registry ImageStream is not valid"),
    "registry imageStream with pod pull": ({"source": {"registry": {"imageStream": "f"}},
                                            **STORAGE},
                                           "Source registry ImageStream is supported only with "
                                           "node pull import method"),
    # imageio / vddk
    "imageio without diskId": ({"source": {"imageio": {**IMAGEIO, "diskId": ""}}, **STORAGE},
                               "spec.source.Imageio source Imageio is not valid"),
    "imageio without secret": ({"source": {"imageio": {**IMAGEIO, "secretRef": None}},
                                **STORAGE}, "spec.source.Imageio source Imageio is not valid"),
    "imageio without CA": ({"source": {"imageio": {**IMAGEIO, "certConfigMap": ""}}, **STORAGE},
                           "spec.source.Imageio source Imageio requires CertConfigMap or "
                           "InsecureSkipVerify"),
    "imageio url": ({"source": {"imageio": {**IMAGEIO, "url": "engine"}}, **STORAGE},
                    "spec.source Invalid source URL: engine"),
    "vddk without thumbprint": ({"source": {"vddk": {**VDDK, "thumbprint": ""}}, **STORAGE},
                                "spec.source.VDDK source VDDK is not valid"),
    "vddk without uuid": ({"source": {"vddk": {**VDDK, "uuid": None}}, **STORAGE},
                          "spec.source.VDDK source VDDK is not valid"),
    "vddk without url": ({"source": {"vddk": {**VDDK, "url": ""}}, **STORAGE},
                         "spec.source source URL is empty"),
    # clone sources
    "pvc clone without name": ({"source": {"pvc": {"namespace": "a"}}, "storage": {}},
                               "spec.source.PVC source PVC is not valid"),
    "snapshot clone without name": ({"source": {"snapshot": {"namespace": "a"}}, "storage": {}},
                                    "spec.source.Snapshot source snapshot is not valid"),
}


@pytest.mark.parametrize(("spec", "message"), REFUSED.values(), ids=REFUSED.keys())
def test_refused(spec: dict[str, Any], message: str) -> None:
    assert rejected(dv(spec)) == message


def test_name_length() -> None:
    validation.validate(dv({"source": HTTP, **STORAGE}, name=NAME_253))
    assert rejected(dv({"source": HTTP, **STORAGE}, name=NAME_253 + "a")) == \
        "Name cannot be longer than 253 characters"


def test_refusal_names_kind_object_and_field() -> None:
    with pytest.raises(errors.Invalid) as e:
        validation.validate(dv({"source": {}, **STORAGE}))
    assert (e.value.kind, e.value.name) == ("DataVolume", "disk")
    assert e.value.causes == [{"reason": "FieldValueInvalid",
                               "message": "Missing Data volume source", "field": "spec.source"}]
    assert e.value.status()["details"]["causes"] == e.value.causes


def test_malformed_object_is_invalid_not_a_crash() -> None:
    bad = dv({"source": {"http": {"url": ["not", "a", "string"]}}, **STORAGE})
    with pytest.raises(errors.Invalid, match=r"spec\.source\.http\.url"):
        validation.validate(bad)


def test_kinds_without_rules_pass() -> None:
    validation.validate({"kind": "Pod", "spec": "not even a mapping"})
    validation.validate({"kind": "DataSource", "spec": {"source": {}}})
    validation.validate({})


# --- Immutability ----------------------------------------------------------------------------


def test_update_may_change_everything_but_the_spec() -> None:
    old = dv({"source": HTTP, **STORAGE})
    new = copy.deepcopy(old)
    new["metadata"]["labels"] = {"a": "b"}
    new["status"] = {"phase": "Succeeded"}
    validation.validate(new, old)


@pytest.mark.parametrize(("change", "path"), [
    ("https://example.com/other.qcow2", ("source", "http", "url")),
    ("2Gi", ("storage", "resources", "requests", "storage")),
    (True, ("preallocation",)),
    ("x", ("unknownSpecField",)),
])
def test_update_of_spec_is_refused(change: Any, path: tuple[str, ...]) -> None:
    old = dv({"source": HTTP, **STORAGE})
    new = copy.deepcopy(old)
    node = new["spec"]
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = change
    assert rejected(new, old) == "Cannot update DataVolume Spec"


def test_update_compares_specs_semantically() -> None:
    old = dv({"source": HTTP, "storage": {"resources": {"requests": {"storage": "1Gi"}}},
              "finalCheckpoint": False, "contentType": ""})
    new = dv({"source": HTTP, "storage": {"resources": {"requests": {"storage": "1024Mi"}}}})
    validation.validate(new, old)


def test_update_validates_the_new_object_too() -> None:
    old = dv({"source": HTTP, **STORAGE})
    new = dv({"source": HTTP, **STORAGE}, name=NAME_253 + "a")
    assert rejected(new, old) == "Name cannot be longer than 253 characters"


@pytest.mark.parametrize("source", [{"vddk": VDDK}, {"imageio": IMAGEIO}])
def test_warm_import_may_add_checkpoints(source: dict[str, Any]) -> None:
    old = dv({"source": source, **STORAGE, "checkpoints": [{"previous": "", "current": "s1"}]})
    new = copy.deepcopy(old)
    new["spec"]["checkpoints"].append({"previous": "s1", "current": "s2"})
    new["spec"]["finalCheckpoint"] = True
    validation.validate(new, old)
    new["spec"]["source"] = copy.deepcopy(source)
    new["spec"]["source"][next(iter(source))]["url"] = "https://elsewhere.example.com"
    assert rejected(new, old) == "Cannot update DataVolume Spec"


def test_checkpoint_changes_are_refused_for_other_sources() -> None:
    old = dv({"source": HTTP, **STORAGE, "checkpoints": [{"previous": "", "current": "s1"}]})
    new = copy.deepcopy(old)
    new["spec"]["finalCheckpoint"] = True
    assert rejected(new, old) == "Cannot update DataVolume Spec"


# --- DataImportCron --------------------------------------------------------------------------


def cron(name: str = "fedora", **spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "template": {"spec": {"source": {"registry": {"url": "docker://quay.io/fedora"}},
                              **copy.deepcopy(STORAGE)}},
        "schedule": "0 */12 * * *",
        "managedDataSource": "fedora",
    }
    base.update(spec)
    return {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataImportCron",
            "metadata": {"name": name, "namespace": "ns"},
            "spec": {k: v for k, v in base.items() if v is not None}}


def template(**spec: Any) -> dict[str, Any]:
    return {"spec": {"source": {"registry": {"url": "docker://q/f"}}, **STORAGE, **spec}}


CRON_ACCEPTED = {
    "registry": {},
    "http source (polled by ETag/Last-Modified, beyond CDI)": {
        "template": {"spec": {"source": HTTP, **STORAGE}}},
    "pvc source": {"template": {"spec": {"source": {"pvc": {"namespace": "a", "name": "b"}},
                                         "storage": {}}}},
    "no polling": {"schedule": ""},
    "descriptor": {"schedule": "@daily"},
    "keep none": {"importsToKeep": 0},
    "garbage collect never": {"garbageCollect": "Never"},
    "managed data source of 63": {"managedDataSource": "d" * 63},
}


@pytest.mark.parametrize("spec", CRON_ACCEPTED.values(), ids=CRON_ACCEPTED.keys())
def test_cron_accepted(spec: dict[str, Any]) -> None:
    validation.validate(cron(**spec))
    validation.validate(cron(name="c" * 63, **spec))


CRON_REFUSED: dict[str, tuple[dict[str, Any], str]] = {
    "s3 source": ({"template": {"spec": {"source": {"s3": {"url": "https://s3.example/b/d"}},
                                         **STORAGE}}}, "Missing source"),
    "no source": ({"template": {"spec": STORAGE}}, "Missing source"),
    "sourceRef": ({"template": template(sourceRef={"kind": "DataSource", "name": "x"})},
                  "Unsettable fields: SourceRef, ContentType, Checkpoints, FinalCheckpoint"),
    "contentType": ({"template": template(contentType="kubevirt")},
                    "Unsettable fields: SourceRef, ContentType, Checkpoints, FinalCheckpoint"),
    "checkpoints": ({"template": template(checkpoints=[{"previous": "", "current": "a"}])},
                    "Unsettable fields: SourceRef, ContentType, Checkpoints, FinalCheckpoint"),
    "finalCheckpoint": ({"template": template(finalCheckpoint=True)},
                        "Unsettable fields: SourceRef, ContentType, Checkpoints, FinalCheckpoint"),
    "template rules, Template prefix": ({"template": {"spec": {"source": {"pvc": {"name": "b"}},
                                                               "storage": {}}}},
                                        "Template.source.PVC source PVC is not valid"),
    "template without target": ({"template": {"spec": {"source": {"registry": {
        "url": "docker://q/f"}}}}}, "Missing Data volume PVC"),
    "schedule out of range": ({"schedule": "61 * * * *"}, "Illegal cron schedule"),
    "schedule with four fields": ({"schedule": "* * * *"}, "Illegal cron schedule"),
    "schedule with seconds": ({"schedule": "0 * * * * *"}, "Illegal cron schedule"),
    "schedule missing": ({"schedule": None}, "spec.schedule: Required value"),
    "importsToKeep negative": ({"importsToKeep": -1}, "Illegal ImportsToKeep value"),
    "garbageCollect unknown": ({"garbageCollect": "Sometimes"}, "Illegal GarbageCollect value"),
    "managedDataSource missing": ({"managedDataSource": None}, "Illegal ManagedDataSource value"),
    "managedDataSource empty": ({"managedDataSource": ""}, "Illegal ManagedDataSource value"),
    "managedDataSource too long": ({"managedDataSource": "d" * 64},
                                   "Name cannot be longer than 63 characters"),
}


@pytest.mark.parametrize(("spec", "message"), CRON_REFUSED.values(), ids=CRON_REFUSED.keys())
def test_cron_refused(spec: dict[str, Any], message: str) -> None:
    assert rejected(cron(**spec)) == message


def test_cron_name_length() -> None:
    assert rejected(cron(name="c" * 64)) == "Name cannot be longer than 63 characters"


def test_cron_spec_is_immutable() -> None:
    old = cron()
    validation.validate(copy.deepcopy(old), old)
    assert rejected(cron(schedule="@hourly"), old) == "Cannot update DataImportCron Spec"
    # an update is judged on immutability alone, as CDI's webhook does
    validation.validate(cron(importsToKeep=-1), cron(importsToKeep=-1))


# --- StorageProfile, CDIConfig, CDI ---------------------------------------------------------


def profile(*sets: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "StorageProfile",
            "metadata": {"name": "local"}, "spec": {"claimPropertySets": list(sets)}}


RWO_FS = {"accessModes": ["ReadWriteOnce"], "volumeMode": "Filesystem"}


def test_profile_accepted() -> None:
    validation.validate(profile(*[RWO_FS] * 8))
    validation.validate(profile({"accessModes": list(
        ("ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod")),
        "volumeMode": "Block"}))
    validation.validate({"kind": "StorageProfile", "spec": {}})


@pytest.mark.parametrize(("sets", "message"), [
    ([RWO_FS] * 9, "spec.claimPropertySets: Too many: 9: must have at most 8 items"),
    ([{"volumeMode": "Block"}], "spec.claimPropertySets[0].accessModes: Required value"),
    ([RWO_FS, {"accessModes": ["ReadWriteOnce"]}],
     "spec.claimPropertySets[1].volumeMode: Required value"),
    ([{"accessModes": ["ReadWriteOnce"], "volumeMode": "Fs"}],
     'spec.claimPropertySets[0].volumeMode: Unsupported value: "Fs": supported values: '
     '"Block", "Filesystem"'),
    ([{"accessModes": ["RWO"], "volumeMode": "Block"}],
     'spec.claimPropertySets[0].accessModes: Invalid value: "array": Illegal AccessMode'),
    ([{"accessModes": ["ReadWriteOnce"] * 5, "volumeMode": "Block"}],
     "spec.claimPropertySets[0].accessModes: Too many: 5: must have at most 4 items"),
    ([{}], "spec.claimPropertySets[0].accessModes: Required value "
           "spec.claimPropertySets[0].volumeMode: Required value"),
])
def test_profile_refused(sets: list[dict[str, Any]], message: str) -> None:
    assert rejected(profile(*sets)) == message


def config(overhead: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "CDIConfig",
            "metadata": {"name": "config"}, "spec": {"filesystemOverhead": overhead}}


PATTERN = r"'^(0(?:\.\d{1,3})?|1)$'"


@pytest.mark.parametrize("value", ["0", "1", "0.06", "0.055", "0.5", "0.999"])
def test_overhead_accepted(value: str) -> None:
    validation.validate(config({"global": value, "storageClass": {"local": value}}))


@pytest.mark.parametrize("value", ["1.0", "0.0555", "2", ".5", "-0.1", "0.", "", "5%"])
def test_overhead_refused(value: str) -> None:
    path = "spec.filesystemOverhead.global"
    assert rejected(config({"global": value})) == \
        f'{path}: Invalid value: "{value}": {path} in body should match {PATTERN}'
    path = "spec.filesystemOverhead.storageClass.local"
    assert rejected(config({"storageClass": {"local": value, "fast": "0.1"}})) == \
        f'{path}: Invalid value: "{value}": {path} in body should match {PATTERN}'


def test_cdi_resource_overhead() -> None:
    cdi: dict[str, Any] = {"kind": "CDI", "metadata": {"name": "cdi"},
                           "spec": {"config": {"filesystemOverhead": {"global": "0.06"}}}}
    validation.validate(cdi)
    cdi["spec"]["config"]["filesystemOverhead"]["global"] = "6%"
    path = "spec.config.filesystemOverhead.global"
    assert rejected(cdi) == f'{path}: Invalid value: "6%": {path} in body should match {PATTERN}'


def test_clone_source_namespace_defaults_to_the_datavolumes() -> None:
    """CDI's mutating webhook fills it in before validation."""
    dv = {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
          "metadata": {"name": "x", "namespace": "team"},
          "spec": {"source": {"pvc": {"name": "golden"}},
                   "storage": {"resources": {"requests": {"storage": "1Gi"}}}}}
    validation.validate(dv)
    assert dv["spec"]["source"]["pvc"] == {"name": "golden", "namespace": "team"}
