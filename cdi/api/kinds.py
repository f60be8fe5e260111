"""The kinds the control plane knows: API group, version, plural, scope, short names.

One table serves the REST API (paths), the CLI (kind names and short names,
like ``kubectl``), the object store (what is namespaced) and the controllers.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Kind:
    kind: str
    group: str  # "" for the core group
    version: str
    plural: str
    namespaced: bool
    short_names: tuple[str, ...] = ()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def singular(self) -> str:
        return self.kind.lower()

    def path(self, namespace: str | None = None, name: str | None = None) -> str:
        """The REST path of the collection, or of one object."""
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if self.namespaced and namespace:
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        return f"{base}/{name}" if name else base


CDI = "cdi.kubevirt.io"
RBAC = "rbac.authorization.k8s.io"
KINDS: tuple[Kind, ...] = (
    Kind("DataVolume", CDI, "v1beta1", "datavolumes", True, ("dv", "dvs")),
    Kind("DataSource", CDI, "v1beta1", "datasources", True, ("das",)),
    Kind("DataImportCron", CDI, "v1beta1", "dataimportcrons", True, ("dic", "dics")),
    Kind("StorageProfile", CDI, "v1beta1", "storageprofiles", False),
    Kind("CDIConfig", CDI, "v1beta1", "cdiconfigs", False),
    Kind("CDI", CDI, "v1beta1", "cdis", False, ("cdi", "cdis")),
    Kind("UploadTokenRequest", "upload.cdi.kubevirt.io", "v1beta1", "uploadtokenrequests", True,
         ("utr", "utrs")),
    Kind("PersistentVolumeClaim", "", "v1", "persistentvolumeclaims", True, ("pvc",)),
    Kind("PersistentVolume", "", "v1", "persistentvolumes", False, ("pv",)),
    Kind("Pod", "", "v1", "pods", True, ("po",)),
    Kind("Service", "", "v1", "services", True, ("svc",)),
    Kind("Event", "", "v1", "events", True, ("ev",)),
    Kind("Namespace", "", "v1", "namespaces", False, ("ns",)),
    Kind("Secret", "", "v1", "secrets", True),
    Kind("ConfigMap", "", "v1", "configmaps", True, ("cm",)),
    Kind("StorageClass", "storage.k8s.io", "v1", "storageclasses", False, ("sc",)),
    Kind("VolumeSnapshot", "snapshot.storage.k8s.io", "v1", "volumesnapshots", True, ("vs",)),
    Kind("VolumeSnapshotClass", "snapshot.storage.k8s.io", "v1", "volumesnapshotclasses", False,
         ("vsclass", "vsclasses")),
    Kind("VolumeSnapshotContent", "snapshot.storage.k8s.io", "v1", "volumesnapshotcontents",
         False, ("vsc", "vscs")),
    Kind("Role", RBAC, "v1", "roles", True),
    Kind("ClusterRole", RBAC, "v1", "clusterroles", False),
    Kind("RoleBinding", RBAC, "v1", "rolebindings", True),
    Kind("ClusterRoleBinding", RBAC, "v1", "clusterrolebindings", False),
)
BY_KIND = {k.kind: k for k in KINDS}


def lookup(name: str) -> Kind:
    """A kind by its name, plural, singular or short name, case-insensitively
    (``dv``, ``datavolume``, ``DataVolumes``, ``pvc``)."""
    wanted = name.lower()
    for k in KINDS:
        if wanted in (k.kind.lower(), k.plural, k.singular, *k.short_names):
            return k
    raise KeyError(name)


def by_path(group: str, version: str, plural: str) -> Kind:
    for k in KINDS:
        if (k.group, k.version, k.plural) == (group, version, plural):
            return k
    raise KeyError(f"{group}/{version}/{plural}")
