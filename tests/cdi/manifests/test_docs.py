"""docs/kubernetes.md tells how to install, upgrade and uninstall, and describes every value."""

from __future__ import annotations

import re
from typing import Any

from cdi.manifests import values
from tests.cdi.manifests.chart import ROOT

DOC = ROOT / "docs" / "kubernetes.md"


def _leaf_keys(tree: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for k, v in tree.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict) and v and path not in values.FREE_FORM:
            keys.extend(_leaf_keys(v, f"{path}."))
        else:
            keys.append(path)
    return keys


def test_has_install_upgrade_and_uninstall_steps() -> None:
    text = DOC.read_text()
    headings = re.findall(r"(?m)^## (.+)$", text)
    for wanted in ("Install", "Upgrade", "Uninstall", "Values", "Certificates",
                   "What differs from `cdi serve`", "Not done yet"):
        assert wanted in headings, wanted
    for command in ("helm install cdi charts/cdi", "helm upgrade cdi charts/cdi",
                    "helm uninstall cdi", "cdi manifests --part crds | kubectl apply -f -",
                    "kubectl delete -f charts/cdi/crds/"):
        assert command in text, command


def test_describes_every_value() -> None:
    text = DOC.read_text()
    table = text[text.index("## Values"):text.index("## Certificates")]
    keys = _leaf_keys(values.DEFAULTS)
    assert "image.pullPolicy" in keys and "resources.apiserver" in keys
    for key in keys:
        last = key.rsplit(".", 1)[-1]
        parent = key.rsplit(".", 1)[0]
        # A row names the key whole, or its parent with the leaf beside it.
        assert f"`{key}`" in table or (f"`{parent}" in table and f"{last}" in table), key
