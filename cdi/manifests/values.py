"""The chart's settings: their defaults, a values file on top, then ``--set`` on top of that.

``charts/cdi/values.yaml`` and ``DEFAULTS`` hold the same keys and values (a
test compares them), so ``cdi manifests`` and ``helm install`` start from the
same place and a key means the same in both.  The keys map one to one onto
what they set:

- ``image`` (repository, tag, pullPolicy): every Deployment and every worker
  pod (the controller passes it on), one image for all;
- ``resources.{controller,apiserver,uploadproxy}``: the Deployments' containers;
- ``scratchSpaceStorageClass``, ``filesystemOverhead``, ``insecureRegistries``,
  ``podResourceRequirements``, ``uploadProxyURLOverride``,
  ``cloneStrategyOverride``, ``featureGates``, ``preallocation``: the
  CDIConfig ``config``'s spec fields of the same names (empty = CDI's default);
- ``certificates``: who makes the TLS certificates (the apiserver, or
  cert-manager) and their lifetimes (the CDI resource's ``certConfig``);
- ``monitoring.enabled``: the PrometheusRule and ServiceMonitor (they need the
  Prometheus operator's CRDs on the cluster);
- ``rbac.operator``: also render the ``cdi-operator`` service account and
  its roles (seeds tables 1.3, 1.5), for tools that install as the operator;
- ``createNamespace``: render the Namespace object too.

``--set`` takes Helm's simple form: ``a.b.c=value``, the value parsed as YAML
(``true``, ``3``, ``[a,b]``, ``"0.1"`` quoted to stay a string).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]

VERSION = "0.1.0"

DEFAULTS: Obj = {
    "createNamespace": True,
    "image": {"repository": "localhost/cdi", "tag": VERSION, "pullPolicy": "IfNotPresent"},
    "resources": {
        "controller": {"requests": {"cpu": "100m", "memory": "150Mi"}},
        "apiserver": {"requests": {"cpu": "100m", "memory": "150Mi"}},
        "uploadproxy": {"requests": {"cpu": "100m", "memory": "150Mi"}},
    },
    "scratchSpaceStorageClass": "",
    "filesystemOverhead": {},
    "insecureRegistries": [],
    "podResourceRequirements": {},
    "uploadProxyURLOverride": "",
    "cloneStrategyOverride": "",
    "featureGates": [],
    "preallocation": False,
    "certificates": {
        "certManager": {"enabled": False},
        "ca": {"duration": "48h0m0s", "renewBefore": "24h0m0s"},
        "server": {"duration": "24h0m0s", "renewBefore": "12h0m0s"},
    },
    "monitoring": {"enabled": False},
    "rbac": {"operator": False},
    "workload": {"nodeSelector": {}, "affinity": {}, "tolerations": []},
}


# Values that are Kubernetes structures, passed through as they are.
FREE_FORM = frozenset({"resources.controller", "resources.apiserver", "resources.uploadproxy",
                       "workload.nodeSelector", "workload.affinity", "workload.tolerations"})


class ValuesError(Exception):
    pass


def defaults() -> Obj:
    return copy.deepcopy(DEFAULTS)


def load(files: list[Path] | tuple[Path, ...] = (), sets: list[str] | tuple[str, ...] = ()) -> Obj:
    """The defaults, each values file merged over them in order, then each ``--set``."""
    values = defaults()
    for path in files:
        try:
            loaded = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise ValuesError(f"cannot read values file {path}: {e}") from e
        if loaded is None:
            continue
        if not isinstance(loaded, dict):
            raise ValuesError(f"values file {path} must hold a mapping")
        merge(values, loaded)
    for assignment in sets:
        apply_set(values, assignment)
    check(values)
    return values


def merge(into: Obj, over: Obj) -> Obj:
    """Merge OVER into INTO as Helm does: mappings key by key, anything else replaced."""
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge(into[key], value)
        else:
            into[key] = copy.deepcopy(value)
    return into


def apply_set(values: Obj, assignment: str) -> None:
    """Apply one ``a.b.c=value``."""
    path, sep, text = assignment.partition("=")
    keys = path.split(".")
    if not sep or not all(keys):
        raise ValuesError(f"--set {assignment!r}: expected key.path=value")
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError as e:
        raise ValuesError(f"--set {assignment!r}: {e}") from e
    node = values
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ValuesError(f"--set {assignment!r}: {key} is not a mapping")
        node = child
    node[keys[-1]] = value


def check(values: Obj) -> None:
    """Refuse values of the wrong shape before they land in a manifest."""
    for key, default in DEFAULTS.items():
        if key not in values:
            raise ValuesError(f"{key}: missing")
        _check_type(key, values[key], default)
    unknown = sorted(set(values) - set(DEFAULTS))
    if unknown:
        raise ValuesError(f"unknown values: {', '.join(unknown)}")
    overhead = values["filesystemOverhead"]
    for name, fraction in _overheads(overhead):
        if not isinstance(fraction, str):
            raise ValuesError(f"filesystemOverhead{name}: quote the fraction, "
                              f"as in \"0.06\" (got {fraction!r})")


def _overheads(overhead: Obj) -> list[tuple[str, Any]]:
    found = [(".global", overhead["global"])] if "global" in overhead else []
    for sc, fraction in (overhead.get("storageClass") or {}).items():
        found.append((f".storageClass.{sc}", fraction))
    return found


def _check_type(path: str, value: Any, default: Any) -> None:
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, dict):
        ok = isinstance(value, dict)
        if ok and default and path not in FREE_FORM:  # a fixed set of keys
            unknown = sorted(set(value) - set(default))
            if unknown:
                raise ValuesError(f"unknown values: {', '.join(f'{path}.{k}' for k in unknown)}")
            for k, v in default.items():
                if k in value:
                    _check_type(f"{path}.{k}", value[k], v)
    elif isinstance(default, list):
        ok = isinstance(value, list)
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ValuesError(f"{path}: expected {type(default).__name__}, "
                          f"got {type(value).__name__} {value!r}")
