"""`cdi apply`, `cdi create` and `cdi delete`, run as a user runs them."""

from __future__ import annotations

import json

from tests.cdi.apiserver.test_resources import DVS, PVCS
from tests.cdi.cli.conftest import Cluster

MANIFESTS = """\
apiVersion: cdi.kubevirt.io/v1beta1
kind: DataVolume
metadata:
  name: fedora
  labels:
    os: fedora
    tier: gold
spec:
  source:
    http:
      url: http://example.com/fedora.qcow2
  storage:
    resources:
      requests:
        storage: {size}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: scratch
spec:
  accessModes: [ReadWriteOnce]
  resources:
    requests:
      storage: 1Gi
"""


def test_apply_creates_configures_and_leaves_unchanged(cluster: Cluster) -> None:
    path = cluster.write("m.yaml", MANIFESTS.format(size="10Gi"))
    p = cluster.cdi("apply", "-f", path)
    assert (p.returncode, p.stderr) == (0, "")
    assert p.stdout == ("datavolume.cdi.kubevirt.io/fedora created\n"
                        "persistentvolumeclaim/scratch created\n")

    p = cluster.cdi("apply", "-f", path)
    assert p.stdout == ("datavolume.cdi.kubevirt.io/fedora unchanged\n"
                        "persistentvolumeclaim/scratch unchanged\n")

    # A controller's change is kept; the manifest's changes win; dropped fields go.
    cluster.api("PATCH", DVS + "/fedora", json={"metadata": {"labels": {"owner": "ctl"}}},
                headers={"Content-Type": "application/merge-patch+json"})
    changed = MANIFESTS.format(size="20Gi").replace("    tier: gold\n", "")
    p = cluster.cdi("apply", "-f", "-", input=changed)
    assert p.returncode == 0, p.stderr
    assert p.stdout == ("datavolume.cdi.kubevirt.io/fedora configured\n"
                        "persistentvolumeclaim/scratch unchanged\n")
    dv = cluster.api("GET", DVS + "/fedora").json()
    assert dv["metadata"]["labels"] == {"os": "fedora", "owner": "ctl"}
    assert dv["spec"]["storage"]["resources"]["requests"]["storage"] == "20Gi"
    applied = json.loads(dv["metadata"]["annotations"][
        "kubectl.kubernetes.io/last-applied-configuration"])
    assert applied["metadata"]["labels"] == {"os": "fedora"}


def test_apply_json_and_namespace(cluster: Cluster) -> None:
    dv = {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
          "metadata": {"name": "j", "namespace": "prod"},
          "spec": {"source": {"blank": {}}}}
    path = cluster.write("dv.json", json.dumps(dv))
    p = cluster.cdi("apply", "-f", path, "-n", "prod")
    assert p.stdout == "datavolume.cdi.kubevirt.io/j created\n", p.stderr
    p = cluster.cdi("apply", "-f", path, "-n", "test")
    assert p.returncode == 1
    assert p.stderr == ('error: the namespace from the provided object "prod" does not match '
                        'the namespace "test". You must pass \'--namespace=prod\' to perform '
                        "this operation.\n")


def test_create_then_already_exists(cluster: Cluster) -> None:
    path = cluster.write("m.yaml", MANIFESTS.format(size="1Gi"))
    p = cluster.cdi("create", "-f", path)
    assert p.stdout == ("datavolume.cdi.kubevirt.io/fedora created\n"
                        "persistentvolumeclaim/scratch created\n")
    p = cluster.cdi("create", "-f", path)
    assert p.returncode == 1
    assert p.stdout == ""
    assert p.stderr == (
        'Error from server (AlreadyExists): datavolume "fedora" already exists\n'
        'Error from server (AlreadyExists): persistentvolumeclaim "scratch" already exists\n')


def test_bad_manifests(cluster: Cluster) -> None:
    p = cluster.cdi("apply", "-f", cluster.write("bad.yaml", "kind: Widget\napiVersion: v9\n"
                                                               "metadata: {name: w}\n"))
    assert p.returncode == 1
    assert p.stderr.endswith('bad.yaml: no matches for kind "Widget" in version "v9"\n')
    p = cluster.cdi("apply", "-f", cluster.write("broken.yaml", "a: [b\n"))
    assert p.returncode == 1
    assert "broken.yaml: the body is not valid YAML" in p.stderr
    p = cluster.cdi("apply", "-f", str(cluster.root / "missing.yaml"))
    assert p.returncode == 1
    assert p.stderr.startswith("error: cannot read ")


def test_delete(cluster: Cluster) -> None:
    path = cluster.write("m.yaml", MANIFESTS.format(size="1Gi"))
    cluster.cdi("create", "-f", path)
    p = cluster.cdi("delete", "dv", "fedora")
    assert (p.returncode, p.stdout) == (0, 'datavolume.cdi.kubevirt.io "fedora" deleted\n')
    assert cluster.api("GET", DVS + "/fedora").status_code == 404
    p = cluster.cdi("delete", "dv", "fedora")
    assert p.returncode == 1
    assert p.stderr == 'Error from server (NotFound): datavolume "fedora" not found\n'
    assert cluster.cdi("delete", "dv/fedora", "--ignore-not-found").returncode == 0
    p = cluster.cdi("delete", "-f", path, "--ignore-not-found")
    assert (p.returncode, p.stdout) == (0, 'persistentvolumeclaim "scratch" deleted\n')
    assert cluster.api("GET", PVCS).json()["items"] == []
