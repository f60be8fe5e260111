"""CDI's alerts and the scrape configuration, for clusters that run the Prometheus operator.

The alert names, severities, ``for`` durations and runbook links are CDI's
(reference section 8), so runbooks and silences written for CDI apply.  The
expressions read CDI's metric names, which the controller exports
(``kubevirt_cdi_cr_ready``, ``kubevirt_cdi_storageprofile_info``,
``kubevirt_cdi_dataimportcron_outdated``, ``kubevirt_cdi_datavolume_pending``),
plus recording rules over kube-state-metrics' restart counters for the
worker pods (import, upload, clone source: more than 3 restarts is unusual).

One difference: there is no operator pod.  The controller does what CDI's
operator reports on (it keeps the CDI resource's status), so
``cluster:kubevirt_cdi_operator_up:sum`` counts the controller's pods that are
up, and CDIOperatorDown fires when none is.
"""

from __future__ import annotations

from typing import Any

from cdi.manifests import rbac, workloads

Obj = dict[str, Any]

RUNBOOK = "https://kubevirt.io/monitoring/runbooks/{alert}"
RESTART_THRESHOLD = 3

# (recording rule, pod name pattern, container name)
_WORKERS = (
    ("import", "importer-.*", "importer"),
    ("upload", "cdi-upload-.*", "cdi-upload-server"),
    ("clone", ".*-source-pod", "cdi-clone-source"),
)

# (alert, expression, for, severity, operator health impact, summary)
ALERTS: tuple[tuple[str, str, str, str, str, str], ...] = (
    ("CDIOperatorDown", "cluster:kubevirt_cdi_operator_up:sum == 0", "10m", "critical",
     "critical", "No CDI controller pod is up"),
    ("CDINotReady", "kubevirt_cdi_cr_ready == 0", "10m", "critical", "critical",
     "CDI is installed but not ready to use"),
    ("CDIDataVolumeUnusualRestartCount",
     " or ".join(f"cluster:kubevirt_cdi_{w}_pods_high_restart:count > 0" for w, _, _ in _WORKERS),
     "5m", "warning", "none",
     "Worker pods that fill DataVolumes restart unusually often; they are probably failing"),
    ("CDIStorageProfilesIncomplete",
     'sum by(storageclass,provisioner) ((kubevirt_cdi_storageprofile_info{complete="false"}>0))',
     "5m", "info", "none",
     "A StorageProfile is incomplete: CDI cannot infer the access and volume modes of "
     "claims in its class"),
    ("CDIDataImportCronOutdated",
     'sum by(namespace,cron_name) (kubevirt_cdi_dataimportcron_outdated{pending="false"}) > 0',
     "15m", "warning", "none",
     "A DataImportCron's golden image is not being refreshed on its schedule"),
    ("CDINoDefaultStorageClass",
     'sum(kubevirt_cdi_storageprofile_info{default="true"} or on() vector(0)) + '
     'sum(kubevirt_cdi_storageprofile_info{virtdefault="true"} or on() vector(0)) + '
     '(count(kubevirt_cdi_datavolume_pending == 0) or on() vector(0)) == 0',
     "5m", "warning", "none",
     "There is no default or virtualization default StorageClass, and a DataVolume waits "
     "for one"),
    ("CDIMultipleDefaultVirtStorageClasses",
     'sum(kubevirt_cdi_storageprofile_info{virtdefault="true"} or on() vector(0)) > 1',
     "5m", "warning", "none", "More than one StorageClass is the virtualization default"),
    ("CDIDefaultStorageClassDegraded",
     'sum(kubevirt_cdi_storageprofile_info{default="true",degraded="false"} or on() vector(0)) + '
     'sum(kubevirt_cdi_storageprofile_info{virtdefault="true",degraded="false"} '
     'or on() vector(0)) + '
     'on () (0*(sum(kubevirt_cdi_storageprofile_info{default="true"}) or '
     'sum(kubevirt_cdi_storageprofile_info{virtdefault="true"}))) == 0',
     "5m", "warning", "none",
     "The default StorageClass supports neither smart clones nor ReadWriteMany"),
)


def recording_rules(namespace: str) -> list[Obj]:
    up = (f"sum(up{{namespace='{namespace}', pod=~'{workloads.CONTROLLER}-.*'}} "
          "or vector(0))")
    found = [{"record": "cluster:kubevirt_cdi_operator_up:sum", "expr": up}]
    for what, pod, container in _WORKERS:
        found.append({
            "record": f"cluster:kubevirt_cdi_{what}_pods_high_restart:count",
            "expr": (f"count(kube_pod_container_status_restarts_total{{pod=~'{pod}', "
                     f"container='{container}'}} > {RESTART_THRESHOLD}) or on() vector(0)"),
        })
    return found


def alert_rules() -> list[Obj]:
    return [{"alert": name, "expr": expr, "for": duration,
             "annotations": {"summary": summary, "runbook_url": RUNBOOK.format(alert=name)},
             "labels": {"severity": severity, "operator_health_impact": impact,
                        "kubernetes_operator_part_of": "kubevirt",
                        "kubernetes_operator_component": "containerized-data-importer"}}
            for name, expr, duration, severity, impact, summary in ALERTS]


def objects(values: Obj, namespace: str) -> list[Obj]:
    """The PrometheusRule and the ServiceMonitor, or nothing when monitoring is off."""
    if not values["monitoring"]["enabled"]:
        return []
    labels = {**rbac.LABELS, workloads.PROMETHEUS_LABEL: "true"}
    rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "prometheus-cdi-rules", "namespace": namespace, "labels": labels},
        "spec": {"groups": [{"name": "cdi.rules",
                             "rules": recording_rules(namespace) + alert_rules()}]},
    }
    monitor = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": {"name": "service-monitor-cdi", "namespace": namespace, "labels": labels},
        "spec": {
            "selector": {"matchLabels": {workloads.PROMETHEUS_LABEL: "true"}},
            "namespaceSelector": {"matchNames": [namespace]},
            "endpoints": [{"port": "metrics", "scheme": "https",
                           "tlsConfig": {"insecureSkipVerify": True}}],
        },
    }
    return [rule, monitor]
