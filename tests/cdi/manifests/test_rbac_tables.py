"""The rendered RBAC is the seeds' tables 1.2 to 1.6, rule by rule, but for listed changes.

The tables are read from the seed document itself (chapter 1.2.3.2: table 1.2
for the aggregated ``cdi.kubevirt.io:*`` roles, 1.3/1.5 for the operator's
cluster and namespace rules, 1.4/1.6 for the controller's), so a change on
either side shows here.  The reading is pinned by row counts, so a parser
that finds nothing fails instead of passing.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from cdi.api.kinds import CDI
from cdi.cli import certrotation
from cdi.manifests import rbac, render, values

SEED = Path(__file__).resolve().parents[3] / ".." / "shared" / "seeds" / \
    "004_48f0fc14cd7d1041.txt"
ROWS = {"1.2": 7, "1.3": 9, "1.4": 16, "1.5": 7, "1.6": 7}
UPLOAD = "upload.cdi.kubevirt.io"
FORKLIFT = "forklift.cdi.kubevirt.io"
READ = ("get", "list", "watch")

Grant = tuple[str, str, str]  # (API group, resource, verb)
Obj = dict[str, Any]


def _tables() -> dict[str, list[str]]:
    """Each table's cells (its non-empty lines after the header), in order."""
    text = SEED.read_text()
    start = text.index("1.2.3.2.1.")
    end = text.index("1.2.3.3.", start)
    section = text[start:end]
    tables: dict[str, list[str]] = {}
    parts = re.split(r"表\s(1\.[2-6])\.\s[^\n]*\n[^\n]*Resources\s*Verbs\s*\n", section)
    for number, body in zip(parts[1::2], parts[2::2], strict=True):
        cells = [line.strip() for line in body.splitlines() if line.strip()]
        cells = [c for c in cells if not re.match(r"^1\.2\.3\.2\.\d", c)]
        tables[number] = cells
    return tables


def _rows(number: str) -> list[Obj]:
    """Table NUMBER's rows: {group, resources, verbs, names} (1.3-1.6) or with a role (1.2)."""
    cells = _tables()[number]
    rows: list[Obj] = []
    if number == "1.2":
        role = ""
        i = 0
        while i < len(cells):
            if cells[i].startswith("cdi.kubevirt.io:"):
                role = cells[i]
                i += 1
                continue
            rows.append({"role": role, "resources": _split(cells[i]),
                         "verbs": _verbs(cells[i + 1])})
            i += 2
    else:
        i = 0
        while i < len(cells):
            group = "" if cells[i].startswith('""') else cells[i]
            resources = _split(cells[i + 1])
            names: list[str] = []
            i += 2
            if cells[i].startswith("允许列表"):
                names = _split(re.split("[:\uff1a]", cells[i], maxsplit=1)[1])
                i += 1
            rows.append({"group": group, "resources": resources, "verbs": _verbs(cells[i]),
                         "names": names})
            i += 1
    assert len(rows) == ROWS[number], f"table {number}: read {len(rows)} rows: {rows}"
    return rows


def _split(cell: str) -> list[str]:
    # Kubernetes resource names are lower case; the document capitalises a few
    # ("Routes", "dataVolumes/source").
    return [part.strip().lower() for part in cell.split(",") if part.strip()]


def _verbs(cell: str) -> list[str]:
    return ["*"] if cell.startswith("*") else _split(cell)


def _objects() -> dict[tuple[str, str], Obj]:
    objs = render.objects(values.load(sets=["rbac.operator=true"]), "cdi")
    return {(o["kind"], o["metadata"]["name"]): o for o in objs
            if o["kind"] in ("ClusterRole", "Role", "ClusterRoleBinding", "RoleBinding")}


@pytest.mark.parametrize(("number", "kind", "name"), [
    ("1.3", "ClusterRole", "cdi-operator-cluster"),
    ("1.4", "ClusterRole", "cdi"),
    ("1.5", "Role", "cdi-operator"),
    ("1.6", "Role", "cdi-deployment"),
])
def test_component_roles_are_the_tables_rule_by_rule(number: str, kind: str, name: str) -> None:
    rules = _objects()[(kind, name)]["rules"]
    rows = _rows(number)
    assert len(rules) == len(rows)
    for row, rendered in zip(rows, rules, strict=True):
        assert rendered["apiGroups"] == [row["group"]], row
        assert rendered["resources"] == row["resources"], row
        assert sorted(rendered["verbs"]) == sorted(row["verbs"]), row
        assert rendered.get("resourceNames", []) == row["names"], row


def test_controller_extras_are_the_listed_ones() -> None:
    """What the controller holds beyond tables 1.4 and 1.6: reading and deleting Secrets,
    and updating the ones it rotates (cdi/cli/certrotation.py), by name."""
    objs = _objects()
    bound = [b["roleRef"]["name"] for (kind, _), b in objs.items()
             if kind == "ClusterRoleBinding" and b["subjects"][0]["name"] == rbac.CONTROLLER_SA]
    assert sorted(bound) == ["cdi", "cdi-extra"]
    extra = _rendered_grants(objs[("ClusterRole", "cdi-extra")])
    assert extra == {("", "secrets", "get"), ("", "secrets", "delete"),
                     ("", "secrets", "update")}
    named = [r for r in objs[("ClusterRole", "cdi-extra")]["rules"] if "resourceNames" in r]
    assert named == [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["update"],
                      "resourceNames": [certrotation.SERVER_SIGNER, certrotation.CLIENT_SIGNER,
                                        certrotation.PROXY_SIGNER, certrotation.CLIENT_CERT,
                                        certrotation.PROXY_CERT]}]


