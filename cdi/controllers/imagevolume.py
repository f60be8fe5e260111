"""Registry ``pullMethod: node`` on Kubernetes: the importer mounts the image as a volume.

With node pull the node, not the importer, pulls the DataVolume's image, with
the node's credentials and its container runtime's registry settings.  CDI
runs the image as a second container that serves its ``/disk`` over HTTP to
the importer on localhost; we ask the kubelet instead to mount the image
read-only as an OCI image volume (``volumes[].image``, KEP-4639, on by
default since Kubernetes 1.35) at ``/containerdisk``, and the importer reads
the disk file from ``/containerdisk/disk/`` (``importer.sources.imagevolume``).
So the pod has one container, as every other importer pod.

The importer pod is the ordinary one (``importpod.pod_spec``) built from the
DataVolume with only the registry URL as its source: a pull secret, a CA
ConfigMap or an insecure-registry setting are the importer's means to reach
a registry, which a node pull does not use.  What it adds: the image volume
and its mount, ``IMPORTER_PULL_METHOD=node`` (CDI's variable), and, for a
``platform.architecture``, a ``kubernetes.io/arch`` node selector (CDI's
rule: the node pulls its own architecture's image).
"""

from __future__ import annotations

import copy
from typing import Any

from cdi.backends.port import Obj
from cdi.controllers import importpod
from cdi.controllers.workers import Workers

IMAGE_DIR = "/containerdisk"  # importer.settings' default IMPORTER_IMAGE_DIR
VOLUME = "cdi-image-volume"
ARCH_LABEL = "kubernetes.io/arch"


def wanted(dv: Obj) -> bool:
    """Whether DV imports a registry image with ``pullMethod: node``."""
    registry = (dv["spec"].get("source") or {}).get("registry") or {}
    return bool(registry.get("pullMethod") == "node")


def refusal(dv: Obj, *, backend: str, workers: Workers) -> str | None:
    """Why DV's registry source cannot be imported here, or None if it can."""
    registry = (dv["spec"].get("source") or {}).get("registry") or {}
    if wanted(dv) and not workers.image_volumes:
        return (f"registry pullMethod node is not supported on the {backend} backend; "
                "use pullMethod pod (the default)")
    if registry.get("imageStream"):
        return "registry imageStream (an OpenShift ImageStream) is not supported; use url"
    return None


def reference(url: str) -> str:
    """The image reference the kubelet pulls: the source URL without ``docker://``."""
    return url.removeprefix("docker://")


def pod_spec(dv: Obj, pvc: Obj, *, block: bool, overhead: float, preallocation: bool,
             scratch: bool, proxy: dict[str, str], resources: dict[str, Any],
             workers: Workers, insecure_registries: tuple[str, ...] = ()) -> Obj:
    """The node-pull importer pod (arguments as ``importpod.pod_spec``'s; the node, not
    the importer, reaches the registry, so INSECURE_REGISTRIES does not apply)."""
    registry = dv["spec"]["source"]["registry"]
    bare = copy.deepcopy(dv)
    bare["spec"]["source"] = {"registry": {"url": registry["url"]}}
    pod = importpod.pod_spec(bare, pvc, block=block, overhead=overhead,
                             preallocation=preallocation, scratch=scratch, proxy=proxy,
                             resources=resources, workers=workers)
    image: Obj = {"reference": reference(registry["url"])}
    if workers.pull_policy:
        image["pullPolicy"] = workers.pull_policy
    spec = pod["spec"]
    spec["volumes"].append({"name": VOLUME, "image": image})
    container = spec["containers"][0]
    container.setdefault("volumeMounts", []).append(
        {"name": VOLUME, "mountPath": IMAGE_DIR, "readOnly": True})
    env = container["env"]
    at = next(i for i, e in enumerate(env) if e["name"] == "IMPORTER_CONTENTTYPE") + 1
    env.insert(at, {"name": "IMPORTER_PULL_METHOD", "value": "node"})
    architecture = (registry.get("platform") or {}).get("architecture")
    if architecture:
        spec["nodeSelector"] = {ARCH_LABEL: str(architecture)}
    return pod
