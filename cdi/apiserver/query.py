"""The query parameters of list and watch requests, parsed once and strictly.

``labelSelector`` is passed to the store, which owns label matching.  The
store has no field selectors, so the only ones clients need (``metadata.name``
and ``metadata.namespace``, which ``cdi wait`` and ``kubectl wait`` use to
watch one object) are matched here.  Anything else is a 400, never ignored:
an ignored selector would hand a client objects it did not ask for.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from cdi.api import errors

FIELDS = ("metadata.name", "metadata.namespace")
_TERM = re.compile(r"([^!=]+)(!=|==|=)(.*)")


@dataclasses.dataclass(frozen=True)
class FieldRequirement:
    field: str
    value: str
    equal: bool

    def matches(self, obj: dict[str, Any]) -> bool:
        meta = obj.get("metadata") or {}
        actual = meta.get(self.field.split(".", 1)[1]) or ""
        return (actual == self.value) == self.equal


@dataclasses.dataclass(frozen=True)
class ListQuery:
    watch: bool = False
    resource_version: str | None = None
    label_selector: str | None = None
    fields: tuple[FieldRequirement, ...] = ()
    timeout_seconds: int | None = None

    @classmethod
    def parse(cls, query: Mapping[str, str]) -> ListQuery:
        return cls(
            watch=_boolean(query, "watch"),
            resource_version=query.get("resourceVersion") or None,
            label_selector=query.get("labelSelector") or None,
            fields=parse_field_selector(query.get("fieldSelector", "")),
            timeout_seconds=_seconds(query, "timeoutSeconds"),
        )

    def matches(self, obj: dict[str, Any]) -> bool:
        """Whether OBJ passes the field selector."""
        return all(r.matches(obj) for r in self.fields)


def parse_field_selector(selector: str) -> tuple[FieldRequirement, ...]:
    """``metadata.name=x,metadata.namespace!=y`` as requirements; 400 if unsupported."""
    requirements = []
    for term in filter(None, (t.strip() for t in selector.split(","))):
        match = _TERM.fullmatch(term)
        if match is None:
            raise errors.BadRequest(f'invalid field selector "{term}": expected field=value')
        field, op, value = (g.strip() for g in match.groups())
        if field not in FIELDS:
            raise errors.BadRequest(
                f'field label not supported: "{field}" (supported: {", ".join(FIELDS)})')
        requirements.append(FieldRequirement(field, value, op != "!="))
    return tuple(requirements)


def _boolean(query: Mapping[str, str], name: str) -> bool:
    value = query.get(name, "false").lower()
    if value in ("true", "1"):
        return True
    if value in ("false", "0", ""):
        return False
    raise errors.BadRequest(f'invalid value for {name}: "{value}" (expected true or false)')


def _seconds(query: Mapping[str, str], name: str) -> int | None:
    value = query.get(name)
    if value is None or value == "":
        return None
    try:
        seconds = int(value)
    except ValueError:
        seconds = -1
    if seconds < 0:
        raise errors.BadRequest(f'invalid value for {name}: "{value}" (expected seconds >= 0)')
    return seconds or None