@pytest.mark.parametrize(("role", "account"), [
    ("cdi", rbac.CONTROLLER_SA), ("cdi-operator-cluster", rbac.OPERATOR_SA)])
def test_component_roles_are_bound_to_their_service_accounts(role: str, account: str) -> None:
    objs = _objects()
    bindings = [b for (kind, _), b in objs.items() if kind.endswith("Binding")
                and b["roleRef"]["name"] == role]
    assert [b["subjects"] for b in bindings] == [
        [{"kind": "ServiceAccount", "name": account, "namespace": "cdi"}]]


def _table_grants() -> dict[str, set[Grant]]:
    grants: dict[str, set[Grant]] = {}
    for row in _rows("1.2"):
        for resource in row["resources"]:
            group = UPLOAD if resource == "uploadtokenrequests" else CDI
            for verb in row["verbs"]:
                grants.setdefault(row["role"], set()).add((group, resource, verb))
    return grants


def _rendered_grants(role: Obj) -> set[Grant]:
    return {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"]
            for r in rule["resources"] for v in rule["verbs"]}


_POPULATORS = ("dataimportcrons", "datasources", "volumeimportsources", "volumeuploadsources",
               "volumeclonesources")
# What the rendered user roles add to table 1.2, and why.  The seed documents
# an older CDI; these follow CDI at c07cdb6 (cdi/api/rbac_defaults.py).
ADDED: dict[str, set[Grant]] = {
    # admin and edit also manage the golden-image and populator kinds, and the
    # forklift populators, as CDI's roles do.
    role: {(CDI, r, "*") for r in _POPULATORS}
    | {(FORKLIFT, r, "*") for r in ("ovirtvolumepopulators", "openstackvolumepopulators")}
    for role in ("cdi.kubevirt.io:admin", "cdi.kubevirt.io:edit")
} | {
    "cdi.kubevirt.io:view": {(FORKLIFT, r, v) for r in ("ovirtvolumepopulators",
                                                        "openstackvolumepopulators")
                             for v in READ},
    "cdi.kubevirt.io:config-reader": set(),
}
# What table 1.2 grants and the rendered roles do not.
REMOVED: dict[str, set[Grant]] = {
    # CDI moved "create datavolumes/source" out of view (anyone who may read
    # DataVolumes could otherwise clone them) into the unaggregated
    # cdi.kubevirt.io:clone-sourcer role (CDI #4219).
    "cdi.kubevirt.io:view": {(CDI, "datavolumes/source", "create")},
}


def test_user_roles_are_table_1_2_with_the_listed_changes() -> None:
    objs = _objects()
    table = _table_grants()
    assert sorted(table) == ["cdi.kubevirt.io:admin", "cdi.kubevirt.io:config-reader",
                             "cdi.kubevirt.io:edit", "cdi.kubevirt.io:view"]
    for role, granted in table.items():
        rendered = _rendered_grants(objs[("ClusterRole", role)])
        expected = (granted - REMOVED.get(role, set())) | ADDED[role]
        assert rendered == expected, (role, sorted(rendered ^ expected))
    # The clone grant moved, it did not vanish.
    sourcer = _rendered_grants(objs[("ClusterRole", "cdi.kubevirt.io:clone-sourcer")])
    assert sourcer == {(CDI, "datavolumes/source", "create")}


def test_user_roles_aggregate_into_kubernetes_roles() -> None:
    objs = _objects()
    for suffix in ("admin", "edit", "view"):
        labels = objs[("ClusterRole", f"cdi.kubevirt.io:{suffix}")]["metadata"]["labels"]
        assert labels[f"rbac.authorization.k8s.io/aggregate-to-{suffix}"] == "true"
    for name in ("cdi.kubevirt.io:config-reader", "cdi.kubevirt.io:clone-sourcer"):
        labels = objs[("ClusterRole", name)]["metadata"]["labels"]
        assert not any(k.startswith("rbac.authorization.k8s.io/aggregate-to") for k in labels)
    binding = objs[("ClusterRoleBinding", "cdi.kubevirt.io:config-reader")]
    assert {s["name"] for s in binding["subjects"]} >= {"system:authenticated"}


def test_operator_roles_only_when_asked() -> None:
    kinds = {(o["kind"], o["metadata"]["name"]) for o in render.objects(values.load())}
    assert ("ClusterRole", "cdi-operator-cluster") not in kinds
    assert ("ServiceAccount", rbac.OPERATOR_SA) not in kinds
    assert ("ClusterRole", "cdi") in kinds


def test_apiserver_may_patch_only_its_own_registrations() -> None:
    rules = _objects()[("ClusterRole", "cdi-apiserver")]["rules"]
    writes = [r for r in rules if set(r["verbs"]) & {"update", "patch", "create", "delete"}
              and r["apiGroups"] != ["authorization.k8s.io"]]  # SubjectAccessReviews
    assert writes, "the apiserver patches its CA bundles"
    for r in writes:
        assert r["resourceNames"], r
    names = {n for r in writes for n in r["resourceNames"]}
    assert names == {"cdi-api-datavolume-validate", "cdi-api-datavolume-mutate",
                     "v1beta1.upload.cdi.kubevirt.io"}
