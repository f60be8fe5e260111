"""The Helm chart installs what ``cdi manifests`` prints, for the default values and for others.

Helm is not available here, so ``helmlite`` renders the templates (they keep
to a subset it renders as Helm does, and it refuses anything outside it); the
objects must then equal ``cdi.manifests.render``'s, one by one.
"""

from __future__ import annotations

import json
import tomllib
from typing import Any

import pytest
import yaml

from cdi.cli import controller as controller_command
from cdi.manifests import render, values
from tests.cdi.manifests import helmlite
from tests.cdi.manifests.chart import (
    CHART,
    NON_DEFAULT,
    ROOT,
    by_key,
    chart_meta,
    render_chart,
)


def _compare(settings: dict[str, Any], namespace: str) -> None:
    from_chart = by_key(render_chart(settings, namespace))
    from_python = by_key(render.objects(settings, namespace))
    assert sorted(from_chart) == sorted(from_python)
    for k, obj in from_python.items():
        assert from_chart[k] == obj, f"{k} differs:\nchart:  {json.dumps(from_chart[k])}\n" \
                                     f"python: {json.dumps(obj)}"


def test_default_values_render_the_same_objects() -> None:
    _compare(values.load(), "cdi")


def test_non_default_values_render_the_same_objects() -> None:
    settings = values.load(sets=NON_DEFAULT)
    _compare(settings, "storage-system")
    objs = {(o["kind"], o["metadata"]["name"]): o for o in render.objects(settings, "x")}
    # The values really landed: each setting changed what it maps onto.
    assert ("Namespace", "x") not in objs
    config = objs[("CDIConfig", "config")]["spec"]
    assert config["filesystemOverhead"] == {"global": "0.08",
                                            "storageClass": {"ceph-block": "0.0"}}
    assert config["insecureRegistries"] == ["registry.lab:5000", "10.0.0.5"]
    assert config["cloneStrategyOverride"] == "csi-clone"
    assert config["preallocation"] is True
    controller = objs[("Deployment", "cdi-deployment")]["spec"]["template"]["spec"]
    assert controller["containers"][0]["image"] == "registry.example.com/storage/cdi:1.2.3"
    assert controller["containers"][0]["resources"]["limits"] == {"memory": "1Gi"}
    assert ("Certificate", "cdi-apiserver-server-cert") in objs
    assert ("PrometheusRule", "prometheus-cdi-rules") in objs
    assert ("ClusterRole", "cdi-operator-cluster") in objs


