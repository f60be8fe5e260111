"""``cdi manifests`` prints objects the API server would accept, and the ones CDI's users expect.

Built-in kinds are validated against the official Kubernetes schemas
(``kubernetes-validate``, strict: an unknown field is an error) for the oldest
Kubernetes the chart supports and the newest the package bundles; CDIConfig
and CDI against our own generated CRDs; the Prometheus operator's and
cert-manager's kinds, whose CRDs are not ours, field by field.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from click.testing import CliRunner
from kubernetes_validate import utils as kubernetes_validate

from cdi.api.kinds import BY_KIND
from cdi.cli.main import main
from cdi.manifests import crds, monitoring, render, values
from tests.cdi.manifests.chart import NON_DEFAULT, chart_meta

Obj = dict[str, Any]

OLDEST = chart_meta()["kubeVersion"].removeprefix(">=").removesuffix("-0")
KUBERNETES_VERSIONS = (OLDEST, kubernetes_validate.latest_version())
EVERYTHING = ["certificates.certManager.enabled=true", "monitoring.enabled=true",
              "rbac.operator=true"]
CRD_TYPED = {"CDIConfig", "CDI"}
FOREIGN = {"PrometheusRule", "ServiceMonitor", "Issuer", "Certificate"}


def _cli(*args: str) -> list[Obj]:
    result = CliRunner().invoke(main, ["manifests", *args])
    assert result.exit_code == 0, result.output
    return [d for d in yaml.safe_load_all(result.output) if d is not None]


@pytest.fixture(scope="module")
def everything() -> list[Obj]:
    return render.objects(values.load(sets=EVERYTHING + NON_DEFAULT[1:]), "cdi")


def test_cli_prints_the_rendered_objects(tmp_path: Path) -> None:
    assert _cli() == render.objects(values.load())
    file = tmp_path / "values.yaml"
    file.write_text("scratchSpaceStorageClass: fast\nmonitoring: {enabled: true}\n")
    objs = _cli("-f", str(file), "--set", "featureGates=[HonorWaitForFirstConsumer]",
                "-n", "storage")
    assert objs == render.objects(values.load([file], ["featureGates=[HonorWaitForFirstConsumer]"]),
                                  "storage")
    config = next(o for o in objs if o["kind"] == "CDIConfig")
    assert config["spec"]["scratchSpaceStorageClass"] == "fast"
    assert config["spec"]["featureGates"] == ["HonorWaitForFirstConsumer"]
    assert {o["metadata"].get("namespace") for o in objs} >= {"storage"}
    assert "PrometheusRule" in {o["kind"] for o in objs}


def test_cli_parts_split_crds_from_the_rest() -> None:
    only_crds = _cli("--part", "crds")
    rest = _cli("--part", "resources")
    assert only_crds == crds.crds()
    assert "CustomResourceDefinition" not in {o["kind"] for o in rest}
    assert len(only_crds) + len(rest) == len(_cli())


@pytest.mark.parametrize(("args", "message"), [
    (["--set", "nosuchkey=1"], "unknown values: nosuchkey"),
    (["--set", "image.tga=1.0"], "unknown values: image.tga"),
    (["--set", "image.tag=1.0"], "image.tag: expected str, got float"),
    (["--set", "image=nginx"], "image: expected dict"),
    (["--set", "filesystemOverhead.global=0.1"], 'quote the fraction, as in "0.06"'),
    (["--set", "monitoring.enabled=yes please"], "monitoring.enabled: expected bool"),
    (["--set", "novalue"], "expected key.path=value"),
])
def test_cli_refuses_bad_values(args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, ["manifests", *args])
    assert result.exit_code == 1
    assert message in result.output


def test_values_files_merge_like_helm(tmp_path: Path) -> None:
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("image: {tag: '2.0'}\nresources: {apiserver: {limits: {cpu: '1'}}}\n")
    second.write_text("image: {pullPolicy: Always}\n")
    merged = values.load([first, second], ["image.repository=r.example/cdi"])
    assert merged["image"] == {"repository": "r.example/cdi", "tag": "2.0", "pullPolicy": "Always"}
    assert merged["resources"]["apiserver"] == {"requests": {"cpu": "100m", "memory": "150Mi"},
                                                "limits": {"cpu": "1"}}
    assert values.DEFAULTS["image"]["tag"] == "0.1.0", "loading must not change the defaults"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_builtin_kinds_pass_the_official_schemas(everything: list[Obj], version: str) -> None:
    checked = set()
    for obj in everything + render.objects(values.load()):
        if obj["kind"] in CRD_TYPED | FOREIGN:
            continue
        kubernetes_validate.validate(obj, version, strict=True)
        checked.add(obj["kind"])
    assert checked >= {"Namespace", "CustomResourceDefinition", "ServiceAccount", "ClusterRole",
                       "ClusterRoleBinding", "Role", "RoleBinding", "Deployment", "Service",
                       "APIService", "ValidatingWebhookConfiguration",
                       "MutatingWebhookConfiguration"}


def test_the_official_schemas_catch_a_misplaced_field(everything: list[Obj]) -> None:
    deployment = copy.deepcopy(next(o for o in everything if o["kind"] == "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["runAsNonRoot"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


def test_cdi_kinds_pass_our_crds(everything: list[Obj]) -> None:
    for obj in everything + render.objects(values.load()):
        if obj["kind"] in CRD_TYPED:
            schema = crds.crd(BY_KIND[obj["kind"]])["spec"]["versions"][0]["schema"]
            jsonschema.Draft4Validator(schema["openAPIV3Schema"]).validate(obj)
    bad = {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "CDIConfig",
           "metadata": {"name": "config"}, "spec": {"featureGates": "HonorWaitForFirstConsumer"}}
    schema = crds.crd(BY_KIND["CDIConfig"])["spec"]["versions"][0]["schema"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft4Validator(schema["openAPIV3Schema"]).validate(bad)


def test_prometheus_rule_has_cdis_alerts(everything: list[Obj]) -> None:
    rule = next(o for o in everything if o["kind"] == "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(rule["spec"]) == {"groups"}
    (group,) = rule["spec"]["groups"]
    assert set(group) == {"name", "rules"}
    records = {r["record"]: r for r in group["rules"] if "record" in r}
    alerts = {r["alert"]: r for r in group["rules"] if "alert" in r}
    assert set(records) | set(alerts) == {r.get("record") or r.get("alert")
                                          for r in group["rules"]}
    expected = {  # reference section 8: name, for, severity
        "CDIOperatorDown": ("10m", "critical"), "CDINotReady": ("10m", "critical"),
        "CDIDataVolumeUnusualRestartCount": ("5m", "warning"),
        "CDIStorageProfilesIncomplete": ("5m", "info"),
        "CDIDataImportCronOutdated": ("15m", "warning"),
        "CDINoDefaultStorageClass": ("5m", "warning"),
        "CDIMultipleDefaultVirtStorageClasses": ("5m", "warning"),
        "CDIDefaultStorageClassDegraded": ("5m", "warning"),
    }
    assert {n: (a["for"], a["labels"]["severity"]) for n, a in alerts.items()} == expected
    for name, alert in alerts.items():
        assert set(alert) == {"alert", "expr", "for", "labels", "annotations"}
        assert re.fullmatch(r"\d+[smh]", alert["for"])
        assert alert["annotations"]["runbook_url"].endswith(f"/runbooks/{name}")
        assert alert["expr"].count("(") == alert["expr"].count(")")
        assert "{{" not in alert["annotations"]["summary"]
        # Every recording rule an alert reads is defined here.
        for used in re.findall(r"cluster:[a-z_]+:[a-z]+", alert["expr"]):
            assert used in records, (name, used)
    assert 'complete="false"' in alerts["CDIStorageProfilesIncomplete"]["expr"]
    assert 'pending="false"' in alerts["CDIDataImportCronOutdated"]["expr"]
    up = records["cluster:kubevirt_cdi_operator_up:sum"]["expr"]
    assert "namespace='cdi'" in up and "cdi-deployment-" in up
    for what, container in (("import", "importer"), ("upload", "cdi-upload-server"),
                            ("clone", "cdi-clone-source")):
        expr = records[f"cluster:kubevirt_cdi_{what}_pods_high_restart:count"]["expr"]
        assert f"container='{container}'" in expr and f"> {monitoring.RESTART_THRESHOLD}" in expr


def test_service_monitor_selects_the_metrics_service(everything: list[Obj]) -> None:
    monitor = next(o for o in everything if o["kind"] == "ServiceMonitor")
    service = next(o for o in everything
                   if o["kind"] == "Service" and o["metadata"]["name"] == "cdi-prometheus-metrics")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["cdi"]}
    ports = {p["name"] for p in service["spec"]["ports"]}
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    assert "metrics" in ports
    scraped = [o for o in everything if o["kind"] == "Deployment" and
               selector.items() <= o["spec"]["template"]["metadata"]["labels"].items()]
    assert [d["metadata"]["name"] for d in scraped] == ["cdi-deployment"]


def test_cert_manager_objects_fit_together(everything: list[Obj]) -> None:
    issuers = {o["metadata"]["name"]: o for o in everything if o["kind"] == "Issuer"}
    certs = {o["metadata"]["name"]: o for o in everything if o["kind"] == "Certificate"}
    for cert in certs.values():
        spec = cert["spec"]
        assert cert["apiVersion"] == "cert-manager.io/v1"
        assert spec["secretName"] == cert["metadata"]["name"]
        assert spec["issuerRef"]["name"] in issuers
        assert set(spec) <= {"secretName", "isCA", "commonName", "dnsNames", "usages",
                             "duration", "renewBefore", "privateKey", "issuerRef"}
        assert re.fullmatch(r"(\d+h)?(\d+m)?(\d+s)?", spec["duration"])
    for issuer in issuers.values():
        (how,) = issuer["spec"]
        if how == "ca":
            assert certs[issuer["spec"]["ca"]["secretName"]]["spec"]["isCA"] is True
    api = certs["cdi-apiserver-server-cert"]["spec"]
    assert "cdi-api.cdi.svc" in api["dnsNames"]
    # Everything that mounts or names a secret finds it made by a Certificate.
    for deployment in (o for o in everything if o["kind"] == "Deployment"):
        for volume in deployment["spec"]["template"]["spec"]["volumes"]:
            if "secret" in volume:
                assert volume["secret"]["secretName"] in certs
    injected = {o["kind"]: o["metadata"]["annotations"]["cert-manager.io/inject-ca-from"]
                for o in everything if "cert-manager.io/inject-ca-from" in
                o["metadata"].get("annotations", {})}
    assert injected == dict.fromkeys(("APIService", "ValidatingWebhookConfiguration",
                                      "MutatingWebhookConfiguration"),
                                     "cdi/cdi-apiserver-server-cert")


def test_pods_meet_the_restricted_profile(everything: list[Obj]) -> None:
    deployments = [o for o in everything if o["kind"] == "Deployment"]
    assert {d["metadata"]["name"] for d in deployments} == {
        "cdi-deployment", "cdi-apiserver", "cdi-uploadproxy"}
    for d in deployments:
        pod = d["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == pod["securityContext"]["fsGroup"] == 107
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert not pod.get("hostNetwork") and not pod.get("hostPID")
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"] == {"drop": ["ALL"]}
            assert c["readinessProbe"]["httpGet"]["path"] == "/healthz"
            assert c["livenessProbe"]["httpGet"]["port"] == 8443
            assert c["command"][0] == "cdi"
            assert all(v.get("hostPath") is None for v in pod["volumes"])
        assert d["spec"]["selector"]["matchLabels"].items() <= \
            d["spec"]["template"]["metadata"]["labels"].items()
    ns = next(o for o in render.objects(values.load()) if o["kind"] == "Namespace")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_services_and_registrations_point_at_the_pods(everything: list[Obj]) -> None:
    services = {o["metadata"]["name"]: o for o in everything if o["kind"] == "Service"}
    pods = {o["metadata"]["name"]: o["spec"]["template"]["metadata"]["labels"]
            for o in everything if o["kind"] == "Deployment"}
    assert services["cdi-api"]["spec"]["selector"].items() <= pods["cdi-apiserver"].items()
    assert services["cdi-uploadproxy"]["spec"]["selector"].items() <= \
        pods["cdi-uploadproxy"].items()
    api = next(o for o in everything if o["kind"] == "APIService")
    assert api["metadata"]["name"] == "v1beta1.upload.cdi.kubevirt.io"
    assert api["spec"]["service"] == {"namespace": "cdi", "name": "cdi-api", "port": 443}
    hooks = [o for o in everything if o["kind"].endswith("WebhookConfiguration")]
    assert {h["kind"] for h in hooks} == {"ValidatingWebhookConfiguration",
                                          "MutatingWebhookConfiguration"}
    # Each path is one that `cdi apiserver` serves (cdi/apiserver/kubeapi.py).
    served = {"/datavolume-validate": ["datavolumes"], "/datavolume-mutate": ["datavolumes"],
              "/dataimportcron-validate": ["dataimportcrons"]}
    assert sorted(h["webhooks"][0]["clientConfig"]["service"]["path"] for h in hooks) == \
        sorted(served)
    for hook in hooks:
        (entry,) = hook["webhooks"]
        assert entry["clientConfig"]["service"]["name"] == "cdi-api"
        assert entry["rules"][0]["resources"] == served[entry["clientConfig"]["service"]["path"]]
        assert entry["sideEffects"] == "None" and entry["failurePolicy"] == "Fail"
