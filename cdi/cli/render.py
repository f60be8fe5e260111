"""``cdi manifests``: the Kubernetes objects of an installation, for ``kubectl apply``.

Helm is one way to install on a cluster (``charts/cdi``); this is the other,
with no Helm needed: the same objects rendered from Python for the same
values (``-f values.yaml``, ``--set key=value``), printed as one YAML stream.
``--part crds`` prints only the CustomResourceDefinitions, so they can be
applied and established before the objects of their kinds.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from cdi.cli.options import fail
from cdi.manifests import crds, render, values


@click.command("manifests")
@click.option("-f", "--values", "values_files", multiple=True,
              type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="A values file (the chart's values.yaml keys); may be repeated.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Set one value, as helm --set (a.b=c, the value read as YAML).")
@click.option("-n", "--namespace", default=render.DEFAULT_NAMESPACE, show_default=True,
              help="The namespace the control plane runs in.")
@click.option("--part", type=click.Choice(["all", "crds", "resources"]), default="all",
              show_default=True, help="Everything, only the CRDs, or all but the CRDs.")
def manifests(values_files: tuple[Path, ...], sets: tuple[str, ...], namespace: str,
              part: str) -> None:
    """Print the Kubernetes objects that install CDI (pipe into kubectl apply -f -)."""
    try:
        settings = values.load(values_files, sets)
    except values.ValuesError as e:
        fail(f"error: {e}")
    if part == "crds":
        objs = crds.crds()
    else:
        objs = render.objects(settings, namespace, include_crds=part == "all")
    sys.stdout.write(render.to_yaml(objs))
