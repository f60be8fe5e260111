"""What a relist after 410 emits: the pure diff between what a watch saw and a new list."""

from __future__ import annotations

from cdi.api.kinds import BY_KIND
from cdi.backends.kube_objects import changes, key_of, typed
from cdi.backends.port import Obj


def obj(name: str, rv: str, uid: str = "") -> Obj:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": "ns", "resourceVersion": rv,
                         "uid": uid or f"uid-{name}"}}


def test_changes_between_a_watch_and_a_relist() -> None:
    known = {key_of(o): o for o in (obj("same", "1"), obj("changed", "2"), obj("gone", "3"),
                                    obj("remade", "4"))}
    fresh = [obj("same", "1"), obj("changed", "9"), obj("new", "10"),
             obj("remade", "11", uid="uid-remade-2")]
    got = [(e.type, e.object["metadata"]["name"], e.object["metadata"]["uid"])
           for e in changes(known, fresh)]
    assert got == [("MODIFIED", "changed", "uid-changed"), ("ADDED", "new", "uid-new"),
                   ("DELETED", "remade", "uid-remade"), ("ADDED", "remade", "uid-remade-2"),
                   ("DELETED", "gone", "uid-gone")]
    assert changes(known, list(known.values())) == []


def test_list_items_get_their_kind_back_first() -> None:
    item = {"metadata": {"name": "p"}, "spec": {}}
    assert list(typed(BY_KIND["Pod"], item)) == ["apiVersion", "kind", "metadata", "spec"]
    assert typed(BY_KIND["Pod"], item)["apiVersion"] == "v1"
    whole = {"apiVersion": "v1", "kind": "Pod", "metadata": {}}
    assert typed(BY_KIND["Pod"], whole) is whole
