"""The CDI manifests printed in product documentation load into our models and pass admission.

The seed files live in ``shared/seeds`` beside the repository (``/work/shared``
for ``/work/main``; CI checks ``shared/`` out next to the clone).  See
``tests/cdi/api/seeds.py`` for exactly what is cleaned off the examples.
"""

from __future__ import annotations

import collections
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from cdi.api import errors, objects, validation
from tests.cdi.api import seeds

SEEDS = Path(__file__).resolve().parents[3] / ".." / "shared" / "seeds"

# Manifests per kind the seed files hold today.  The count is pinned so that a
# broken extractor (finding nothing, or half) fails instead of passing vacuously.
EXPECTED = {"DataVolume": 4, "StorageProfile": 4, "DataImportCron": 0}

# Examples whose elided part ("# ...") is required content: they are correct
# documentation of one field but not complete objects.  Each must fail with
# exactly this message; anything else failing is a bug.
ELIDED = {
    # "Multus network annotation example": only metadata is shown, spec is "# ...".
    ("004_48f0fc14cd7d1041.txt", "DataVolume", "datavolume-example"): "Missing Data volume PVC",
}


def _manifests() -> list[seeds.Manifest]:
    assert SEEDS.is_dir(), f"seed directory {SEEDS} is missing"
    files = sorted(SEEDS.glob("*.txt"))
    assert files, f"no seed files in {SEEDS}"
    return [m for path in files for m in seeds.extract(path)]


def _per_file(found: list[seeds.Manifest]) -> str:
    counts: dict[str, collections.Counter[str]] = {
        p.name: collections.Counter() for p in sorted(SEEDS.glob("*.txt"))}
    for m in found:
        counts[m.file][m.obj["kind"]] += 1
    return "; ".join(f"{name}: {dict(c) or 0}" for name, c in counts.items())


def _without_nulls(value: Any) -> Any:
    """``metadata: null`` (a body elided to "# ...") reads as absent, like any JSON null."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def test_seed_manifests_are_found() -> None:
    found = _manifests()
    by_kind = collections.Counter(m.obj["kind"] for m in found)
    assert {kind: by_kind[kind] for kind in EXPECTED} == EXPECTED, _per_file(found)
    assert len(found) == sum(EXPECTED.values()) > 0, _per_file(found)


def test_seed_manifests_load_and_pass_admission() -> None:
    found = _manifests()
    assert found, _per_file(found)
    failures = []
    for m in found:
        where = f"{m.file}:{m.line} {m.obj['kind']} {m.obj.get('metadata', {}) or {}}"
        try:
            model = objects.load(m.obj)
        except errors.APIError as e:
            failures.append(f"{where}: does not load: {e.message}")
            continue
        if objects.dump(model) != _without_nulls(m.obj):
            failures.append(f"{where}: changes on a round trip")
        key = (m.file, m.obj["kind"], model.name)
        try:
            validation.validate(m.obj)
        except errors.Invalid as e:
            if ELIDED.get(key) != e.message:
                failures.append(f"{where}: refused: {e.message}")
        else:
            if key in ELIDED:
                failures.append(f"{where}: expected refusal {ELIDED[key]!r}, was accepted")
    assert not failures, "\n".join(failures) + "\n" + _per_file(found)


# HyperConverged ``dataImportCronTemplates`` entries (seeds 8.3).  Two only override
# fields of a system-defined template that the product merges them into (the storage
# class, the enable annotation); alone they are not crons, and are refused as CDI refuses
# them.  Every other entry must be accepted.
CRON_TEMPLATES = 5
CRON_FRAGMENTS = {
    ("004_48f0fc14cd7d1041.txt", 7829, "rhel8-image-cron"): "Missing source",
    ("004_48f0fc14cd7d1041.txt", 7988, "rhel8-image-cron"): "Missing source",
}


def test_hyperconverged_cron_templates_pass_admission() -> None:
    found = [m for path in sorted(SEEDS.glob("*.txt")) for m in seeds.cron_templates(path)]
    assert len(found) == CRON_TEMPLATES, [(m.file, m.line) for m in found]
    outcome = {}
    for m in found:
        key = (m.file, m.line, m.obj["metadata"]["name"])
        try:
            objects.load(m.obj)
            validation.validate(m.obj)
            outcome[key] = "accepted"
        except errors.APIError as e:
            outcome[key] = e.message
    assert {k: v for k, v in outcome.items() if v != "accepted"} == CRON_FRAGMENTS
    assert sum(v == "accepted" for v in outcome.values()) == CRON_TEMPLATES - 2


def test_elided_exceptions_still_exist() -> None:
    keys = {(m.file, m.obj["kind"], (m.obj.get("metadata") or {}).get("name", ""))
            for m in _manifests()}
    assert set(ELIDED) <= keys


# --- The cleaner itself ----------------------------------------------------------------------

PAGE = """\
流程

  1. 创建 DataVolume 清单:

    apiVersion: cdi.kubevirt.io/v1beta1
    kind: DataVolume
    metadata:
      name: <datavolume> 1
    spec:
      source: 2
        registry:
          url: <image_url> 3
      storage:
        accessModes:
        - ReadWriteOnce 4
        volumeMode:
          Block 5
        resources:
          requests:
            storage: <2Gi> 6
    # ...
    1
    指定新数据卷的名称。
  2. 运行以下命令:

