"""Path resolution, query parsing and merge patches: the pure parts of the server."""

from __future__ import annotations

from typing import Any

import pytest

from cdi.api import errors
from cdi.api.kinds import BY_KIND
from cdi.apiserver import codec
from cdi.apiserver.paths import GroupVersion, Target, resolve
from cdi.apiserver.query import ListQuery


@pytest.mark.parametrize("path, expected", [
    ("/api/v1", GroupVersion("", "v1")),
    ("/apis/cdi.kubevirt.io/v1beta1", GroupVersion("cdi.kubevirt.io", "v1beta1")),
    ("/api/v1/pods", Target(BY_KIND["Pod"])),
    ("/api/v1/namespaces/ns/pods", Target(BY_KIND["Pod"], "ns")),
    ("/api/v1/namespaces/ns/pods/p/log", Target(BY_KIND["Pod"], "ns", "p", "log")),
    ("/api/v1/namespaces", Target(BY_KIND["Namespace"])),
    ("/api/v1/namespaces/ns", Target(BY_KIND["Namespace"], None, "ns")),
    ("/api/v1/namespaces/ns/status", Target(BY_KIND["Namespace"], None, "ns", "status")),
    ("/apis/storage.k8s.io/v1/storageclasses/sc/status",
     Target(BY_KIND["StorageClass"], None, "sc", "status")),
    ("/apis/cdi.kubevirt.io/v1beta1/namespaces/ns/datavolumes/dv/",
     Target(BY_KIND["DataVolume"], "ns", "dv")),
])
def test_resolve(path: str, expected: Any) -> None:
    assert resolve(path) == expected


@pytest.mark.parametrize("path", [
    "/api", "/apis/cdi.kubevirt.io", "/api/v1//pods", "/api/v1/pods/p",
    "/api/v1/namespaces/ns/pods/p/exec", "/api/v1/namespaces/ns/services/s/log",
    "/apis/cdi.kubevirt.io/v1/datavolumes", "/api/v1/namespaces/ns/storageclasses",
    "/apis/storage.k8s.io/v1/storageclasses/a/status/b",
])
def test_resolve_unknown(path: str) -> None:
    with pytest.raises(errors.NotFound):
        resolve(path)


def test_merge_patch() -> None:
    target = {"a": {"b": 1, "c": [1, 2]}, "d": "x"}
    patch = {"a": {"b": None, "c": [3], "e": {"f": 1}}, "d": None, "g": 0}
    assert codec.merge_patch(target, patch) == {"a": {"c": [3], "e": {"f": 1}}, "g": 0}
    assert target == {"a": {"b": 1, "c": [1, 2]}, "d": "x"}, "the target is not changed"
    assert codec.merge_patch({"a": 1}, {"a": {"b": None}}) == {"a": {}}


def test_query() -> None:
    q = ListQuery.parse({"watch": "1", "timeoutSeconds": "0",
                         "fieldSelector": "metadata.name==a, metadata.namespace!=b"})
    assert q.watch and q.timeout_seconds is None
    assert q.matches({"metadata": {"name": "a", "namespace": "c"}})
    assert not q.matches({"metadata": {"name": "a", "namespace": "b"}})
    for bad in ({"watch": "maybe"}, {"timeoutSeconds": "-1"}, {"fieldSelector": "name"},
                {"fieldSelector": "status.phase=x"}):
        with pytest.raises(errors.BadRequest):
            ListQuery.parse(bad)
