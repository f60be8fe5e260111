"""The REST verbs on a real server over SQLite: paths, bodies, errors, admission, auth."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cdi.api import errors
from tests.cdi.apiserver.conftest import Api
from tests.cdi.apiserver.harness import ApiServer, auth, datavolume

DVS = "/apis/cdi.kubevirt.io/v1beta1/namespaces/default/datavolumes"
PVCS = "/api/v1/namespaces/default/persistentvolumeclaims"
SCS = "/apis/storage.k8s.io/v1/storageclasses"
MERGE = {"Content-Type": "application/merge-patch+json"}

PVC = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "a"},
       "spec": {"accessModes": ["ReadWriteOnce"],
                "resources": {"requests": {"storage": "1Gi"}}}}
SC = {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "metadata": {"name": "a"},
      "provisioner": "cdi.kubevirt.io/local"}


def assert_status(response: Any, code: int, reason: str, message: str | None = None) -> None:
    assert response.status_code == code, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json()
    assert body["kind"] == "Status"
    assert body["status"] == "Failure"
    assert body["code"] == code
    assert body["reason"] == reason
    if message is not None:
        assert body["message"] == message


@pytest.mark.parametrize("collection, body, namespaced", [
    (DVS, datavolume("a", namespace=None), True),
    (PVCS, PVC, True),
    (SCS, SC, False),
], ids=["cdi-namespaced", "core-namespaced", "cluster-scoped"])
def test_every_verb(api: Api, collection: str, body: dict[str, Any], namespaced: bool) -> None:
    item = collection + "/a"

    r = api("POST", collection, json=body)
    assert r.status_code == 201, r.text
    created = r.json()
    assert created["metadata"]["uid"]
    assert created["metadata"].get("namespace") == ("default" if namespaced else None)

    assert api("GET", item).json()["metadata"]["uid"] == created["metadata"]["uid"]

    listed = api("GET", collection).json()
    assert listed["kind"] == body["kind"] + "List"
    assert listed["apiVersion"] == body["apiVersion"]
    assert int(listed["metadata"]["resourceVersion"]) >= int(
        created["metadata"]["resourceVersion"])
    assert [o["metadata"]["name"] for o in listed["items"]] == ["a"]

    current = api("GET", item).json()
    current["metadata"]["labels"] = {"x": "1"}
    current["status"] = {"phase": "Ignored"}
    r = api("PUT", item, json=current)
    assert r.status_code == 200, r.text
    replaced = r.json()
    assert replaced["metadata"]["labels"] == {"x": "1"}
    assert "status" not in replaced or replaced["status"].get("phase") != "Ignored"
    assert replaced["metadata"]["resourceVersion"] != current["metadata"]["resourceVersion"]

    r = api("PATCH", item, json={"metadata": {"labels": {"y": "2"}}}, headers=MERGE)
    assert r.status_code == 200, r.text
    assert r.json()["metadata"]["labels"] == {"x": "1", "y": "2"}
    r = api("PATCH", item, json={"metadata": {"labels": {"x": None}}},
            headers={"Content-Type": "application/strategic-merge-patch+json"})
    assert r.status_code == 200, r.text
    assert r.json()["metadata"]["labels"] == {"y": "2"}

    obj = api("GET", item + "/status").json()
    obj["status"] = {"phase": "Testing"}
    obj["metadata"]["labels"] = {"ignored": "yes"}
    r = api("PUT", item + "/status", json=obj)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == {"phase": "Testing"}
    assert r.json()["metadata"]["labels"] == {"y": "2"}
    r = api("PATCH", item + "/status", json={"status": {"progress": "50%"}}, headers=MERGE)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == {"phase": "Testing", "progress": "50%"}
    assert api("GET", item).json()["status"] == {"phase": "Testing", "progress": "50%"}

    r = api("DELETE", item)
    assert r.status_code == 200, r.text
    assert r.json()["metadata"]["name"] == "a"
    assert_status(api("GET", item), 404, "NotFound")
    assert api("GET", collection).json()["items"] == []


def test_yaml_body(api: Api) -> None:
    manifest = b"""\