def test_the_controller_gets_its_worker_settings_from_the_deployment() -> None:
    """The chart's controller environment is what `cdi controller` builds its worker
    settings from (``cdi.controllers.workers``): one image for every worker, and the
    chart's pull policy, which the command accepts."""
    objs = by_key(render_chart(values.load(sets=NON_DEFAULT), "storage-system"))
    (container,) = objs[("apps/v1", "Deployment", "storage-system", "cdi-deployment")][
        "spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    image = "registry.example.com/storage/cdi:1.2.3"
    wanted = {"IMPORTER_IMAGE": image, "UPLOADSERVER_IMAGE": image, "CLONER_IMAGE": image,
              "PULL_POLICY": "Always"}
    assert {k: env.get(k) for k in wanted} == wanted
    options = {p.envvar: p for p in controller_command.controller.params if p.envvar}
    assert set(wanted) <= set(options)
    assert options["PULL_POLICY"].type.convert("Always", None, None) == "Always"


def test_non_default_values_change_every_setting() -> None:
    changed = values.load(sets=NON_DEFAULT)

    def leaves(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        found: dict[str, Any] = {}
        for k, v in tree.items():
            path = f"{prefix}{k}"
            if isinstance(v, dict) and v and path not in values.FREE_FORM:
                found.update(leaves(v, f"{path}."))
            else:
                found[path] = v
        return found

    before, after = leaves(values.DEFAULTS), leaves(changed)
    assert [k for k in before if k in after and before[k] == after[k]] == []


def test_every_template_renders_something() -> None:
    """No template is dead: each gives objects for the default or the non-default values."""
    context_values = [values.load(), values.load(sets=NON_DEFAULT)]
    for path in sorted((CHART / "templates").glob("*.yaml")):
        rendered = [helmlite.render(path.read_text(), {
            "Values": v, "Release": {"Namespace": "ns"}, "Chart": {}}) for v in context_values]
        docs = [d for text in rendered for d in yaml.safe_load_all(text) if d]
        assert docs, f"{path.name} renders nothing"


def test_a_template_that_differs_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The comparison sees a one-value difference between a template and the Python side."""
    real = helmlite.render

    def off_by_one(text: str, context: dict[str, Any]) -> str:
        return real(text, context).replace("timeoutSeconds: 30", "timeoutSeconds: 31")

    monkeypatch.setattr(helmlite, "render", off_by_one)
    with pytest.raises(AssertionError, match="cdi-api-datavolume-validate"):
        _compare(values.load(), "cdi")


def test_values_yaml_is_the_defaults() -> None:
    assert yaml.safe_load((CHART / "values.yaml").read_text()) == values.DEFAULTS


def test_chart_versions_follow_the_project() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    meta = chart_meta()
    assert meta["apiVersion"] == "v2" and meta["name"] == "cdi"
    assert meta["version"] == meta["appVersion"] == project == values.DEFAULTS["image"]["tag"]


def test_chart_readme_lists_the_template_subset() -> None:
    readme = (CHART / "README.md").read_text()
    for construct in ("{{ .Values.", "{{ .Release.Namespace }}", "quote", "toYaml", "nindent",
                      "{{- if", "{{- else }}", "{{- end }}"):
        assert construct in readme, construct


# --- the renderer itself -----------------------------------------------------------------------

CONTEXT = {"Values": {"a": {"b": "x"}, "on": True, "off": False, "empty": [], "n": 0,
                      "m": {"k": ["v"], "a": 1}, "s": "0.06"},
           "Release": {"Namespace": "ns"}}


@pytest.mark.parametrize(("template", "expected"), [
    ("name: {{ .Values.a.b }}", "name: x"),
    ("ns: {{ .Release.Namespace }}/{{ .Values.a.b }}", "ns: ns/x"),
    ("v: {{ .Values.s | quote }}", 'v: "0.06"'),
    ("v: {{ .Values.on }}", "v: true"),
    ("a:\n  {{- if .Values.on }}\n  b: 1\n  {{- end }}\n", "a:\n  b: 1\n"),
    ("a:\n  {{- if .Values.off }}\n  b: 1\n  {{- else }}\n  b: 2\n  {{- end }}\n",
     "a:\n  b: 2\n"),
    ("{{- if .Values.empty }}x{{- end }}y", "y"),
    ("{{- if .Values.n }}x{{- end }}y", "y"),
    ("{{- if not .Values.off }}x{{- end }}", "x"),
    ("m:\n  {{- toYaml .Values.m | nindent 2 }}\n", "m:\n  a: 1\n  k:\n  - v\n"),
    ("x {{- /* note */ -}} y", "xy"),
    ("a  {{- .Values.a.b -}}  b", "axb"),
])
def test_renderer_follows_go_templates(template: str, expected: str) -> None:
    assert helmlite.render(template, CONTEXT) == expected


@pytest.mark.parametrize("template", [
    "{{ range .Values.empty }}x{{ end }}",
    "{{ with .Values.a }}x{{ end }}",
    '{{ include "x" . }}',
    "{{ $x := 1 }}",
    "{{ default 1 .Values.n }}",
    "{{ .Values.m }}",
    "{{- if .Values.on }}x",
    "x{{- end }}",
    "{{ .Values.a.b ",
])
def test_renderer_refuses_what_it_cannot_render_like_helm(template: str) -> None:
    with pytest.raises(helmlite.Unsupported):
        helmlite.render(template, CONTEXT)


def test_renderer_refuses_a_missing_value() -> None:
    with pytest.raises(helmlite.MissingValue, match=r"\.Values\.a\.typo"):
        helmlite.render("{{ .Values.a.typo }}", CONTEXT)
