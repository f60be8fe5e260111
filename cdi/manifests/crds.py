"""CustomResourceDefinitions for the CDI kinds, generated from the API models.

On Kubernetes the API server, not ``cdi serve``, stores DataVolumes and the
other CDI kinds, so it needs a CRD per kind; hand-written CRDs would drift from
the pydantic models the controllers and the webhook use.  Each CRD here comes
from the same two sources as ``docs/openapi.json``: the KINDS table (group,
plural, scope, short names) and the model's JSON schema, rewritten into the
*structural* schema ``apiextensions.k8s.io/v1`` demands:

- ``$ref``s are inlined (CRDs may not reference);
- ``X | None`` becomes ``X`` (absent and null mean the same to the models);
- ``str | int`` quantities become ``x-kubernetes-int-or-string``;
- a model that keeps unknown fields (``extra="allow"``, every API model: a
  manifest written for KubeVirt CDI must survive unchanged) gets
  ``x-kubernetes-preserve-unknown-fields``, so the API server keeps what we
  do not model instead of pruning it;
- the root ``metadata`` is left to the API server (``type: object``).

The checked-in copies under ``charts/cdi/crds/`` are what Helm installs; a
test fails when they differ from ``crds()``.  Regenerate them with

    python -m cdi.manifests.crds charts/cdi/crds

Printer columns, categories and short names follow CDI's CRDs (DataVolume:
Phase, Progress, Restarts, Age).  Every kind gets the status subresource,
because the controllers write status through ``/status`` on both backends.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import yaml

from cdi.api import objects
from cdi.api.kinds import BY_KIND, CDI, Kind

Obj = dict[str, Any]

# The kinds stored as CRDs, in install order.  UploadTokenRequest is served by
# the aggregated apiserver (an APIService), not stored; the populator sources and
# ObjectTransfer have no models yet and are not served.
CRD_KINDS = ("DataVolume", "DataSource", "DataImportCron", "StorageProfile", "CDIConfig", "CDI")

# CDI's extra printer columns; every CRD ends with Age unless its columns say otherwise.
_AGE = {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
PRINTER_COLUMNS: dict[str, list[Obj]] = {
    "DataVolume": [
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase",
         "description": "The phase the DataVolume is in"},
        {"name": "Progress", "type": "string", "jsonPath": ".status.progress",
         "description": "Transfer progress in percent if known, N/A otherwise"},
        {"name": "Restarts", "type": "integer", "jsonPath": ".status.restartCount",
         "description": "How many times the worker restarted"},
        _AGE,
    ],
    "DataImportCron": [
        {"name": "Format", "type": "string", "jsonPath": ".status.sourceFormat",
         "description": "How the imported sources are kept (pvc or snapshot)"},
        _AGE,
    ],
    "CDI": [_AGE, {"name": "Phase", "type": "string", "jsonPath": ".status.phase"}],
}
# Kinds that show under ``kubectl get all``.
CATEGORIES = {"DataVolume": ["all"], "DataSource": ["all"], "DataImportCron": ["all"]}
LABELS = {"cdi.kubevirt.io": "", "app.kubernetes.io/component": "storage",
          "app.kubernetes.io/part-of": "cdi"}

_DROP = frozenset({"title", "default", "$defs"})
_PRESERVE = "x-kubernetes-preserve-unknown-fields"


def crds() -> list[Obj]:
    """Every CRD, in install order."""
    return [crd(BY_KIND[name]) for name in CRD_KINDS]


def crd(kind: Kind) -> Obj:
    """The CRD of one kind."""
    assert kind.group == CDI, kind
    version: Obj = {
        "name": kind.version,
        "served": True,
        "storage": True,
        "schema": {"openAPIV3Schema": schema(kind)},
        "subresources": {"status": {}},
    }
    if kind.kind in PRINTER_COLUMNS:
        version["additionalPrinterColumns"] = copy.deepcopy(PRINTER_COLUMNS[kind.kind])
    names: Obj = {"kind": kind.kind, "listKind": f"{kind.kind}List", "plural": kind.plural,
                  "singular": kind.singular}
    if kind.short_names:
        names["shortNames"] = list(kind.short_names)
    if kind.kind in CATEGORIES:
        names["categories"] = list(CATEGORIES[kind.kind])
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{kind.plural}.{kind.group}", "labels": dict(LABELS)},
        "spec": {
            "group": kind.group,
            "names": names,
            "scope": "Namespaced" if kind.namespaced else "Cluster",
            "versions": [version],
        },
    }


def schema(kind: Kind) -> Obj:
    """The structural openAPIV3Schema of KIND, from its model."""
    model = objects.MODELS[kind.kind]
    raw = model.model_json_schema(mode="validation", by_alias=True)
    defs = raw.get("$defs", {})
    root = _structural(raw, defs, ())
    props = root.setdefault("properties", {})
    props["apiVersion"] = {"type": "string"}
    props["kind"] = {"type": "string"}
    props["metadata"] = {"type": "object"}
    # The top level is the object itself: unknown top-level fields are not kept
    # (Kubernetes would reject them in any case).
    root.pop(_PRESERVE, None)
    return root


def _structural(node: Obj, defs: Obj, seen: tuple[str, ...]) -> Obj:
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[1]
        if name in seen:  # a recursive type: keep the value, check nothing below
            return {"type": "object", _PRESERVE: True}
        inlined = _structural(defs[name], defs, (*seen, name))
        if "description" in node:
            inlined["description"] = node["description"]
        return inlined
    if "anyOf" in node:
        return _union([b for b in node["anyOf"] if b.get("type") != "null"], node, defs, seen)
    out: Obj = {k: v for k, v in node.items()
                if k not in _DROP and k not in ("properties", "items", "additionalProperties")}
    if node.get("type") == "array":
        out["items"] = _structural(node.get("items", {}), defs, seen)
    elif node.get("type") == "object" or "properties" in node:
        out["type"] = "object"
        props = node.get("properties") or {}
        extra = node.get("additionalProperties")
        if props:
            out["properties"] = {k: _structural(v, defs, seen) for k, v in props.items()}
            if extra is True:
                out[_PRESERVE] = True
        elif isinstance(extra, dict) and extra:
            out["additionalProperties"] = _structural(extra, defs, seen)
        else:  # a free-form mapping (dict[str, Any]) or a model with no fields of its own
            out[_PRESERVE] = True
    elif "type" not in node:  # Any
        out[_PRESERVE] = True
    return out


def _union(branches: list[Obj], node: Obj, defs: Obj, seen: tuple[str, ...]) -> Obj:
    described = {"description": node["description"]} if "description" in node else {}
    if len(branches) == 1:
        return {**_structural(branches[0], defs, seen), **described}
    types = {b.get("type") for b in branches}
    if types == {"string"}:  # str | datetime
        return {"type": "string", **described}
    if "string" in types and types <= {"string", "integer", "number"}:  # a quantity
        return {"x-kubernetes-int-or-string": True,
                "anyOf": [{"type": "integer"}, {"type": "string"}], **described}
    return {_PRESERVE: True, **described}


def write(directory: Path) -> list[Path]:
    """Write one ``<plural>.<group>.yaml`` per CRD into DIRECTORY."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for c in crds():
        path = directory / f"{c['metadata']['name']}.yaml"
        path.write_text(dump(c))
        written.append(path)
    return written


def dump(obj: Obj) -> str:
    """One object as YAML, keys in their given order, generated-file header first."""
    header = "# Generated by `python -m cdi.manifests.crds charts/cdi/crds`; do not edit.\n"
    return header + yaml.safe_dump(obj, sort_keys=False, width=100)


def main() -> None:
    """``python -m cdi.manifests.crds DIR`` rewrites the checked-in CRDs."""
    if len(sys.argv) != 2:
        sys.exit("usage: python -m cdi.manifests.crds DIRECTORY")
    for path in write(Path(sys.argv[1])):
        sys.stdout.write(f"{path}\n")


if __name__ == "__main__":
    main()
