"""The chart as Helm would install it (rendered with ``helmlite``), and objects keyed to compare."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tests.cdi.manifests import helmlite

ROOT = Path(__file__).resolve().parents[3]
CHART = ROOT / "charts" / "cdi"

Obj = dict[str, Any]

# Values that change every setting from its default, for the comparisons.
NON_DEFAULT = [
    "createNamespace=false",
    "image.repository=registry.example.com/storage/cdi",
    "image.tag=1.2.3",
    "image.pullPolicy=Always",
    "resources.controller.limits.memory=1Gi",
    "resources.apiserver.requests.cpu=200m",
    "resources.uploadproxy.limits.cpu='1'",
    "scratchSpaceStorageClass=fast-local",
    "filesystemOverhead.global='0.08'",
    "filesystemOverhead.storageClass.ceph-block='0.0'",
    "insecureRegistries=[registry.lab:5000, 10.0.0.5]",
    "podResourceRequirements.limits.cpu=2",
    "uploadProxyURLOverride=https://upload.example.com",
    "cloneStrategyOverride=csi-clone",
    "featureGates=[HonorWaitForFirstConsumer]",
    "preallocation=true",
    "certificates.certManager.enabled=true",
    "certificates.ca.duration=96h0m0s",
    "certificates.ca.renewBefore=48h0m0s",
    "certificates.server.duration=36h0m0s",
    "certificates.server.renewBefore=18h0m0s",
    "monitoring.enabled=true",
    "rbac.operator=true",
    "workload.nodeSelector.node-role/storage=''",
    "workload.affinity.nodeAffinity.preferredDuringSchedulingIgnoredDuringExecution="
    "[{weight: 1, preference: {matchExpressions: [{key: disk, operator: In, values: [ssd]}]}}]",
    "workload.tolerations=[{key: storage, operator: Exists, effect: NoSchedule}]",
]


def chart_meta() -> Obj:
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert isinstance(meta, dict)
    return meta


def render_chart(values: Obj, namespace: str, release: str = "cdi") -> list[Obj]:
    """The CRDs of ``crds/`` and every template of ``templates/`` rendered with VALUES."""
    meta = chart_meta()
    context = {"Values": values,
               "Release": {"Namespace": namespace, "Name": release, "Service": "Helm"},
               "Chart": {"Name": meta["name"], "Version": meta["version"],
                         "AppVersion": meta["appVersion"]}}
    found: list[Obj] = []
    for path in sorted((CHART / "crds").glob("*.yaml")):
        found.extend(_documents(path.read_text(), path))
    for path in sorted((CHART / "templates").glob("*.yaml")):
        found.extend(_documents(helmlite.render(path.read_text(), context), path))
    return found


def _documents(text: str, path: Path) -> list[Obj]:
    docs = [d for d in yaml.safe_load_all(text) if d is not None]
    for d in docs:
        assert isinstance(d, dict) and "kind" in d, f"{path.name}: not an object: {d!r}"
    return docs


def key(obj: Obj) -> tuple[str, str, str, str]:
    meta = obj["metadata"]
    return (obj["apiVersion"], obj["kind"], meta.get("namespace", ""), meta["name"])


def by_key(objs: list[Obj]) -> dict[tuple[str, str, str, str], Obj]:
    keyed = {key(o): o for o in objs}
    assert len(keyed) == len(objs), "two objects with the same kind, namespace and name"
    return keyed
