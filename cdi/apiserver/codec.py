"""Request bodies in, JSON out: the one place that parses JSON and YAML objects.

Clients send objects as JSON or YAML (``kubectl`` users have YAML files) and
patches as JSON merge patches.  Parsing is strict: a body that is not one JSON
object is a 400 ``Status``, never a guess.  YAML is read the way Kubernetes
reads it, as JSON with another syntax: timestamps stay strings (PyYAML would
turn ``2024-01-01T00:00:00Z`` into a ``datetime`` that JSON cannot hold), and
anything JSON cannot represent is refused.  The CLI reads its manifests with
the same functions.

Merge patches follow RFC 7386 (:func:`merge_patch`); strategic merge patches are
accepted and applied as merge patches (our kinds have no patch strategies);
JSON patches and server-side apply are 415.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from typing import Any

import yaml  # type: ignore[import-untyped,unused-ignore]

from cdi.api import errors

JSON_TYPES = {"application/json", "application/octet-stream", ""}
YAML_TYPES = {"application/yaml", "application/x-yaml", "text/yaml"}
MERGE_PATCH_TYPES = {"application/merge-patch+json", "application/strategic-merge-patch+json"}

_TIMESTAMP = "tag:yaml.org,2002:timestamp"


class _Loader(yaml.SafeLoader):  # type: ignore[misc,unused-ignore]
    """SafeLoader without the timestamp type: timestamps stay strings."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _TIMESTAMP]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _jsonable(value: Any, what: str) -> Any:
    """VALUE if it round-trips through JSON, else BadRequest."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise errors.BadRequest(f"{what} cannot be represented as JSON: {e}") from e


def yaml_documents(text: str) -> Iterator[Any]:
    """The documents of a YAML (or JSON) stream, empty documents skipped."""
    try:
        for doc in yaml.load_all(text, Loader=_Loader):
            if doc is not None:
                yield _jsonable(doc, "the YAML document")
    except yaml.YAMLError as e:
        raise errors.BadRequest(f"the body is not valid YAML: {_one_line(e)}") from e


def dump_yaml(obj: Any) -> str:
    """OBJ as block-style YAML, keys in their given order."""
    text: str = yaml.safe_dump(obj, default_flow_style=False, sort_keys=False,
                               allow_unicode=True)
    return text


def decode_object(body: bytes, content_type: str) -> dict[str, Any]:
    """The object in a create/replace BODY sent as CONTENT_TYPE."""
    if content_type in YAML_TYPES:
        try:
            docs = list(yaml_documents(body.decode("utf-8")))
        except UnicodeDecodeError as e:
            raise errors.BadRequest("the body is not valid UTF-8") from e
        if len(docs) != 1:
            raise errors.BadRequest(f"the body must hold one YAML document, not {len(docs)}")
        value = docs[0]
    elif content_type in JSON_TYPES:
        value = decode_json(body)
    else:
        raise errors.UnsupportedMediaType(
            f'the body of the request was in an unknown format - accepted media types '
            f'include: application/json, application/yaml (got "{content_type}")')
    return _object(value)


def decode_patch(body: bytes, content_type: str) -> dict[str, Any]:
    """The merge patch in a PATCH BODY; 415 for other patch types."""
    if content_type not in MERGE_PATCH_TYPES:
        raise errors.UnsupportedMediaType(
            f'the server does not support patch type "{content_type}": use '
            'application/merge-patch+json')
    return _object(decode_json(body))


def decode_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError as e:
        raise errors.BadRequest(f"the body is not valid JSON: {e}") from e


def _object(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise errors.BadRequest(
            f"the body must be a JSON object, not {type(value).__name__}")
    if not isinstance(value.get("metadata", {}), dict):
        raise errors.BadRequest("metadata must be an object")
    return value


def merge_patch(target: Any, patch: Any) -> Any:
    """TARGET with the JSON merge PATCH (RFC 7386) applied; TARGET is not changed."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())
