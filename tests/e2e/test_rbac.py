"""Identities and RBAC through a real `cdi serve` and the `cdi` CLI: tokens made by the
admin, kube-apiserver's 403s, CDI's roles, and the seed's cross-namespace clone RBAC."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import requests

from tests.e2e.conftest import Server

RBAC_API = "/apis/rbac.authorization.k8s.io/v1"

# The seed's chapter 8.6 ("enable cross-namespace DataVolume cloning"), verbatim but for
# the placeholders <datavolume-cloner>, <allow-clone-to-user>, <Source namespace> and
# <Destination namespace>.
CLUSTER_ROLE = """\
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: datavolume-cloner
rules:
- apiGroups: ["cdi.kubevirt.io"]
  resources: ["datavolumes/source"]
  verbs: ["*"]
"""
ROLE_BINDING = """\
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: allow-clone-to-user
  namespace: source-ns
subjects:
- kind: ServiceAccount
  name: default
  namespace: target-ns
roleRef:
  kind: ClusterRole
  name: datavolume-cloner
  apiGroup: rbac.authorization.k8s.io
"""
# The service account may create DataVolumes in its own namespace (Kubernetes' "edit").
EDIT_IN_TARGET = """\
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: default-edit
  namespace: target-ns
subjects:
- kind: ServiceAccount
  name: default
  namespace: target-ns
roleRef:
  kind: ClusterRole
  name: edit
  apiGroup: rbac.authorization.k8s.io
"""
VIEW_FOR_BOB = """\
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: bob-cdi-view
  namespace: default
subjects:
- kind: User
  name: bob
  apiGroup: rbac.authorization.k8s.io
roleRef:
  kind: ClusterRole
  name: cdi.kubevirt.io:view
  apiGroup: rbac.authorization.k8s.io