apiVersion: cdi.kubevirt.io/v1beta1
kind: DataVolume
metadata:
  name: from-yaml
  annotations:
    when: 2024-01-01T00:00:00Z
spec:
  source:
    blank: {}
  storage:
    resources:
      requests:
        storage: 1Gi
"""
    r = api("POST", DVS, data=manifest, headers={"Content-Type": "application/yaml"})
    assert r.status_code == 201, r.text
    assert r.json()["metadata"]["annotations"] == {"when": "2024-01-01T00:00:00Z"}
    r = api("PUT", DVS + "/from-yaml", data=manifest.replace(b"1Gi", b"2Gi"),
            headers={"Content-Type": "application/x-yaml"})
    assert r.status_code == 200, r.text
    assert r.json()["spec"]["storage"]["resources"]["requests"]["storage"] == "2Gi"


@pytest.mark.parametrize("data, content_type, message", [
    (b"{not json", "application/json", "the body is not valid JSON"),
    (b"[1, 2]", "application/json", "the body must be a JSON object, not list"),
    (b"a: [b", "application/yaml", "the body is not valid YAML"),
    (b"a: 1\n---\nb: 2\n", "application/yaml", "the body must hold one YAML document, not 2"),
    (b'{"metadata": "x"}', "application/json", "metadata must be an object"),
])
def test_bad_bodies(api: Api, data: bytes, content_type: str, message: str) -> None:
    r = api("POST", DVS, data=data, headers={"Content-Type": content_type})
    assert_status(r, 400, "BadRequest")
    assert r.json()["message"].startswith(message)


def test_body_must_match_the_path(api: Api) -> None:
    r = api("POST", DVS, json=datavolume("x", namespace="other"))
    assert_status(r, 400, "BadRequest", "the namespace of the provided object does not match "
                                        "the namespace sent on the request")
    pvc = dict(PVC, kind="Pod")
    assert_status(api("POST", PVCS, json=pvc), 400, "BadRequest")
    assert_status(api("POST", DVS, json=dict(datavolume("x"), apiVersion="v1")), 400,
                  "BadRequest")
    api("POST", DVS, json=datavolume("x"))
    r = api("PUT", DVS + "/x", json=datavolume("y"))
    assert_status(r, 400, "BadRequest", "the name of the object (y) does not match the name "
                                        "on the URL (x)")
    assert_status(api("POST", "/text", data=b"x"), 404, "NotFound")
    r = api("POST", DVS, data=b"x", headers={"Content-Type": "text/plain"})
    assert_status(r, 415, "UnsupportedMediaType")


def test_missing_type_and_namespace_come_from_the_path(api: Api) -> None:
    r = api("POST", DVS, json={"metadata": {"name": "bare"}, "spec": {}})
    assert r.status_code == 201, r.text
    obj = r.json()
    assert (obj["apiVersion"], obj["kind"], obj["metadata"]["namespace"]) == (
        "cdi.kubevirt.io/v1beta1", "DataVolume", "default")


def test_list_with_label_selector_and_all_namespaces(api: Api) -> None:
    for name, ns, app in (("a", "default", "web"), ("b", "default", "db"), ("c", "other", "web")):
        path = f"/apis/cdi.kubevirt.io/v1beta1/namespaces/{ns}/datavolumes"
        assert api("POST", path, json=datavolume(name, namespace=ns,
                                                 labels={"app": app})).status_code == 201

    def names(path: str, **params: str) -> list[str]:
        r = api("GET", path, params=params)
        assert r.status_code == 200, r.text
        return sorted(o["metadata"]["name"] for o in r.json()["items"])

    assert names(DVS) == ["a", "b"]
    assert names(DVS, labelSelector="app=web") == ["a"]
    assert names(DVS, labelSelector="app!=web") == ["b"]
    all_dvs = "/apis/cdi.kubevirt.io/v1beta1/datavolumes"
    assert names(all_dvs) == ["a", "b", "c"]
    assert names(all_dvs, labelSelector="app=web") == ["a", "c"]
    assert names(all_dvs, fieldSelector="metadata.name=c") == ["c"]
    assert names(all_dvs, fieldSelector="metadata.namespace!=default") == ["c"]
    assert_status(api("GET", all_dvs, params={"fieldSelector": "spec.x=1"}), 400, "BadRequest")
    assert_status(api("POST", all_dvs, json=datavolume("d")), 405, "MethodNotAllowed")


def test_json_patch_is_unsupported(api: Api) -> None:
    api("POST", DVS, json=datavolume("a"))
    r = api("PATCH", DVS + "/a", json=[{"op": "add", "path": "/metadata/labels", "value": {}}],
            headers={"Content-Type": "application/json-patch+json"})
    assert_status(r, 415, "UnsupportedMediaType")
    assert "application/json-patch+json" in r.json()["message"]


def test_stale_resource_version_is_a_conflict(api: Api) -> None:
    first = api("POST", DVS, json=datavolume("a")).json()
    current = dict(first, metadata=dict(first["metadata"], labels={"n": "1"}))
    assert api("PUT", DVS + "/a", json=current).status_code == 200
    stale = dict(first, metadata=dict(first["metadata"], labels={"n": "2"}))
    assert_status(api("PUT", DVS + "/a", json=stale), 409, "Conflict")
    pinned = {"metadata": {"resourceVersion": first["metadata"]["resourceVersion"],
                           "labels": {"n": "3"}}}
    assert_status(api("PATCH", DVS + "/a", json=pinned, headers=MERGE), 409, "Conflict")
    assert_status(api("PUT", DVS + "/a/status", json=stale), 409, "Conflict")
    assert api("GET", DVS + "/a").json()["metadata"]["labels"] == {"n": "1"}
    r = api("POST", DVS, json=datavolume("a"))
    assert_status(r, 409, "AlreadyExists")


@pytest.mark.parametrize("headers", [
    {},
    auth("wrong-token"),
    {"Authorization": "Basic dXNlcjpwYXNz"},
    {"Authorization": "Bearer"},
    {"Authorization": "bearer test-token-0123456789"},
], ids=["missing", "wrong", "basic", "empty", "lowercase"])
def test_unauthorized(server: ApiServer, headers: dict[str, str], caplog: Any) -> None:
    anonymous = Api(server.url)
    anonymous.session.headers.pop("Authorization")
    try:
        for method, path in (("GET", DVS), ("POST", DVS), ("GET", "/version"),
                             ("GET", "/no/such/path")):
            r = anonymous(method, path, headers=headers, json={})
            assert_status(r, 401, "Unauthorized", "Unauthorized")
        r = anonymous("GET", "/healthz")
        assert (r.status_code, r.text) == (200, "ok")
    finally:
        anonymous.close()
    assert server.token not in caplog.text


def test_not_found(api: Api) -> None:
    r = api("GET", DVS + "/missing")
    assert_status(r, 404, "NotFound", 'datavolume "missing" not found')
    for path in ("/apis/example.com/v1/things", "/api/v2/pods", "/api/v1/widgets",
                 "/api/v1/pods/x", f"{DVS}/a/b/c", f"{DVS}/a/log", "/nothing", "/apis/nope"):
        assert_status(api("GET", path), 404, "NotFound")
    assert_status(api("DELETE", DVS), 405, "MethodNotAllowed")
    assert_status(api("POST", DVS + "/a/status", json={}), 405, "MethodNotAllowed")


def test_admission(make_server: Callable[..., ApiServer]) -> None:
    seen: list[tuple[str, str | None]] = []

    def admit(new: dict[str, Any], old: dict[str, Any] | None) -> None:
        seen.append((new["metadata"]["name"],
                     None if old is None else old["metadata"]["resourceVersion"]))
        if (new.get("metadata", {}).get("labels") or {}).get("valid") == "no":
            raise errors.Invalid('DataVolume "bad" is invalid: labels.valid: no',
                                 kind="DataVolume", name="bad")
        new["metadata"].setdefault("annotations", {})["admitted"] = "yes"

    server = make_server(admit=admit)
    api = Api(server.url)
    try:
        r = api("POST", DVS, json=datavolume("bad", labels={"valid": "no"}))
        assert_status(r, 422, "Invalid", 'DataVolume "bad" is invalid: labels.valid: no')
        assert_status(api("GET", DVS + "/bad"), 404, "NotFound")
        created = api("POST", DVS, json=datavolume("ok")).json()
        assert created["metadata"]["annotations"] == {"admitted": "yes"}
        rv = created["metadata"]["resourceVersion"]
        assert seen[-1] == ("ok", None)
        r = api("PATCH", DVS + "/ok", json={"metadata": {"labels": {"valid": "no"}}},
                headers=MERGE)
        assert_status(r, 422, "Invalid")
        assert seen[-1] == ("ok", rv)
        bad = dict(created, metadata=dict(created["metadata"], labels={"valid": "no"}))
        assert_status(api("PUT", DVS + "/ok", json=bad), 422, "Invalid")
        calls = len(seen)
        r = api("PATCH", DVS + "/ok/status", json={"status": {"phase": "X"}}, headers=MERGE)
        assert r.status_code == 200
        assert len(seen) == calls, "status writes skip admission"
    finally:
        api.close()


def test_internal_errors_are_hidden(make_server: Callable[..., ApiServer], caplog: Any) -> None:
    def admit(new: dict[str, Any], old: dict[str, Any] | None) -> None:
        raise RuntimeError("secret detail /etc/internal")

    server = make_server(admit=admit)
    api = Api(server.url)
    try:
        with caplog.at_level(logging.ERROR, logger="cdi.apiserver"):
            r = api("POST", DVS, json=datavolume("x"))
        assert_status(r, 500, "InternalError", "Internal error, see the server log")
        assert "secret" not in r.text
        assert "Traceback" not in r.text
        assert "secret detail" in caplog.text  # the log has it, with its traceback
    finally:
        api.close()


def test_discovery(api: Api) -> None:
    assert api("GET", "/api").json()["versions"] == ["v1"]
    groups = {g["name"] for g in api("GET", "/apis").json()["groups"]}
    assert {"cdi.kubevirt.io", "storage.k8s.io", "upload.cdi.kubevirt.io"} <= groups
    group = api("GET", "/apis/cdi.kubevirt.io").json()
    assert group["preferredVersion"]["groupVersion"] == "cdi.kubevirt.io/v1beta1"
    resources = api("GET", "/apis/cdi.kubevirt.io/v1beta1").json()["resources"]
    dv = next(r for r in resources if r["name"] == "datavolumes")
    assert (dv["kind"], dv["namespaced"], dv["shortNames"]) == ("DataVolume", True, ["dv", "dvs"])
    core = {r["name"] for r in api("GET", "/api/v1").json()["resources"]}
    assert {"pods", "pods/log", "persistentvolumeclaims", "namespaces/status"} <= core
    assert api("GET", "/version").json()["gitVersion"]


def test_pod_logs(make_server: Callable[..., ApiServer], tmp_path: Path) -> None:
    log_file = tmp_path / "importer.log"
    log_file.write_text("I0101 Validating image\nImport Complete\n")
    server = make_server(pod_logs=lambda ns, name: log_file if name == "importer-a" else None)
    api = Api(server.url)
    try:
        r = api("GET", "/api/v1/namespaces/default/pods/importer-a/log")
        assert r.status_code == 200
        assert r.headers["Content-Type"] == "text/plain; charset=utf-8"
        assert r.text == "I0101 Validating image\nImport Complete\n"
        assert_status(api("GET", "/api/v1/namespaces/default/pods/other/log"), 404, "NotFound")
        log_file.unlink()
        assert_status(api("GET", "/api/v1/namespaces/default/pods/importer-a/log"), 404,
                      "NotFound")
    finally:
        api.close()
