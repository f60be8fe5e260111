"""``GET /metrics``: CDI's control-plane gauges, computed from the store at each scrape.

On a cluster CDI's controllers export ``kubevirt_cdi_cr_ready``,
``kubevirt_cdi_dataimportcron_outdated``, ``kubevirt_cdi_datavolume_pending``
and ``kubevirt_cdi_storageprofile_info``, and Prometheus recording rules count
worker containers restarted more than three times.  ``cdi serve`` has no
Prometheus rules of its own to lean on, so it serves all of them, the restart
counts as plain gauges with the recording rules' names.  Each value is read
from the objects when scraped: nothing to keep in step, nothing lost on restart.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Iterator

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cdi.backends.port import Obj, ObjectStore

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DEFAULT_CLASS = "storageclass.kubernetes.io/is-default-class"
DEFAULT_VIRT_CLASS = "storageclass.kubevirt.io/is-default-virt-class"
CRON_STORAGE_CLASS = "cdi.kubevirt.io/storage.import.storageClass"
HIGH_RESTARTS = 3  # more than this many restarts is "high", as CDI's recording rules count
# Worker pods by the recording rules' name patterns: (metric, how to tell the pod).
WORKERS: tuple[tuple[str, Callable[[str], bool]], ...] = (
    ("cluster:kubevirt_cdi_import_pods_high_restart:count",
     lambda name: name.startswith("importer-")),
    ("cluster:kubevirt_cdi_upload_pods_high_restart:count",
     lambda name: name.startswith("cdi-upload-")),
    ("cluster:kubevirt_cdi_clone_pods_high_restart:count",
     lambda name: name.endswith("-source-pod")),
)


class _Fixed(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        yield from self._families


def _ann(obj: Obj) -> dict[str, str]:
    return obj.get("metadata", {}).get("annotations") or {}


def _condition(obj: Obj, ctype: str) -> Obj:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == ctype:
            return dict(c)
    return {}


def storage_profile_info(profile: Obj, storage_class: Obj | None) -> dict[str, str]:
    """The labels of ``kubevirt_cdi_storageprofile_info`` for one profile (one node here)."""
    status = profile.get("status") or {}
    sets = status.get("claimPropertySets") or []
    complete = bool(sets) and all(s.get("accessModes") and s.get("volumeMode") for s in sets)
    rwx = any("ReadWriteMany" in (s.get("accessModes") or []) for s in sets)
    smart = status.get("cloneStrategy") in ("snapshot", "csi-clone")
    ann = _ann(storage_class or {})
    return {
        "storageclass": profile["metadata"]["name"],
        "provisioner": str(status.get("provisioner", "")),
        "complete": str(complete).lower(),
        "default": str(ann.get(DEFAULT_CLASS) == "true").lower(),
        "virtdefault": str(ann.get(DEFAULT_VIRT_CLASS) == "true").lower(),
        "rwx": str(rwx).lower(),
        "smartclone": str(smart).lower(),
        # CDI: (!rwx && !single-node) || !smartclone; cdi serve is a single node.
        "degraded": str(not smart).lower(),
    }


def _restarts(pods: Iterable[Obj], is_worker: Callable[[str], bool]) -> int:
    count = 0
    for pod in pods:
        if not is_worker(pod["metadata"]["name"]):
            continue
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            if int(cs.get("restartCount", 0)) > HIGH_RESTARTS:
                count += 1
    return count


def _cron_pending(dic: Obj) -> str:
    """CDI's ``pending`` label: the cron waits for a default storage class (none was
    recorded for it yet, and its template names none)."""
    template = ((dic.get("spec") or {}).get("template") or {}).get("spec") or {}
    named = (template.get("storage") or template.get("pvc") or {}).get("storageClassName")
    return str(not _ann(dic).get(CRON_STORAGE_CLASS) and not named).lower()


async def families(store: ObjectStore) -> list[Metric]:
    crons = (await store.list("DataImportCron")).items
    volumes = (await store.list("DataVolume")).items
    classes = {c["metadata"]["name"]: c for c in (await store.list("StorageClass")).items}
    profiles = (await store.list("StorageProfile")).items
    pods = (await store.list("Pod")).items

    ready = GaugeMetricFamily("kubevirt_cdi_cr_ready",
                              "CDI install ready (-1 initializing, 0 not ready, 1 ready)")
    ready.add_metric([], 1)
    outdated = GaugeMetricFamily("kubevirt_cdi_dataimportcron_outdated",
                                 "DataImportCron has an outdated import (1) or not (0)",
                                 labels=["namespace", "cron_name", "pending"])
    for dic in crons:
        meta = dic["metadata"]
        up_to_date = _condition(dic, "UpToDate").get("status") == "True"
        outdated.add_metric([meta.get("namespace", ""), meta["name"], _cron_pending(dic)],
                            0 if up_to_date else 1)
    has_default = any(_ann(c).get(DEFAULT_CLASS) == "true" or
                      _ann(c).get(DEFAULT_VIRT_CLASS) == "true" for c in classes.values())
    pending = GaugeMetricFamily("kubevirt_cdi_datavolume_pending",
                                "DataVolumes waiting for a default storage class")
    pending.add_metric([], 0 if has_default else sum(
        1 for dv in volumes if (dv.get("status") or {}).get("phase", "Pending") == "Pending"
        and not ((dv["spec"].get("storage") or dv["spec"].get("pvc") or {})
                 .get("storageClassName"))))
    info = GaugeMetricFamily("kubevirt_cdi_storageprofile_info",
                             "StorageProfiles and how well they serve VMs",
                             labels=["storageclass", "provisioner", "complete", "default",
                                     "virtdefault", "rwx", "smartclone", "degraded"])
    for profile in profiles:
        labels = storage_profile_info(profile, classes.get(profile["metadata"]["name"]))
        info.add_metric(list(labels.values()), 1)
    result: list[Metric] = [ready, outdated, pending, info]
    for name, is_worker in WORKERS:
        g = GaugeMetricFamily(name, "Worker containers restarted more than 3 times")
        g.add_metric([], _restarts(pods, is_worker))
        result.append(g)
    return result


async def render(store: ObjectStore) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(await families(store)))
    return generate_latest(registry)


def handler(store: ObjectStore) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def metrics(request: web.Request) -> web.StreamResponse:
        return web.Response(body=await render(store), headers={"Content-Type": CONTENT_TYPE})

    return metrics
