"""Worker settings: the images the worker Pods run, and how the node pulls them.

Which image a worker Pod runs is the installation's choice, not the
controllers': on a cluster ``cdi controller`` builds one ``Workers`` from its
Deployment's ``IMPORTER_IMAGE``, ``UPLOADSERVER_IMAGE``, ``CLONER_IMAGE`` and
``PULL_POLICY`` (CDI's variable names) and hands it to every controller that
starts workers; the pod builders (``importpod``, ``clone.pods``) put it into
each container.  ``cdi serve`` keeps the defaults: the embedded pod runner
runs a container's ``command`` as a subprocess (``cdi-importer`` is
``python -m importer``) and never looks at its image, so there the image is
just the worker's name, and no pull policy is written.

``image_volumes`` says whether worker Pods may mount an OCI image as a volume
(Kubernetes ``volumes[].image``, KEP-4639), which registry ``pullMethod: node``
needs (``imagevolume``); the embedded backend cannot.
"""

from __future__ import annotations

import dataclasses
from typing import Any

IMPORTER = "cdi-importer"
UPLOADSERVER = "cdi-uploadserver"
CLONER = "cdi-clone-source"  # the worker's command; CDI's image is "cdi-cloner"


@dataclasses.dataclass(frozen=True)
class Workers:
    importer_image: str = IMPORTER
    uploadserver_image: str = UPLOADSERVER
    cloner_image: str = CLONER
    pull_policy: str | None = None  # imagePullPolicy of worker containers and image volumes
    image_volumes: bool = False

    def container(self, name: str, command: str) -> dict[str, Any]:
        """The start of a worker container: its name, image, pull policy and command."""
        image = {IMPORTER: self.importer_image, UPLOADSERVER: self.uploadserver_image,
                 CLONER: self.cloner_image}[command]
        container: dict[str, Any] = {"name": name, "image": image}
        if self.pull_policy:
            container["imagePullPolicy"] = self.pull_policy
        container["command"] = [command]
        return container


EMBEDDED = Workers()
CLUSTER = Workers(image_volumes=True)  # `cdi controller` without images configured