apiVersion: cdi.kubevirt.io/v1beta1
kind: DataImportCron
metadata:
  name: cron
spec:
  template:
    spec:
      source:
        pvc:
          namespace: "<source_namespace>" 1
          name: golden
      storage: {}
  schedule: "0 * * * *"
  importsToKeep: 3
  managedDataSource: <data_source> 2
---
apiVersion: v1
kind: ConfigMap
data: {a: b}
说明文字
"""


def test_extract_cleans_a_page(tmp_path: Path) -> None:
    page = tmp_path / "page.txt"
    page.write_text(PAGE, encoding="utf-8")
    found = seeds.extract(page)
    assert [(m.line, m.obj["kind"]) for m in found] == [(5, "DataVolume"),
                                                         (26, "DataImportCron")]
    assert found[0].obj == {
        "apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
        "metadata": {"name": "datavolume"},
        "spec": {"source": {"registry": {"url": "docker://registry.example.com/image-url:latest"}},
                 "storage": {"accessModes": ["ReadWriteOnce"], "volumeMode": "Block",
                             "resources": {"requests": {"storage": "2Gi"}}}},
    }
    spec = found[1].obj["spec"]
    assert spec["importsToKeep"] == 3, "a value is not a callout"
    assert spec["managedDataSource"] == "data-source"
    assert spec["template"]["spec"]["source"]["pvc"]["namespace"] == "source-namespace"
    for m in found:
        validation.validate(m.obj)


@pytest.mark.parametrize(("block", "cleaned"), [
    ("a:\n  b: 1 1\n  c: 2", "a:\n  b: 1\n  c: 2"),  # callout after a value
    ("a: 1\nb: 2", "a: 1\nb: 2"),  # values that look like callouts stay
    ("a: 1\n  b: x", "a:\n  b: x"),  # callout on a key opening a block
    ("a: 1\n- x", "a:\n- x"),  # ... or opening a list at its own indentation
    ("a: 2 1\nb: 3 2\nc: 7", "a: 2\nb: 3\nc: 7"),  # only 1, 2, 3, ... in sequence
    ("a: x 2\nb: y 1", "a: x 2\nb: y"),  # out of sequence: not a callout
    ("a:\n  - RWO 1\n  - RWX 2", "a:\n  - RWO\n  - RWX"),
    ("a:\n  Filesystem 1", "a:\n  Filesystem"),  # bare scalar continuing the key
    ("a: 1\n# ...\nb: 2", "a: 1\nb: 2"),  # ellipsis lines go
    ("# a comment 1\nb: c", "# a comment 1\nb: c"),  # comments are left alone
])
def test_clean_lines(block: str, cleaned: str) -> None:
    assert "\n".join(seeds.clean_lines(block.splitlines())) == cleaned
    yaml.safe_load(cleaned)


@pytest.mark.parametrize(("path", "text", "sample"), [
    (("spec", "storage", "resources", "requests", "storage"), "2Gi", "2Gi"),
    (("spec", "storage", "resources", "requests", "storage"), "size", "1Gi"),
    (("spec", "source", "registry", "url"), "image_url",
     "docker://registry.example.com/image-url:latest"),
    (("spec", "source", "http", "url"), "Image URL", "https://images.example.com/image-url.img"),
    (("metadata", "name"), "My_VM_Disk", "my-vm-disk"),
    (("status", "provisioner"), "unknown_provisioner", "unknown-provisioner"),
    (("metadata", "name"), "名前", "example"),
])
def test_sample_for(path: tuple[str, ...], text: str, sample: str) -> None:
    assert seeds.sample_for(path, text) == sample


def test_fill_placeholders_touches_only_whole_placeholders() -> None:
    doc = yaml.safe_load(textwrap.dedent("""\
        metadata: {name: <vm_name>, annotations: {k: "a <b> c"}}
        spec: {list: [<one>, two], n: 3}
    """))
    assert seeds.fill_placeholders(doc) == {
        "metadata": {"name": "vm-name", "annotations": {"k": "a <b> c"}},
        "spec": {"list": ["one", "two"], "n": 3}}
