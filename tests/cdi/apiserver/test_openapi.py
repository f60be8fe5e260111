"""The served OpenAPI document is the checked-in docs/openapi.json, and covers every kind."""

from __future__ import annotations

import json
from pathlib import Path

from cdi.api.kinds import KINDS
from tests.cdi.apiserver.conftest import Api

CHECKED_IN = Path(__file__).parents[3] / "docs" / "openapi.json"


def test_served_document_is_the_checked_in_one(api: Api) -> None:
    r = api("GET", "/openapi/v3")
    assert r.status_code == 200
    assert r.json() == json.loads(CHECKED_IN.read_text()), (
        "docs/openapi.json is stale: python -m cdi.apiserver.openapi > docs/openapi.json")


def test_document_describes_every_kind() -> None:
    doc = json.loads(CHECKED_IN.read_text())
    assert doc["openapi"].startswith("3.")
    operations = set()
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method != "parameters":
                operations.add(op["operationId"])
                assert path.startswith("/")
    for kind in KINDS:
        ns = "Namespaced" if kind.namespaced else ""
        collection = kind.path("{namespace}" if kind.namespaced else None)
        assert set(doc["paths"][collection]) >= {"get", "post"}
        assert set(doc["paths"][collection + "/{name}"]) >= {"get", "put", "patch", "delete"}
        assert set(doc["paths"][collection + "/{name}/status"]) >= {"get", "put", "patch"}
        assert f"create{ns}{kind.kind}" in operations
        schema = doc["components"]["schemas"][kind.kind]
        if "$ref" in schema:
            schema = doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
        assert schema["properties"]["kind"]["enum"] == [kind.kind]
        assert schema["properties"]["apiVersion"]["enum"] == [kind.api_version]
    assert "/api/v1/namespaces/{namespace}/pods/{name}/log" in doc["paths"]
    assert doc["paths"]["/healthz"]["get"]["security"] == []
