"""The REST API that `cdi serve` exposes (Kubernetes-style paths and watch)."""
