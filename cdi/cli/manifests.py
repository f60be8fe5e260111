"""Reading ``-f`` manifests: files, directories or stdin, YAML or JSON, many documents.

``cdi apply``, ``create`` and ``delete`` take what ``kubectl`` takes: a file
with one or more YAML documents (JSON is YAML too), a directory of such files,
or ``-`` for stdin; ``kind: List`` documents are expanded into their items.
Each object is paired with its entry in the KINDS table here, so a typo in
``kind`` or ``apiVersion`` is reported before anything is sent.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

from cdi.api import errors
from cdi.api.kinds import BY_KIND, Kind
from cdi.apiserver import codec

SUFFIXES = (".yaml", ".yml", ".json")


class ManifestError(Exception):
    pass


@dataclasses.dataclass(frozen=True)
class Manifest:
    kind: Kind
    obj: dict[str, Any]
    source: str

    @property
    def name(self) -> str:
        """The name, or for a create the generateName prefix."""
        meta = self.obj["metadata"]
        return str(meta.get("name") or meta.get("generateName"))

    @property
    def namespace(self) -> str | None:
        ns = self.obj["metadata"].get("namespace")
        return str(ns) if ns else None


def load(filenames: tuple[str, ...] | list[str], *, namespace: str | None,
         explicit_namespace: bool, generate_name: bool = False) -> list[Manifest]:
    """The objects in FILENAMES, namespaced kinds placed in NAMESPACE when they
    name none; EXPLICIT_NAMESPACE (``-n`` given) makes a different one an error.
    With GENERATE_NAME (``create``), ``metadata.generateName`` may stand in for
    the name."""
    manifests = []
    for filename in filenames:
        for source, text in _texts(filename):
            try:
                docs = list(codec.yaml_documents(text))
            except errors.BadRequest as e:
                raise ManifestError(f"error: {source}: {e.message}") from e
            for doc in docs:
                for obj in _expand(doc, source):
                    manifests.append(_manifest(obj, source, namespace, explicit_namespace,
                                               generate_name))
    if not manifests:
        raise ManifestError("error: no objects passed to the command")
    return manifests


def _texts(filename: str) -> list[tuple[str, str]]:
    if filename == "-":
        return [("STDIN", sys.stdin.read())]
    path = Path(filename)
    try:
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix in SUFFIXES and p.is_file())
            return [(str(p), p.read_text()) for p in files]
        return [(filename, path.read_text())]
    except (OSError, UnicodeDecodeError) as e:
        raise ManifestError(f"error: cannot read {filename}: {e}") from e


def _expand(doc: Any, source: str) -> list[dict[str, Any]]:
    if not isinstance(doc, dict):
        raise ManifestError(f"error: {source}: a document is not an object")
    if doc.get("kind") == "List" or (str(doc.get("kind", "")).endswith("List")
                                     and isinstance(doc.get("items"), list)):
        items = doc.get("items") or []
        if not all(isinstance(item, dict) for item in items):
            raise ManifestError(f"error: {source}: a List item is not an object")
        return list(items)
    return [doc]


def _manifest(obj: dict[str, Any], source: str, namespace: str | None,
              explicit: bool, generate_name: bool) -> Manifest:
    kind_name = obj.get("kind")
    api_version = obj.get("apiVersion")
    kind = BY_KIND.get(str(kind_name))
    if kind is None or kind.api_version != api_version:
        raise ManifestError(f'error: {source}: no matches for kind "{kind_name}" in version '
                            f'"{api_version}"')
    meta = obj.setdefault("metadata", {})
    if not isinstance(meta, dict) or not (
            meta.get("name") or (generate_name and meta.get("generateName"))):
        raise ManifestError(f"error: {source}: a {kind_name} has no metadata.name")
    if not kind.namespaced:
        return Manifest(kind, obj, source)
    given = meta.get("namespace")
    if given and explicit and given != namespace:
        raise ManifestError(
            f'error: the namespace from the provided object "{given}" does not match the '
            f'namespace "{namespace}". You must pass \'--namespace={given}\' to perform this '
            "operation.")
    if not given:
        meta["namespace"] = namespace or "default"
    return Manifest(kind, obj, source)
