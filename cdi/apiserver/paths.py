"""Turns a REST path into the kind, namespace, name and subresource it names.

Kubernetes paths are not a tree a router can match by pattern alone:
``/api/v1/namespaces/default/status`` is the status of the Namespace
``default``, while ``/api/v1/namespaces/default/pods`` is a collection of
pods.  The answer depends on the KINDS table, so the API server routes every
``/api/...`` and ``/apis/...`` request through :func:`resolve`, which knows the
table, and answers 404 with a Kubernetes ``Status`` for anything else.
"""

from __future__ import annotations

import dataclasses

from cdi.api import errors
from cdi.api.kinds import KINDS, Kind, by_path

NOT_FOUND = "the server could not find the requested resource"

# Subresources the server serves; "log" only for pods.
SUBRESOURCES = {"status": None, "log": "Pod"}


@dataclasses.dataclass(frozen=True)
class GroupVersion:
    """A discovery path: ``/api/v1`` or ``/apis/{group}/{version}``."""

    group: str
    version: str


@dataclasses.dataclass(frozen=True)
class Target:
    """What a resource path addresses.

    ``name`` is None for a collection; ``namespace`` is None for cluster-scoped
    kinds and for the all-namespaces collection of a namespaced kind.
    """

    kind: Kind
    namespace: str | None = None
    name: str | None = None
    subresource: str | None = None

    @property
    def is_collection(self) -> bool:
        return self.name is None


def group_versions() -> list[GroupVersion]:
    """Every group/version in KINDS, core first, in table order."""
    seen: list[GroupVersion] = []
    for k in KINDS:
        gv = GroupVersion(k.group, k.version)
        if gv not in seen:
            seen.append(gv)
    return sorted(seen, key=lambda gv: gv.group != "")


def kinds_of(group: str, version: str) -> list[Kind]:
    return [k for k in KINDS if (k.group, k.version) == (group, version)]


def resolve(path: str) -> Target | GroupVersion:
    """The target of PATH (``/api/...`` or ``/apis/...``); raises NotFound."""
    segments = path.strip("/").split("/")
    if any(not s for s in segments):
        raise errors.NotFound(NOT_FOUND)
    if segments[0] == "api" and len(segments) >= 2:
        group, version, rest = "", segments[1], segments[2:]
    elif segments[0] == "apis" and len(segments) >= 3:
        group, version, rest = segments[1], segments[2], segments[3:]
    else:
        raise errors.NotFound(NOT_FOUND)
    if not kinds_of(group, version):
        raise errors.NotFound(NOT_FOUND)
    if not rest:
        return GroupVersion(group, version)
    target = _namespaced(group, version, rest) or _cluster(group, version, rest)
    if target.subresource is not None:
        only = SUBRESOURCES.get(target.subresource, "")
        if only == "" or (only is not None and only != target.kind.kind):
            raise errors.NotFound(NOT_FOUND)
    return target


def _kind(group: str, version: str, plural: str) -> Kind | None:
    try:
        return by_path(group, version, plural)
    except KeyError:
        return None


def _namespaced(group: str, version: str, rest: list[str]) -> Target | None:
    """``namespaces/{ns}/{plural}[/{name}[/{sub}]]`` for a namespaced kind."""
    if len(rest) < 3 or rest[0] != "namespaces":
        return None
    kind = _kind(group, version, rest[2])
    if kind is None or not kind.namespaced:
        return None
    tail = rest[3:]
    if len(tail) > 2:
        raise errors.NotFound(NOT_FOUND)
    return Target(kind, rest[1], *tail)


def _cluster(group: str, version: str, rest: list[str]) -> Target:
    """``{plural}[/{name}[/{sub}]]``: cluster-scoped kinds, or all namespaces."""
    kind = _kind(group, version, rest[0])
    tail = rest[1:]
    if kind is None or len(tail) > 2 or (kind.namespaced and tail):
        raise errors.NotFound(NOT_FOUND)
    return Target(kind, None, *tail)