"""


def clone(name: str, source_namespace: str) -> dict[str, object]:
    return {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
            "metadata": {"name": name, "namespace": "target-ns"},
            "spec": {"source": {"pvc": {"namespace": source_namespace, "name": "golden"}},
                     "storage": {"resources": {"requests": {"storage": "64Mi"}}}}}


def make_token(server: Server, *args: str) -> tuple[str, Path]:
    """A new token (made with the admin's) and a 0600 file holding it."""
    p = server.cli("auth", "create-token", *args)
    assert p.returncode == 0, p.stderr
    token = p.stdout.strip()
    assert token and "\n" not in token
    path = server.root / f"token-{len(list(server.root.glob('token-*')))}"
    path.write_text(token + "\n")
    path.chmod(0o600)
    return token, path


def as_token(server: Server, token: str) -> requests.Session:
    s = requests.Session()
    s.headers["Authorization"] = f"Bearer {token}"
    s.verify = True
    return s


def apply(server: Server, text: str, name: str) -> None:
    path = server.root / name
    path.write_text(text)
    p = server.cli("apply", "-f", str(path))
    assert p.returncode == 0, p.stderr


def test_a_user_without_bindings_is_forbidden(server: Server) -> None:
    token, token_file = make_token(server, "--user", "alice", "--group", "dev")
    message = ('datavolumes.cdi.kubevirt.io is forbidden: User "alice" cannot list resource '
               '"datavolumes" in API group "cdi.kubevirt.io" in the namespace "default"')
    p = server.cli("get", "dv", "--token-file", str(token_file))
    assert (p.returncode, p.stdout, p.stderr) == (
        1, "", f"Error from server (Forbidden): {message}\n")
    with as_token(server, token) as s:
        r = s.get(server.path("dv"), timeout=10)
        assert r.status_code == 403
        assert r.json() == {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": "Forbidden",
            "details": {"group": "cdi.kubevirt.io", "kind": "datavolumes"}, "code": 403}
        r = s.get(server.url + "/auth/v1/tokens", timeout=10)
        assert (r.status_code, r.json()["message"]) == (
            403, 'forbidden: User "alice" cannot get path "/auth/v1/tokens"')
        # discovery and CDI's config-reader are every authenticated user's
        assert s.get(server.url + "/apis", timeout=10).status_code == 200
        assert s.get(server.path("storageprofile", None, ""), timeout=10).status_code == 200
    p = server.cli("auth", "list-tokens", "--token-file", str(token_file))
    assert p.returncode == 1
    assert 'cannot get path "/auth/v1/tokens"' in p.stderr


def test_seed_cross_namespace_clone_rbac(server: Server) -> None:
    token, token_file = make_token(server, "--service-account", "target-ns/default")
    apply(server, EDIT_IN_TARGET, "edit.yaml")
    with as_token(server, token) as s:
        r = s.post(server.path("dv", None, "target-ns"), json=clone("before", "source-ns"),
                   timeout=10)
        assert (r.status_code, r.json()["message"]) == (422, (
            "User system:serviceaccount:target-ns:default has insufficient permissions in "
            "clone source namespace source-ns"))
        assert r.json()["details"]["causes"] == [{
            "reason": "FieldValueInvalid", "field": "spec.source.PVC.namespace",
            "message": r.json()["message"]}]

        apply(server, CLUSTER_ROLE, "datavolume-cloner.yaml")
        apply(server, ROLE_BINDING, "allow-clone-to-user.yaml")
        r = s.post(server.path("dv", None, "target-ns"), json=clone("after", "source-ns"),
                   timeout=10)
        assert r.status_code == 201, r.text
        # the binding is for source-ns only
        r = s.post(server.path("dv", None, "target-ns"), json=clone("other", "other-ns"),
                   timeout=10)
        assert r.status_code == 422, r.text
    # the same through the CLI, with the service account's token
    dv = server.root / "dv.json"
    dv.write_text(json.dumps(clone("via-cli", "source-ns")))
    p = server.cli("create", "-f", str(dv), "--token-file", str(token_file))
    assert (p.returncode, p.stdout) == (0, "datavolume.cdi.kubevirt.io/via-cli created\n"), \
        p.stderr


def _volume(server: Server, claim: str, namespace: str) -> Path:
    """The file behind a filesystem claim of `cdi serve`."""
    pv = server.get("pvc", claim, namespace)["spec"]["volumeName"]
    return server.data_dir / "volumes" / pv / "disk.img"


def test_a_datasource_chain_is_checked_against_the_claim_it_ends_at(server: Server) -> None:
    """DataVolume -> DataSource "latest" -> DataSource "fedora" -> claim source-ns/golden:
    the service account, which may make DataSources in its own namespace, clones from
    source-ns through them only once the seed's binding lets it clone from there."""
    for ns in ("source-ns", "target-ns"):
        namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}
        assert server.create(namespace).status_code in (201, 409)
    golden = {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
              "metadata": {"name": "golden", "namespace": "source-ns"},
              "spec": {"source": {"blank": {}},
                       "storage": {"resources": {"requests": {"storage": "8Mi"}}}}}
    assert server.create(golden).status_code == 201
    server.wait_for("dv", "golden", lambda o: o.get("status", {}).get("phase") == "Succeeded",
                    namespace="source-ns")
    content = bytes(range(256)) * 4096  # 1 MiB that is not zeros, 3 MiB in
    with _volume(server, "golden", "source-ns").open("r+b") as f:
        f.seek(3 << 20)
        f.write(content)

    token, _ = make_token(server, "--service-account", "target-ns/default")
    apply(server, EDIT_IN_TARGET, "edit.yaml")
    by_ref = {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
              "metadata": {"name": "vm-disk", "namespace": "target-ns"},
              "spec": {"sourceRef": {"kind": "DataSource", "name": "latest"},
                       "storage": {"resources": {"requests": {"storage": "8Mi"}}}}}
    with as_token(server, token) as s:
        for name, source in (("fedora", {"pvc": {"namespace": "source-ns", "name": "golden"}}),
                             ("latest", {"dataSource": {"name": "fedora"}})):
            r = s.post(server.path("das", None, "target-ns"), timeout=10, json={
                "apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataSource",
                "metadata": {"name": name, "namespace": "target-ns"},
                "spec": {"source": source}})
            assert r.status_code == 201, r.text
        r = s.post(server.path("dv", None, "target-ns"), json=by_ref, timeout=10)
        message = ("User system:serviceaccount:target-ns:default has insufficient "
                   "permissions in clone source namespace source-ns")
        assert (r.status_code, r.json()["message"], r.json()["reason"]) == (
            422, message, "Invalid")
        assert r.json()["details"]["causes"] == [{
            "reason": "FieldValueInvalid", "field": "spec.source.PVC.namespace",
            "message": message}]
        assert s.get(server.path("dv", "vm-disk", "target-ns"), timeout=10).status_code == 404

        apply(server, CLUSTER_ROLE, "datavolume-cloner.yaml")
        apply(server, ROLE_BINDING, "allow-clone-to-user.yaml")
        r = s.post(server.path("dv", None, "target-ns"), json=by_ref, timeout=10)
        assert r.status_code == 201, r.text
    dv = server.wait_for("dv", "vm-disk",
                         lambda o: o.get("status", {}).get("phase") in ("Succeeded", "Failed"),
                         namespace="target-ns", timeout=90)
    assert dv["status"]["phase"] == "Succeeded", dv["status"]
    with _volume(server, "vm-disk", "target-ns").open("rb") as f:
        f.seek(3 << 20)
        assert f.read(len(content)) == content
    assert server.get("pvc", "vm-disk", "target-ns")["metadata"]["annotations"][
        "k8s.io/CloneRequest"] == "source-ns/golden"


