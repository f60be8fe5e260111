"""Discovery documents: which groups, versions and resources the server serves.

Kubernetes clients (``kubectl``, client libraries) read ``/api``, ``/apis``
and each group/version's resource list before they touch a resource; serving
them from the KINDS table lets such clients talk to ``cdi serve``.  They are
small on purpose: names, scope, verbs and short names, no storage hashes.
"""

from __future__ import annotations

import importlib.metadata
from typing import Any

from cdi.apiserver.paths import GroupVersion, group_versions, kinds_of

VERBS = ["create", "delete", "get", "list", "patch", "update", "watch"]


def package_version() -> str:
    try:
        return importlib.metadata.version("cdi")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0+unknown"


def version() -> dict[str, Any]:
    """``GET /version``."""
    return {"gitVersion": package_version()}


def core_versions() -> dict[str, Any]:
    """``GET /api``."""
    return {
        "kind": "APIVersions",
        "versions": [gv.version for gv in group_versions() if not gv.group],
        "serverAddressByClientCIDRs": [],
    }


def group_list() -> dict[str, Any]:
    """``GET /apis``."""
    return {"kind": "APIGroupList", "apiVersion": "v1",
            "groups": [api_group(g) for g in groups()]}


def api_group(group: str) -> dict[str, Any]:
    """``GET /apis/{group}``."""
    versions = [{"groupVersion": f"{group}/{gv.version}", "version": gv.version}
                for gv in group_versions() if gv.group == group]
    return {"kind": "APIGroup", "apiVersion": "v1", "name": group, "versions": versions,
            "preferredVersion": versions[0]}


def resource_list(gv: GroupVersion) -> dict[str, Any]:
    """``GET /api/v1`` or ``GET /apis/{group}/{version}``."""
    resources: list[dict[str, Any]] = []
    for k in kinds_of(gv.group, gv.version):
        resources.append({"name": k.plural, "singularName": k.singular, "namespaced": k.namespaced,
                          "kind": k.kind, "verbs": VERBS, "shortNames": list(k.short_names)})
        resources.append({"name": f"{k.plural}/status", "singularName": "",
                          "namespaced": k.namespaced, "kind": k.kind,
                          "verbs": ["get", "patch", "update"]})
        if k.kind == "Pod":
            resources.append({"name": "pods/log", "singularName": "", "namespaced": True,
                              "kind": "Pod", "verbs": ["get"]})
    group_version = f"{gv.group}/{gv.version}" if gv.group else gv.version
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version,
            "resources": resources}


def groups() -> list[str]:
    """The API groups, in KINDS order."""
    names: list[str] = []
    for gv in group_versions():
        if gv.group and gv.group not in names:
            names.append(gv.group)
    return names
