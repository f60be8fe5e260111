"""What a DataVolume clones, one row per branch of the resolution admission and the clone
controller share: direct sources, a DataSource, a chain of two, and every dead end."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from cdi.api import sourceref
from cdi.api.sourceref import CloneSource, Unresolved

Obj = dict[str, Any]


def ds(name: str, source: Obj, namespace: str = "imgs") -> Obj:
    return {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataSource",
            "metadata": {"name": name, "namespace": namespace}, "spec": {"source": source}}


DATASOURCES = {(o["metadata"]["namespace"], o["metadata"]["name"]): o for o in (
    ds("fedora", {"pvc": {"name": "fedora-42", "namespace": "golden"}}),
    ds("local", {"pvc": {"name": "disk"}}),  # the claim's namespace is the DataSource's
    ds("snap", {"snapshot": {"name": "fedora-snap", "namespace": "golden"}}),
    ds("latest", {"dataSource": {"name": "fedora"}}),
    ds("latest-snap", {"dataSource": {"name": "snap", "namespace": "imgs"}}),
    ds("latest-local", {"dataSource": {"name": "local"}}),
    ds("loop", {"dataSource": {"name": "loop"}}),
    ds("ping", {"dataSource": {"name": "pong"}}),
    ds("pong", {"dataSource": {"name": "ping"}}),
    ds("deeper", {"dataSource": {"name": "latest"}}),
    ds("away", {"dataSource": {"name": "fedora", "namespace": "other"}}),
    ds("dangling", {"dataSource": {"name": "gone"}}),
    ds("empty", {}),
    ds("fedora", {"pvc": {"name": "other-fedora"}}, namespace="other"),
)}


def dv(spec: Obj, namespace: str = "vms") -> Obj:
    return {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
            "metadata": {"name": "disk", "namespace": namespace}, "spec": spec}


def ref(name: str, namespace: str | None = "imgs", kind: str = "DataSource") -> Obj:
    r = {"kind": kind, "name": name}
    if namespace is not None:
        r["namespace"] = namespace
    return {"sourceRef": r}


def resolve_for(obj: Obj) -> tuple[CloneSource | None, list[tuple[str, str]]]:
    """What OBJ clones, and the DataSources read on the way."""
    read: list[tuple[str, str]] = []

    async def get(namespace: str, name: str) -> Obj | None:
        read.append((namespace, name))
        return DATASOURCES.get((namespace, name))

    return asyncio.run(sourceref.clone_source(obj, get)), read


WITHOUT = sourceref.REASON_WITHOUT_SOURCE


@pytest.mark.parametrize(("spec", "expected", "read"), [
    ({"source": {"pvc": {"name": "src", "namespace": "a"}}}, CloneSource("pvc", "a", "src"), []),
    ({"source": {"pvc": {"name": "src"}}}, CloneSource("pvc", "vms", "src"), []),
    ({"source": {"snapshot": {"name": "s"}}}, CloneSource("snapshot", "vms", "s"), []),
    ({"source": {"http": {"url": "https://x/y"}}}, None, []),
    ({"source": {"blank": {}}, **ref("fedora")}, None, []),  # source wins; validation refuses
    ({}, None, []),
    (ref("fedora"), CloneSource("pvc", "golden", "fedora-42"), [("imgs", "fedora")]),
    (ref("local"), CloneSource("pvc", "imgs", "disk"), [("imgs", "local")]),
    (ref("snap"), CloneSource("snapshot", "golden", "fedora-snap"), [("imgs", "snap")]),
    # One reference deep: the final claim or snapshot, as the controller copies it.
    (ref("latest"), CloneSource("pvc", "golden", "fedora-42"),
     [("imgs", "latest"), ("imgs", "fedora")]),
    (ref("latest-snap"), CloneSource("snapshot", "golden", "fedora-snap"),
     [("imgs", "latest-snap"), ("imgs", "snap")]),
    (ref("latest-local"), CloneSource("pvc", "imgs", "disk"),
     [("imgs", "latest-local"), ("imgs", "local")]),
])
def test_what_a_datavolume_clones(spec: Obj, expected: CloneSource | None,
                                  read: list[tuple[str, str]]) -> None:
    assert resolve_for(dv(spec)) == (expected, read)


def test_the_reference_namespace_defaults_to_the_datavolumes() -> None:
    assert resolve_for(dv(ref("fedora", namespace=None), namespace="other")) == (
        CloneSource("pvc", "other", "other-fedora"), [("other", "fedora")])


@pytest.mark.parametrize(("spec", "reason", "message", "read"), [
    (ref("fedora", kind="PersistentVolumeClaim"), sourceref.REASON_UNSUPPORTED,
     "sourceRef kind PersistentVolumeClaim is not supported; use DataSource", []),
    (ref("nothing"), WITHOUT, "DataSource imgs/nothing not found", [("imgs", "nothing")]),
    (ref(""), WITHOUT, "DataSource imgs/ not found", []),
    (ref("empty"), WITHOUT, "DataSource imgs/empty has no pvc or snapshot source",
     [("imgs", "empty")]),
    # A reference to itself is not followed, nor one into another namespace.
    (ref("loop"), WITHOUT, "DataSource imgs/loop: DataSource cannot self-reference",
     [("imgs", "loop")]),
    (ref("away"), WITHOUT, "DataSource imgs/away: DataSource cannot reference a DataSource "
                           "in another namespace", [("imgs", "away")]),
    # Two DataSources naming each other: the second refers on, which is too deep.
    (ref("ping"), WITHOUT, "DataSource imgs/ping: DataSource reference chain exceeds "
                           "maximum depth of 1", [("imgs", "ping"), ("imgs", "pong")]),
    (ref("deeper"), WITHOUT, "DataSource imgs/deeper: DataSource reference chain exceeds "
                             "maximum depth of 1", [("imgs", "deeper"), ("imgs", "latest")]),
    (ref("dangling"), WITHOUT,
     'DataSource imgs/dangling: datasources.cdi.kubevirt.io "gone" not found',
     [("imgs", "dangling"), ("imgs", "gone")]),
])
def test_references_that_lead_nowhere(spec: Obj, reason: str, message: str,
                                      read: list[tuple[str, str]]) -> None:
    seen: list[tuple[str, str]] = []

    async def get(namespace: str, name: str) -> Obj | None:
        seen.append((namespace, name))
        return DATASOURCES.get((namespace, name))

    with pytest.raises(Unresolved) as e:
        asyncio.run(sourceref.clone_source(dv(spec), get))
    assert (e.value.reason, e.value.message, seen) == (reason, message, read)


@pytest.mark.parametrize(("name", "reason", "message"), [
    ("loop", "SelfReference", "DataSource cannot self-reference"),
    ("away", "CrossNamespaceReference",
     "DataSource cannot reference a DataSource in another namespace"),
    ("deeper", "MaxReferenceDepthReached",
     "DataSource reference chain exceeds maximum depth of 1"),
    ("dangling", "NotFound", 'datasources.cdi.kubevirt.io "gone" not found'),
])
def test_a_datasource_that_leads_nowhere_says_why_as_cdi(name: str, reason: str,
                                                         message: str) -> None:
    async def get(namespace: str, name: str) -> Obj | None:
        return DATASOURCES.get((namespace, name))

    with pytest.raises(Unresolved) as e:
        asyncio.run(sourceref.resolve(DATASOURCES[("imgs", name)], get))
    assert (e.value.reason, e.value.message) == (reason, message)


def test_not_found_message_uses_the_resource_name() -> None:
    assert sourceref.not_found_message("DataSource", "x") == \
        'datasources.cdi.kubevirt.io "x" not found'
    assert sourceref.not_found_message("PersistentVolumeClaim", "x") == \
        'persistentvolumeclaims "x" not found'
