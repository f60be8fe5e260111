"""What a DataVolume clones: its ``source``, or what its ``sourceRef`` DataSource resolves to.

Three readers must agree on the answer, or a clone is authorized against one
source and copies another: admission (``cdi.apiserver.admission``: the RBAC
check of ``cdi serve``, the SubjectAccessReviews and the clone token of the
``datavolume-mutate`` webhook), the clone controller (what it copies, and which
source the token must name) and the DataSource controller (``Ready`` and
``status.source``).  All three resolve here.

A DataVolume clones ``spec.source.pvc`` or ``spec.source.snapshot``, or what
the DataSource ``spec.sourceRef`` names (its namespace defaulting to the
DataVolume's).  A DataSource names a claim or a snapshot (namespace defaulting
to the DataSource's), or another DataSource, which is followed once, as CDI's
``ResolveDataSourceChain`` (controller/common/util.go) does: a reference into
another namespace, to itself, to a missing DataSource or to one that refers on
again leads nowhere (:class:`Unresolved`, with the reason and text CDI's
DataSource controller puts in ``Ready``).

CDI's webhook reads a referencing DataSource's ``status.source`` instead, the
copy its DataSource controller makes of this same resolution while the
DataSource is Ready (``authorize_utils.go``); before that it sees no clone and
issues no token.  Resolving ``spec`` as the controllers do names the same
source once Ready, and names it before, too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any

from cdi.api.kinds import lookup

Obj = dict[str, Any]
# How a resolver reads a DataSource: (namespace, name) -> the object, or None if missing.
Get = Callable[[str, str], Awaitable[Obj | None]]

# The DataSource's Ready reasons and messages, as CDI's datasource-controller.go and
# controller/common/util.go spell them.
REASON_NOT_FOUND = "NotFound"
REASON_MAX_DEPTH = "MaxReferenceDepthReached"
REASON_SELF_REFERENCE = "SelfReference"
REASON_CROSS_NAMESPACE = "CrossNamespaceReference"
MSG_MAX_DEPTH = "DataSource reference chain exceeds maximum depth of 1"
MSG_SELF_REFERENCE = "DataSource cannot self-reference"
MSG_CROSS_NAMESPACE = "DataSource cannot reference a DataSource in another namespace"
# The DataVolume's Running reasons when its sourceRef leads nowhere.
REASON_UNSUPPORTED = "UnsupportedSource"
REASON_WITHOUT_SOURCE = "CloneWithoutSource"


@dataclasses.dataclass(frozen=True)
class CloneSource:
    """The claim (``kind`` "pvc") or VolumeSnapshot (``kind`` "snapshot") a clone reads."""

    kind: str
    namespace: str
    name: str

    @property
    def snapshot(self) -> bool:
        return self.kind == "snapshot"


class Unresolved(Exception):
    """A reference that leads to no source; REASON and MESSAGE are what the referring
    object's condition says (a DataSource's Ready, a DataVolume's Running)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def not_found_message(kind: str, name: str) -> str:
    """Kubernetes' wording of a missing object, which CDI puts in the condition."""
    k = lookup(kind)
    resource = f"{k.plural}.{k.group}" if k.group else k.plural
    return f'{resource} "{name}" not found'


def named(source: Obj, namespace: str) -> CloneSource | None:
    """The claim or snapshot SOURCE (a DataVolume's or a DataSource's ``source``) names;
    a missing namespace is NAMESPACE, the owner's."""
    for kind in ("pvc", "snapshot"):
        ref = source.get(kind)
        if isinstance(ref, dict):
            return CloneSource(kind, str(ref.get("namespace") or namespace),
                               str(ref.get("name") or ""))
    return None


async def resolve(datasource: Obj, get: Get) -> Obj:
    """The ``spec.source`` DATASOURCE stands for: its own, or that of the DataSource it
    refers to (read with GET).  Raises :class:`Unresolved` as CDI's resolution fails."""
    meta = datasource.get("metadata") or {}
    ns, name = str(meta.get("namespace") or ""), str(meta.get("name") or "")
    source: Obj = (datasource.get("spec") or {}).get("source") or {}
    ref = source.get("dataSource")
    if not isinstance(ref, dict):
        return source
    ref_ns, ref_name = str(ref.get("namespace") or ns), str(ref.get("name") or "")
    if ref_ns != ns:
        raise Unresolved(REASON_CROSS_NAMESPACE, MSG_CROSS_NAMESPACE)
    if ref_name == name:
        raise Unresolved(REASON_SELF_REFERENCE, MSG_SELF_REFERENCE)
    target = await get(ref_ns, ref_name) if ref_name else None
    if target is None:
        raise Unresolved(REASON_NOT_FOUND, not_found_message("DataSource", ref_name))
    resolved: Obj = (target.get("spec") or {}).get("source") or {}
    if resolved.get("dataSource") is not None:
        raise Unresolved(REASON_MAX_DEPTH, MSG_MAX_DEPTH)
    return resolved


async def clone_source(dv: Obj, get: Get) -> CloneSource | None:
    """What the DataVolume DV clones, reading DataSources with GET; None if it clones
    nothing (an import, an upload, a blank).  Raises :class:`Unresolved` when its
    ``sourceRef`` leads to no claim or snapshot."""
    ns = str((dv.get("metadata") or {}).get("namespace") or "")
    spec = dv.get("spec") or {}
    source = spec.get("source") or {}
    ref = spec.get("sourceRef")
    if source or not isinstance(ref, dict):
        return named(source, ns)
    if ref.get("kind") != "DataSource":
        raise Unresolved(REASON_UNSUPPORTED, f"sourceRef kind {ref.get('kind')} is not "
                                             "supported; use DataSource")
    ds_ns, ds_name = str(ref.get("namespace") or ns), str(ref.get("name") or "")
    datasource = await get(ds_ns, ds_name) if ds_name else None
    if datasource is None:
        raise Unresolved(REASON_WITHOUT_SOURCE, f"DataSource {ds_ns}/{ds_name} not found")
    try:
        resolved = await resolve(datasource, get)
    except Unresolved as e:
        raise Unresolved(REASON_WITHOUT_SOURCE,
                         f"DataSource {ds_ns}/{ds_name}: {e.message}") from e
    found = named(resolved, ds_ns)
    if found is None:
        raise Unresolved(REASON_WITHOUT_SOURCE,
                         f"DataSource {ds_ns}/{ds_name} has no pvc or snapshot source")
    return found
