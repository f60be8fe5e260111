"""``cdi get`` (with ``-w``) and ``cdi logs``: reading objects and pod logs.

``get`` lists or reads objects and prints them as kubectl does (``printers``
has the tables); ``-w`` then follows a watch from the listed
``resourceVersion``, so no change between the list and the watch is missed,
and prints a row (or an object) per event until the server ends the stream or
the user presses Ctrl-C.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from cdi.api.kinds import Kind
from cdi.cli import printers
from cdi.cli.client import Client
from cdi.cli.options import (
    DEFAULT_NAMESPACE,
    CommandError,
    api_command,
    kind_named,
    namespace_option,
)

OUTPUTS = ("json", "yaml", "wide", "name")


class Printer:
    """Prints the first result, then one watch event at a time, in one format."""

    def __init__(self, kind: Kind, output: str | None, *, namespaces: bool) -> None:
        self.kind = kind
        self.output = output
        self.columns = printers.columns(kind, wide=output == "wide", namespaces=namespaces)
        self.widths: list[int] | None = None
        self.yaml_docs = 0

    def first(self, items: list[dict[str, Any]], *, single: bool) -> None:
        if self.output in ("json", "yaml"):
            self._document(items[0] if single and items else printers.as_list(items))
        elif self.output == "name":
            for obj in items:
                click.echo(printers.qualified_name(self.kind, printers.name_of(obj)))
        elif items:
            at = printers.now()
            self._table([printers.row(self.columns, obj, at) for obj in items])

    def event(self, event: dict[str, Any]) -> None:
        obj = event.get("object") or {}
        if self.output in ("json", "yaml"):
            self._document(obj)
        elif self.output == "name":
            click.echo(printers.qualified_name(self.kind, printers.name_of(obj)))
        else:
            self._table([printers.row(self.columns, obj, printers.now())])

    def _table(self, rows: list[list[str]]) -> None:
        """Print ROWS, with the header first if none was printed yet; watch rows
        keep the columns of the table printed before them."""
        if self.widths is None:
            header = printers.header(self.columns)
            self.widths = printers.widths([header, *rows])
            click.echo(printers.line(header, self.widths))
        for cells in rows:
            click.echo(printers.line(cells, self.widths))

    def _document(self, obj: dict[str, Any]) -> None:
        if self.output == "yaml" and self.yaml_docs:
            click.echo("---")
        self.yaml_docs += 1
        click.echo(printers.render(obj, self.output or "json"), nl=False)


@click.command()
@click.argument("kind")
@click.argument("names", nargs=-1)
@namespace_option
@click.option("-A", "--all-namespaces", is_flag=True, help="List across all namespaces.")
@click.option("-l", "--selector", default=None, help="Label selector, e.g. app=web,tier!=db.")
@click.option("-o", "--output", type=click.Choice(OUTPUTS), default=None,
              help="Output format (default: a table).")
@click.option("-w", "--watch", is_flag=True, help="After listing, print changes as they come.")
@api_command
def get(client: Client, kind: str, names: tuple[str, ...], namespace: str | None,
        all_namespaces: bool, selector: str | None, output: str | None, watch: bool) -> None:
    """Show objects of KIND (a name, plural or short name such as dv, pvc, sc)."""
    k = kind_named(kind)
    if names and selector:
        raise CommandError("error: name cannot be provided when a selector is specified")
    if names and all_namespaces and k.namespaced:
        raise CommandError("error: a resource cannot be retrieved by name across all "
                           "namespaces")
    if watch and len(names) > 1:
        raise CommandError("error: you may only specify a single resource type and name "
                           "with --watch")
    ns = None if all_namespaces or not k.namespaced else namespace or DEFAULT_NAMESPACE
    if names:
        items = [client.get(k, name, ns) for name in names]
        version = (items[0].get("metadata") or {}).get("resourceVersion")
    else:
        result = client.list(k, ns, label_selector=selector)
        items = list(result.get("items") or [])
        version = (result.get("metadata") or {}).get("resourceVersion")
    printer = Printer(k, output, namespaces=all_namespaces and k.namespaced)
    printer.first(items, single=len(names) == 1)
    if not items and not watch and output in (None, "wide"):
        where = f" in {ns} namespace" if ns else ""
        click.echo(f"No resources found{where}.", err=True)
    if watch:
        field = f"metadata.name={names[0]}" if names else None
        for event in client.watch(k, ns, resource_version=version, label_selector=selector,
                                  field_selector=field):
            printer.event(event)


@click.command()
@click.argument("pod")
@namespace_option
@api_command
def logs(client: Client, pod: str, namespace: str | None) -> None:
    """Print the log of POD."""
    if "/" in pod:
        kind, _, pod = pod.partition("/")
        if kind_named(kind).kind != "Pod":
            raise CommandError("error: only pods have logs")
    data = client.log(namespace or DEFAULT_NAMESPACE, pod)
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()
