"""The OpenAPI 3 document of the REST API, generated from KINDS and the API models.

``GET /openapi/v3`` serves it, and ``docs/openapi.json`` is the same document
checked in, so a change to the paths or the models shows up in review.  A test
fails when the two differ; regenerate the file with

    python -m cdi.apiserver.openapi > docs/openapi.json

Paths and operations come from the KINDS table (the same table the server
routes by), so the document cannot describe a route that does not exist.
Object schemas come from the pydantic models in ``cdi.api.objects`` where a
kind has one, else a loose ``object`` with the kind's ``apiVersion``/``kind``.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from pydantic.json_schema import JsonSchemaMode, models_json_schema

from cdi.api import objects
from cdi.api.kinds import KINDS, Kind

REF = "#/components/schemas/{model}"
STATUS = {"$ref": "#/components/responses/Status"}
ERRORS = {"default": STATUS}


def document() -> dict[str, Any]:
    """The whole document."""
    schemas = _schemas()
    paths: dict[str, Any] = {
        "/healthz": {"get": _operation("health", "Liveness; needs no token.",
                                       _text("ok"), security=[])},
        "/version": {"get": _operation("getCodeVersion", "The server version.",
                                       _json_ok({"type": "object"}))},
        "/api": {"get": _operation("getCoreAPIVersions", "Core API versions.",
                                   _json_ok({"type": "object"}))},
        "/apis": {"get": _operation("getAPIVersions", "API groups.",
                                    _json_ok({"type": "object"}))},
        "/openapi/v3": {"get": _operation("getOpenAPI", "This document.",
                                          _json_ok({"type": "object"}))},
    }
    for kind in KINDS:
        paths.update(_kind_paths(kind))
    return {
        "openapi": "3.0.3",
        "info": {"title": "CDI API", "version": "v1beta1",
                 "description": "Kubernetes-style REST API of `cdi serve`."},
        "security": [{"BearerToken": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"BearerToken": {"type": "http", "scheme": "bearer"}},
            "parameters": _parameters(),
            "responses": {"Status": {"description": "A Kubernetes Status (failure)",
                                     "content": _content(_ref("Status"))}},
            "schemas": schemas,
        },
    }


def _kind_paths(kind: Kind) -> dict[str, Any]:
    ns = "Namespaced" if kind.namespaced else ""
    k = kind.kind
    obj = _ref(k)
    params = ["namespace"] if kind.namespaced else []
    collection = kind.path("{namespace}" if kind.namespaced else None)
    item = collection + "/{name}"
    found = {
        collection: {
            "parameters": _params(*params),
            "get": _list_operation(f"list{ns}{k}", kind),
            "post": _operation(f"create{ns}{k}", f"Create a {k}.", _json_ok(obj, "201"),
                               body=obj),
        },
        item: {
            "parameters": _params(*params, "name"),
            "get": _operation(f"read{ns}{k}", f"Read a {k}.", _json_ok(obj)),
            "put": _operation(f"replace{ns}{k}", f"Replace a {k} (never its status).",
                              _json_ok(obj), body=obj),
            "patch": _operation(f"patch{ns}{k}", f"Merge-patch a {k}.", _json_ok(obj),
                                patch=True),
            "delete": _operation(f"delete{ns}{k}", f"Delete a {k}.", _json_ok(obj)),
        },
        item + "/status": {
            "parameters": _params(*params, "name"),
            "get": _operation(f"read{ns}{k}Status", f"Read a {k} and its status.",
                              _json_ok(obj)),
            "put": _operation(f"replace{ns}{k}Status", f"Replace the status of a {k}.",
                              _json_ok(obj), body=obj),
            "patch": _operation(f"patch{ns}{k}Status", f"Merge-patch the status of a {k}.",
                                _json_ok(obj), patch=True),
        },
    }
    if kind.namespaced:
        found[kind.path()] = {"get": _list_operation(f"list{k}ForAllNamespaces", kind)}
    if k == "Pod":
        found[item + "/log"] = {
            "parameters": _params(*params, "name"),
            "get": _operation("readNamespacedPodLog", "The pod's log.", _text("the log")),
        }
    return found


def _list_operation(operation_id: str, kind: Kind) -> dict[str, Any]:
    op = _operation(operation_id, f"List or watch {kind.plural}.",
                    {"200": {"description": "OK", "content": {
                        "application/json": {"schema": {"oneOf": [
                            _ref(f"{kind.kind}List"), _ref("WatchEvent")]}}}}})
    op["parameters"] = _params("labelSelector", "fieldSelector", "watch", "resourceVersion",
                               "timeoutSeconds")
    return op


def _operation(operation_id: str, summary: str, responses: dict[str, Any], *,
               body: dict[str, Any] | None = None, patch: bool = False,
               security: list[Any] | None = None) -> dict[str, Any]:
    op: dict[str, Any] = {"operationId": operation_id, "summary": summary}
    if body is not None:
        op["requestBody"] = {"required": True, "content": {
            "application/json": {"schema": body}, "application/yaml": {"schema": body}}}
    if patch:
        loose = {"type": "object"}
        op["requestBody"] = {"required": True, "content": {
            "application/merge-patch+json": {"schema": loose},
            "application/strategic-merge-patch+json": {"schema": loose}}}
    if security is not None:
        op["security"] = security
    op["responses"] = {**responses, **ERRORS}
    return op


def _json_ok(schema: dict[str, Any], code: str = "200") -> dict[str, Any]:
    return {code: {"description": "OK", "content": _content(schema)}}


def _text(description: str) -> dict[str, Any]:
    return {"200": {"description": description,
                    "content": {"text/plain": {"schema": {"type": "string"}}}}}


def _content(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": REF.format(model=name)}


def _params(*names: str) -> list[dict[str, Any]]:
    return [{"$ref": f"#/components/parameters/{n}"} for n in names]


def _parameters() -> dict[str, Any]:
    def query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
        return {"name": name, "in": "query", "required": False, "schema": schema,
                "description": description}

    string = {"type": "string"}
    return {
        "namespace": {"name": "namespace", "in": "path", "required": True, "schema": string},
        "name": {"name": "name", "in": "path", "required": True, "schema": string},
        "labelSelector": query("labelSelector", string, "Only objects with these labels."),
        "fieldSelector": query("fieldSelector", string,
                               "metadata.name and metadata.namespace, = or !=."),
        "watch": query("watch", {"type": "boolean"},
                       "Stream newline-delimited WatchEvents instead of a list."),
        "resourceVersion": query("resourceVersion", string,
                                 "Watch changes after this version (410 if too old)."),
        "timeoutSeconds": query("timeoutSeconds", {"type": "integer", "minimum": 0},
                                "End the watch after this many seconds."),
    }


def _schemas() -> dict[str, Any]:
    mode: JsonSchemaMode = "validation"
    models = [(m, mode) for k in KINDS if (m := objects.MODELS.get(k.kind))]
    refs, top = models_json_schema(models, ref_template=REF)
    schemas: dict[str, Any] = dict(top.get("$defs", {}))
    for kind in KINDS:
        model = objects.MODELS.get(kind.kind)
        name = kind.kind
        if model is not None:
            name = refs[(model, mode)]["$ref"].rsplit("/", 1)[1]
        else:
            schemas[name] = {"type": "object", "properties": {
                "metadata": _ref("ObjectMeta"), "spec": {"type": "object"},
                "status": {"type": "object"}}}
        schema = schemas[name]
        props = schema.setdefault("properties", {})
        props["apiVersion"] = {"type": "string", "enum": [kind.api_version]}
        props["kind"] = {"type": "string", "enum": [kind.kind]}
        schema["x-kubernetes-group-version-kind"] = [
            {"group": kind.group, "version": kind.version, "kind": kind.kind}]
        if name != kind.kind:
            schemas[kind.kind] = _ref(name)
        schemas[f"{kind.kind}List"] = {"type": "object", "properties": {
            "apiVersion": {"type": "string"}, "kind": {"type": "string"},
            "metadata": {"type": "object",
                         "properties": {"resourceVersion": {"type": "string"}}},
            "items": {"type": "array", "items": _ref(kind.kind)}}}
    schemas["Status"] = {"type": "object", "properties": {
        "kind": {"type": "string", "enum": ["Status"]}, "apiVersion": {"type": "string"},
        "status": {"type": "string"}, "message": {"type": "string"},
        "reason": {"type": "string"}, "code": {"type": "integer"},
        "details": {"type": "object"}}}
    schemas["WatchEvent"] = {"type": "object", "properties": {
        "type": {"type": "string", "enum": ["ADDED", "MODIFIED", "DELETED", "ERROR"]},
        "object": {"type": "object"}}}
    schemas.setdefault("ObjectMeta", {"type": "object"})
    return schemas


def main() -> None:
    """Print the document (``python -m cdi.apiserver.openapi > docs/openapi.json``)."""
    sys.stdout.write(json.dumps(document(), indent=2) + "\n")


if __name__ == "__main__":
    main()
