"""`cdi get` (tables, -o, -A, -l, -w), `cdi logs` and the CLI's error lines."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import yaml

from cdi.cli import config
from tests.cdi.apiserver.harness import datavolume
from tests.cdi.apiserver.test_resources import DVS, PVCS, SCS
from tests.cdi.cli.conftest import Cluster

CDI = "/apis/cdi.kubevirt.io/v1beta1/namespaces/default"


def lines(text: str) -> list[str]:
    return text.splitlines()


def test_datavolume_table(cluster: Cluster) -> None:
    cluster.post(DVS, datavolume("fedora"))
    cluster.set_status(DVS + "/fedora", {"phase": "Succeeded", "progress": "100.0%",
                                         "restartCount": 2})
    cluster.post(DVS, datavolume("b", url="http://x/b.img", size="2Gi"))
    p = cluster.cdi("get", "dv")
    assert (p.returncode, p.stderr) == (0, "")
    out = lines(p.stdout)
    assert out[0] == "NAME     PHASE       PROGRESS   RESTARTS   AGE"
    assert re.fullmatch(r"b                    N/A        0          \d+s", out[1]), out
    assert re.fullmatch(r"fedora   Succeeded   100\.0%     2          \d+s", out[2]), out

    p = cluster.cdi("get", "datavolumes", "fedora", "-o", "wide")
    out = lines(p.stdout)
    assert out[0] == "NAME     PHASE       PROGRESS   RESTARTS   AGE   SOURCE   SIZE"
    assert re.fullmatch(r"fedora   Succeeded   100\.0%     2          \d+s +http     1Gi", out[1])


def test_core_and_cluster_tables(cluster: Cluster) -> None:
    cluster.post(PVCS, {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                        "metadata": {"name": "scratch"},
                        "spec": {"accessModes": ["ReadWriteOnce"], "volumeName": "pv-1",
                                 "storageClassName": "local",
                                 "resources": {"requests": {"storage": "1Gi"}}}})
    cluster.set_status(PVCS + "/scratch", {"phase": "Bound", "capacity": {"storage": "1Gi"},
                                           "accessModes": ["ReadWriteOnce"]})
    cluster.post(SCS, {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
                       "metadata": {"name": "local", "annotations": {
                           "storageclass.kubernetes.io/is-default-class": "true"}},
                       "provisioner": "cdi.kubevirt.io/local",
                       "volumeBindingMode": "WaitForFirstConsumer"})
    cluster.post("/api/v1/namespaces/default/pods", {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "importer-fedora"},
        "spec": {"containers": [{"name": "importer", "image": "cdi-importer"}]}})
    cluster.set_status("/api/v1/namespaces/default/pods/importer-fedora", {
        "phase": "Running", "containerStatuses": [{"name": "importer", "ready": True,
                                                   "restartCount": 1}]})
    cluster.post(CDI + "/dataimportcrons", {
        "apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataImportCron",
        "metadata": {"name": "nightly"}, "spec": {}})
    cluster.set_status(CDI + "/dataimportcrons/nightly", {"sourceFormat": "pvc"})
    cluster.post(CDI + "/datasources", {"apiVersion": "cdi.kubevirt.io/v1beta1",
                                        "kind": "DataSource", "metadata": {"name": "fedora"},
                                        "spec": {}})

    def table(*args: str) -> list[str]:
        p = cluster.cdi("get", *args)
        assert (p.returncode, p.stderr) == (0, "")
        return lines(p.stdout)

    out = table("pvc")
    assert out[0] == "NAME      STATUS   VOLUME   CAPACITY   ACCESS MODES   STORAGECLASS   AGE"
    assert re.fullmatch(r"scratch   Bound    pv-1     1Gi        RWO            local          "
                        r"\d+s", out[1]), out
    out = table("sc")
    assert out[0] == ("NAME              PROVISIONER             RECLAIMPOLICY   "
                      "VOLUMEBINDINGMODE      AGE")
    assert re.fullmatch(r"local \(default\)   cdi\.kubevirt\.io/local   Delete          "
                        r"WaitForFirstConsumer   \d+s", out[1]), out
    out = table("po")
    assert out[0] == "NAME              READY   STATUS    RESTARTS   AGE"
    assert re.fullmatch(r"importer-fedora   1/1     Running   1          \d+s", out[1]), out
    out = table("dic")
    assert out[0] == "NAME      FORMAT   AGE"
    assert re.fullmatch(r"nightly   pvc      \d+s", out[1]), out
    out = table("das")
    assert out[0] == "NAME     AGE"
    assert re.fullmatch(r"fedora   \d+s", out[1]), out


def test_namespaces_and_selectors(cluster: Cluster) -> None:
    cluster.post(DVS, datavolume("a", labels={"app": "web"}))
    cluster.post(DVS, datavolume("b", labels={"app": "db"}))
    cluster.post("/apis/cdi.kubevirt.io/v1beta1/namespaces/prod/datavolumes",
                 datavolume("c", namespace="prod", labels={"app": "web"}))
    out = lines(cluster.cdi("get", "dv", "-A", "-l", "app=web").stdout)
    assert out[0] == "NAMESPACE   NAME   PHASE   PROGRESS   RESTARTS   AGE"
    assert [line.split()[:2] for line in out[1:]] == [["default", "a"], ["prod", "c"]]
    assert lines(cluster.cdi("get", "dv", "-n", "prod", "-o", "name").stdout) == [
        "datavolume.cdi.kubevirt.io/c"]
    p = cluster.cdi("get", "dv", "-n", "empty")
    assert (p.returncode, p.stdout, p.stderr) == (0, "", "No resources found in empty "
                                                         "namespace.\n")


def test_output_json_and_yaml(cluster: Cluster) -> None:
    created = cluster.post(DVS, datavolume("a"))
    cluster.post(DVS, datavolume("b"))
    one = json.loads(cluster.cdi("get", "dv", "a", "-o", "json").stdout)
    assert one["metadata"]["uid"] == created["metadata"]["uid"]
    both = json.loads(cluster.cdi("get", "dv", "-o", "json").stdout)
    assert both["kind"] == "List"
    assert [o["metadata"]["name"] for o in both["items"]] == ["a", "b"]
    doc = yaml.safe_load(cluster.cdi("get", "dv", "a", "-o", "yaml").stdout)
    assert doc["spec"] == created["spec"]
    assert isinstance(doc["metadata"]["creationTimestamp"], str)


def test_watch(cluster: Cluster) -> None:
    cluster.post(DVS, datavolume("a"))
    proc = cluster.popen("get", "dv", "-w")
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "NAME   PHASE   PROGRESS   RESTARTS   AGE\n"
        assert proc.stdout.readline().startswith("a              N/A        0          ")
        cluster.set_status(DVS + "/a", {"phase": "ImportInProgress", "progress": "42.0%"})
        assert proc.stdout.readline().startswith("a      ImportInProgress   42.0%      0   ")
        cluster.post(DVS, datavolume("b"))
        assert proc.stdout.readline().startswith("b              N/A        0          ")
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert "Traceback" not in err


def test_logs(cluster: Cluster) -> None:
    log = cluster.logs / "default" / "importer-a.log"
    log.parent.mkdir(parents=True)
    log.write_text("I0101 Validating image\nImport Complete\n")
    p = cluster.cdi("logs", "importer-a")
    assert (p.returncode, p.stdout) == (0, "I0101 Validating image\nImport Complete\n")
    p = cluster.cdi("logs", "importer-b")
    assert p.returncode == 1
    assert p.stderr == ('Error from server (NotFound): no log for pod "importer-b" in '
                        'namespace "default"\n')


def test_error_lines(cluster: Cluster, tmp_path: Path) -> None:
    p = cluster.cdi("get", "dv", "missing")
    assert (p.returncode, p.stdout) == (1, "")
    assert p.stderr == 'Error from server (NotFound): datavolume "missing" not found\n'
    p = cluster.cdi("get", "widgets")
    assert (p.returncode, p.stderr) == (1, 'error: the server doesn\'t have a resource type '
                                           '"widgets"\n')

    wrong = tmp_path / "wrong-token"
    wrong.write_text("nope\n")
    p = cluster.cdi("get", "dv", "--token-file", str(wrong))
    assert (p.returncode, p.stderr) == (1, "Error from server (Unauthorized): Unauthorized\n")

    nowhere = dict(cluster.env, XDG_CONFIG_HOME=str(tmp_path / "none"))
    del nowhere["CDI_DATA_DIR"]
    p = cluster.cdi("get", "dv", env=nowhere)
    assert p.returncode == 1
    assert p.stderr.startswith("error: no cdi server found: start one with `cdi serve`")

    # The pointer file alone finds the server.
    config_home = tmp_path / "pointer-only"
    pointer_env = dict(nowhere, XDG_CONFIG_HOME=str(config_home))
    pointer = config_home / "cdi" / "current.json"
    pointer.parent.mkdir(parents=True)
    pointer.write_text((cluster.data_dir / "server.json").read_text())
    assert cluster.cdi("get", "dv", env=pointer_env).returncode == 0

    stopped = tmp_path / "stopped"
    stopped.mkdir()
    config.write_server_info(stopped, "http://127.0.0.1:9", cluster.data_dir / "api-token")
    p = cluster.cdi("get", "dv", "--data-dir", str(stopped))
    assert p.returncode == 1
    assert p.stderr == ("error: cannot reach the cdi server at http://127.0.0.1:9: "
                        "[Errno 111] Connection refused\n")
    assert "Traceback" not in p.stderr
