"""What Kubernetes needs to run the control plane: CRDs, RBAC, workloads, alerts.

``crds`` generates the CustomResourceDefinitions from the API models;
``values`` holds the chart's settings and their defaults; ``rbac``,
``workloads`` (Deployments, Services, registrations, certificates) and
``monitoring`` build the objects; and ``render`` makes the configuration
objects and puts everything together for given values, the way ``charts/cdi``
does (``cdi manifests`` prints them).  Only ``cdi.api`` is imported: these are plain
dicts, and no Kubernetes client is involved.
"""