def test_cdi_view_lets_a_user_read_but_not_create(server: Server) -> None:
    assert server.create({"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
                          "metadata": {"name": "blank"},
                          "spec": {"source": {"blank": {}},
                                   "storage": {"resources": {"requests": {"storage": "1Mi"}}}}}
                         ).status_code == 201
    token, token_file = make_token(server, "--user", "bob")
    apply(server, VIEW_FOR_BOB, "bob.yaml")
    p = server.cli("get", "dv", "--token-file", str(token_file))
    assert p.returncode == 0, p.stderr
    assert "blank" in p.stdout
    p = server.cli("get", "dv", "blank", "-o", "json", "--token-file", str(token_file))
    assert p.returncode == 0 and json.loads(p.stdout)["metadata"]["name"] == "blank"
    manifest = server.root / "new.json"
    manifest.write_text(json.dumps(clone("new", "target-ns") | {
        "metadata": {"name": "new", "namespace": "default"}}))
    p = server.cli("create", "-f", str(manifest), "--token-file", str(token_file))
    assert p.returncode == 1
    assert p.stderr == (
        'Error from server (Forbidden): datavolumes.cdi.kubevirt.io is forbidden: User "bob" '
        'cannot create resource "datavolumes" in API group "cdi.kubevirt.io" in the namespace '
        '"default"\n')
    p = server.cli("get", "dv", "-n", "other", "--token-file", str(token_file))
    assert p.returncode == 1 and 'in the namespace "other"' in p.stderr
    with as_token(server, token) as s:
        r = s.get(server.path("dv"), params={"watch": "true", "timeoutSeconds": "1"},
                  timeout=10)
        assert r.status_code == 200  # view includes watch
        r = s.delete(server.path("dv", "blank"), timeout=10)
        assert r.status_code == 403


def test_admin_tokens_listing_and_revocation(server: Server) -> None:
    alice, alice_file = make_token(server, "--user", "alice", "--group", "dev")
    sa, _ = make_token(server, "--service-account", "ns1/builder")
    p = server.cli("auth", "list-tokens")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].split() == ["ID", "KIND", "USER", "GROUPS", "AGE"]
    assert [line.split()[1:3] for line in lines[1:]] == [
        ["User", "alice"], ["ServiceAccount", "system:serviceaccount:ns1:builder"]]
    assert "dev,system:authenticated" in lines[1]
    assert alice not in p.stdout + p.stderr and sa not in p.stdout + p.stderr

    # the admin token still does everything, RBAC objects included
    r = server.session.get(server.url + RBAC_API + "/clusterroles/cdi.kubevirt.io:admin",
                           timeout=10)
    assert r.status_code == 200
    assert r.json()["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-admin"] \
        == "true"
    assert server.create(clone("admin-clone", "anywhere")).status_code == 201

    alice_id = lines[1].split()[0]
    p = server.cli("auth", "revoke", alice_id)
    assert (p.returncode, p.stdout) == (0, f"token {alice_id} for alice revoked\n"), p.stderr
    p = server.cli("get", "dv", "--token-file", str(alice_file))
    assert (p.returncode, p.stderr) == (1, "Error from server (Unauthorized): Unauthorized\n")
    p = server.cli("auth", "revoke", alice_id)
    assert p.returncode == 1 and "not found" in p.stderr

    stored = server.data_dir / "api-tokens.json"
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    assert alice not in stored.read_text() and sa not in stored.read_text()
    assert alice not in server.log() and sa not in server.log()
    assert "TOKEN created" in server.log()


def test_token_requests_are_checked(server: Server) -> None:
    p = server.cli("auth", "create-token")
    assert (p.returncode, p.stderr) == (
        1, "error: give either --user NAME or --service-account NS/NAME\n")
    p = server.cli("auth", "create-token", "--service-account", "nope")
    assert p.returncode == 1 and "expected NAMESPACE/NAME" in p.stderr
    p = server.cli("auth", "create-token", "--service-account", "Bad/x")
    assert p.returncode == 1 and "DNS-1123 label" in p.stderr
