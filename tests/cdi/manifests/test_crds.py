"""The CRDs come from the API models: checked in as generated, structural, taking CDI's manifests.

The checked-in ``charts/cdi/crds/`` must be what ``cdi.manifests.crds``
generates now (as ``docs/openapi.json`` must be what the server serves), every
schema must be one the API server accepts (structural: a type at every level,
no ``$ref``, no free ``anyOf``), and the DataVolume and StorageProfile
examples of the seeds must pass the generated schemas, as they pass our
models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from cdi.api.kinds import BY_KIND, CDI
from cdi.manifests import crds
from tests.cdi.api import seeds
from tests.cdi.manifests.chart import CHART

SEEDS = Path(__file__).resolve().parents[3] / ".." / "shared" / "seeds"
CHECKED_IN = CHART / "crds"
REGENERATE = "python -m cdi.manifests.crds charts/cdi/crds"
# Seed examples whose metadata is elided ("metadata:" then "# ..."): the API
# server refuses a null metadata whatever the schema, so these fail there only.
ELIDED_METADATA = {("004_48f0fc14cd7d1041.txt", 7948)}


def _schema(kind: str) -> dict[str, Any]:
    found: dict[str, Any] = crds.crd(BY_KIND[kind])["spec"]["versions"][0]["schema"][
        "openAPIV3Schema"]
    return found


def test_checked_in_crds_are_the_generated_ones() -> None:
    generated = {f"{c['metadata']['name']}.yaml": c for c in crds.crds()}
    on_disk = {p.name: yaml.safe_load(p.read_text()) for p in CHECKED_IN.glob("*.yaml")}
    assert sorted(on_disk) == sorted(generated), f"charts/cdi/crds is stale: {REGENERATE}"
    for name, crd in generated.items():
        assert on_disk[name] == crd, f"{name} is stale: {REGENERATE}"
        assert (CHECKED_IN / name).read_text() == crds.dump(crd)


def test_a_model_change_shows_as_drift(monkeypatch: pytest.MonkeyPatch) -> None:
    """The drift check looks at the models: a new field changes the generated CRD."""
    before = crds.crd(BY_KIND["CDIConfig"])
    from cdi.api import cdikinds

    class Wider(cdikinds.CDIConfigSpec):
        brand_new_setting: str | None = None

    class WiderConfig(cdikinds.CDIConfig):
        spec: Wider = Wider()

    monkeypatch.setitem(crds.objects.MODELS, "CDIConfig", WiderConfig)
    after = crds.crd(BY_KIND["CDIConfig"])
    assert after != before
    spec = after["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert spec["properties"]["brandNewSetting"] == {"type": "string"}


def test_every_served_cdi_kind_has_a_crd() -> None:
    stored = {k.kind for k in BY_KIND.values() if k.group == CDI}
    assert set(crds.CRD_KINDS) == stored
    for c in crds.crds():
        kind = BY_KIND[c["spec"]["names"]["kind"]]
        assert c["metadata"]["name"] == f"{kind.plural}.{CDI}"
        assert c["spec"]["scope"] == ("Namespaced" if kind.namespaced else "Cluster")
        (version,) = c["spec"]["versions"]
        assert version["name"] == "v1beta1" and version["served"] and version["storage"]
        assert version["subresources"] == {"status": {}}


def test_names_and_printer_columns_are_cdis() -> None:
    by_kind = {c["spec"]["names"]["kind"]: c for c in crds.crds()}
    names = {k: c["spec"]["names"].get("shortNames") for k, c in by_kind.items()}
    assert names["DataVolume"] == ["dv", "dvs"]
    assert names["DataSource"] == ["das"]
    assert names["DataImportCron"] == ["dic", "dics"]
    columns = by_kind["DataVolume"]["spec"]["versions"][0]["additionalPrinterColumns"]
    assert [(c["name"], c["type"], c["jsonPath"]) for c in columns] == [
        ("Phase", "string", ".status.phase"),
        ("Progress", "string", ".status.progress"),
        ("Restarts", "integer", ".status.restartCount"),
        ("Age", "date", ".metadata.creationTimestamp"),
    ]
    cron = by_kind["DataImportCron"]["spec"]["versions"][0]["additionalPrinterColumns"]
    assert cron[0]["jsonPath"] == ".status.sourceFormat"
    assert by_kind["StorageProfile"]["spec"]["scope"] == "Cluster"
    assert "all" in by_kind["DataVolume"]["spec"]["names"]["categories"]


def _structural_errors(node: Any, path: str, root: bool = False) -> list[str]:
    """What makes NODE not a structural schema (the rules the API server applies)."""
    errors = []
    if not isinstance(node, dict):
        return [f"{path}: not a schema"]
    if "$ref" in node:
        errors.append(f"{path}: $ref")
    int_or_string = node.get("x-kubernetes-int-or-string") is True
    if "anyOf" in node and not (int_or_string and node["anyOf"] == [
            {"type": "integer"}, {"type": "string"}]):
        errors.append(f"{path}: anyOf other than int-or-string")
    if "type" not in node and not int_or_string and \
            node.get("x-kubernetes-preserve-unknown-fields") is not True:
        errors.append(f"{path}: no type")
    if "properties" in node and "additionalProperties" in node:
        errors.append(f"{path}: properties and additionalProperties together")
    if node.get("type") == "array" and "items" not in node:
        errors.append(f"{path}: array without items")
    for key in ("default", "title", "$defs", "nullable"):
        if key in node:
            errors.append(f"{path}: {key}")
    for name, sub in (node.get("properties") or {}).items():
        errors.extend(_structural_errors(sub, f"{path}.{name}"))
    if isinstance(node.get("additionalProperties"), dict):
        errors.extend(_structural_errors(node["additionalProperties"], f"{path}.*"))
    if "items" in node:
        errors.extend(_structural_errors(node["items"], f"{path}[]"))
    if root:
        props = node["properties"]
        if props.get("metadata") != {"type": "object"}:
            errors.append("metadata: the root metadata must be left to the API server")
        if node.get("x-kubernetes-preserve-unknown-fields"):
            errors.append("the root keeps unknown fields")
    return errors


@pytest.mark.parametrize("kind", crds.CRD_KINDS)
def test_schemas_are_structural(kind: str) -> None:
    schema = _schema(kind)
    assert _structural_errors(schema, kind, root=True) == []
    jsonschema.Draft4Validator.check_schema(schema)


def test_the_structural_check_catches_what_the_api_server_refuses() -> None:
    bad = {"type": "object", "properties": {
        "metadata": {"type": "object"},
        "a": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        "b": {"$ref": "#/$defs/B"},
        "c": {"type": "object", "properties": {"x": {"type": "string"}},
              "additionalProperties": {"type": "string"}},
    }}
    found = _structural_errors(bad, "Bad", root=True)
    assert any("Bad.a: anyOf" in e for e in found)
    assert any("Bad.b: $ref" in e for e in found)
    assert any("Bad.c: properties and additionalProperties" in e for e in found)


def test_quantities_are_int_or_string_and_unknown_fields_are_kept() -> None:
    spec = _schema("DataVolume")["properties"]["spec"]
    storage = spec["properties"]["storage"]
    size = storage["properties"]["resources"]["properties"]["requests"]["additionalProperties"]
    assert size["x-kubernetes-int-or-string"] is True
    assert spec["x-kubernetes-preserve-unknown-fields"] is True
    validator = jsonschema.Draft4Validator(_schema("DataVolume"))
    for quantity in ("10Gi", 1073741824):
        dv = {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
              "metadata": {"name": "d"},
              "spec": {"source": {"blank": {}},
                       "storage": {"resources": {"requests": {"storage": quantity}}}}}
        assert list(validator.iter_errors(dv)) == []
    dv["spec"]["source"] = {"http": {"url": 5}}  # a number where a string belongs
    assert [e.json_path for e in validator.iter_errors(dv)] == ["$.spec.source.http.url"]


def test_seed_manifests_pass_the_generated_schemas() -> None:
    manifests = [m for path in sorted(SEEDS.glob("*.txt")) for m in seeds.extract(path)]
    checked = 0
    for m in manifests:
        kind = m.obj.get("kind")
        if kind not in crds.CRD_KINDS:
            continue
        errors = [f"{e.json_path}: {e.message}"
                  for e in jsonschema.Draft4Validator(_schema(kind)).iter_errors(m.obj)]
        if (m.file, m.line) in ELIDED_METADATA:
            assert errors == ["$.metadata: None is not of type 'object'"]
            continue
        assert errors == [], f"{m.file}:{m.line} {kind}: {errors}"
        checked += 1
    assert checked == 7, "the seeds' DataVolumes and StorageProfiles were not all found"
