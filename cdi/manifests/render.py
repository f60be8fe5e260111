"""Every object of an installation, for given values: what ``cdi manifests`` prints.

Besides putting the pieces together, this module makes the objects that carry
the settings: the Namespace (restricted Pod Security enforced), the CDIConfig
``config`` (one field per value, left out when empty so CDI's default holds)
and the CDI resource ``cdi`` (certificate lifetimes, the clone strategy).

The order is the order ``kubectl apply -f -`` needs: the Namespace, the CRDs,
RBAC, then the workloads, their Services, the APIService and webhooks, the
certificates, the configuration objects (CRD-typed, so after the CRDs) and the
monitoring objects.  ``charts/cdi`` renders the same objects from templates;
the tests hold the two to each other.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from cdi.manifests import crds, monitoring, rbac, workloads

Obj = dict[str, Any]

DEFAULT_NAMESPACE = "cdi"


def objects(values: Obj, namespace: str = DEFAULT_NAMESPACE, *,
            include_crds: bool = True) -> list[Obj]:
    """The objects, in apply order (CRDs left out with INCLUDE_CRDS false, as Helm's
    ``templates/`` leaves them to ``crds/``)."""
    found: list[Obj] = []
    if values["createNamespace"]:
        found.append(namespace_object(namespace))
    if include_crds:
        found.extend(crds.crds())
    found.extend(rbac.objects(namespace, operator=bool(values["rbac"]["operator"])))
    found.extend(workloads.deployments(values, namespace))
    found.extend(workloads.services(namespace))
    found.append(workloads.api_service(values, namespace))
    found.extend(workloads.webhooks(values, namespace))
    found.extend(workloads.cert_manager_objects(values, namespace))
    found.append(cdi_config(values))
    found.append(cdi_resource(values))
    found.extend(monitoring.objects(values, namespace))
    return found


def to_yaml(objs: list[Obj]) -> str:
    """The objects as one multi-document YAML stream."""
    return yaml.safe_dump_all(objs, sort_keys=False, width=100, explicit_start=True)


def namespace_object(namespace: str) -> Obj:
    # The restricted profile is enforced on the namespace: every pod here,
    # workers included, must pass it.
    labels = {**rbac.LABELS, "pod-security.kubernetes.io/enforce": "restricted"}
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": namespace, "labels": labels}}


CONFIG_KEYS = ("uploadProxyURLOverride", "scratchSpaceStorageClass", "podResourceRequirements",
               "featureGates", "filesystemOverhead", "preallocation", "insecureRegistries",
               "cloneStrategyOverride")


def cdi_config(values: Obj) -> Obj:
    """The CDIConfig ``config``: every setting that is not empty (empty = CDI's default),
    and ``preallocation`` always (false is CDI's default)."""
    spec = {k: copy.deepcopy(values[k]) for k in CONFIG_KEYS
            if k == "preallocation" or values[k] not in ("", [], {})}
    return {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "CDIConfig",
            "metadata": {"name": "config", "labels": dict(rbac.LABELS)}, "spec": spec}


def cdi_resource(values: Obj) -> Obj:
    """The CDI resource ``cdi``: certificate lifetimes and the global clone strategy.

    Its ``spec.config`` is left empty and it carries no configAuthority
    annotation, so the CDIConfig above stays the one place for settings.
    """
    certs = values["certificates"]
    spec: Obj = {"certConfig": {"ca": copy.deepcopy(certs["ca"]),
                                "server": copy.deepcopy(certs["server"])}}
    if values["cloneStrategyOverride"]:
        spec["cloneStrategyOverride"] = values["cloneStrategyOverride"]
    spec["workload"] = copy.deepcopy(values["workload"])
    return {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "CDI",
            "metadata": {"name": "cdi", "labels": dict(rbac.LABELS)}, "spec": spec}
