"""``cdi apply``, ``cdi create`` and ``cdi delete``: writing objects from manifests.

``apply`` works like kubectl's client-side apply for custom resources: the
manifest is recorded in the ``kubectl.kubernetes.io/last-applied-configuration``
annotation, and a later apply computes a three-way JSON merge patch from that
record, the new manifest and the live object, so fields the server or a
controller set are kept, and fields dropped from the manifest are removed.  The
patch is applied here and the result sent with ``PUT`` carrying the live
``resourceVersion``; if the object changed in between, the server answers 409
and apply starts over from a fresh read.  An empty patch is ``unchanged`` and
sends nothing.  ``status`` in a manifest is ignored, as the server ignores it.

Every command goes through all objects and reports each one; it exits 1 if
any failed, like kubectl.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import click

from cdi.api.kinds import Kind
from cdi.apiserver import codec
from cdi.cli import manifests, printers
from cdi.cli.client import Client, ClientError, StatusError
from cdi.cli.manifests import Manifest
from cdi.cli.options import DEFAULT_NAMESPACE, api_command, kind_named, namespace_option

T = TypeVar("T")

LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
APPLY_ATTEMPTS = 5

_filename = click.option("-f", "--filename", "filenames", multiple=True, metavar="FILE",
                         help="Manifest file, directory or - for stdin (repeatable).")


@click.command()
@_filename
@namespace_option
@api_command
def apply(client: Client, filenames: tuple[str, ...], namespace: str | None) -> None:
    """Create or update objects from manifests (like kubectl apply)."""
    items = _load(filenames, namespace)
    _each(items, lambda m: f"{printers.qualified_name(m.kind, m.name)} "
                           f"{apply_manifest(client, m)}")


@click.command()
@_filename
@namespace_option
@api_command
def create(client: Client, filenames: tuple[str, ...], namespace: str | None) -> None:
    """Create objects from manifests; existing ones are an error."""
    items = _load(filenames, namespace, generate_name=True)

    def one(m: Manifest) -> str:
        created = client.create(m.kind, m.obj)
        return f"{printers.qualified_name(m.kind, printers.name_of(created))} created"

    _each(items, one)


@click.command()
@click.argument("args", nargs=-1)
@_filename
@namespace_option
@click.option("--ignore-not-found", is_flag=True, help="Do not fail on missing objects.")
@api_command
def delete(client: Client, args: tuple[str, ...], filenames: tuple[str, ...],
           namespace: str | None, ignore_not_found: bool) -> None:
    """Delete objects: KIND NAME..., KIND/NAME..., or -f FILE."""
    if filenames and args:
        raise click.UsageError("give either KIND NAME... or -f FILE, not both")
    if filenames:
        targets = [(m.kind, m.name, m.namespace) for m in _load(filenames, namespace)]
    else:
        targets = [(kind, name, namespace or DEFAULT_NAMESPACE)
                   for kind, name in _kind_names(args)]

    def one(target: tuple[Kind, str, str | None]) -> str | None:
        kind, name, ns = target
        try:
            client.delete(kind, name, ns if kind.namespaced else None)
        except StatusError as e:
            if e.code == 404 and ignore_not_found:
                return None
            raise
        resource = f"{kind.singular}.{kind.group}" if kind.group else kind.singular
        return f'{resource} "{name}" deleted'

    _each(targets, one)


def apply_manifest(client: Client, m: Manifest) -> str:
    """Apply one manifest; ``created``, ``configured`` or ``unchanged``."""
    desired = copy.deepcopy(m.obj)
    desired.pop("status", None)
    record = json.dumps(desired, sort_keys=True, separators=(",", ":"))
    meta = desired["metadata"]
    meta["annotations"] = {**(meta.get("annotations") or {}), LAST_APPLIED: record}
    for _ in range(APPLY_ATTEMPTS):
        try:
            current = client.get(m.kind, m.name, m.namespace)
        except StatusError as e:
            if e.code != 404:
                raise
            client.create(m.kind, desired)
            return "created"
        annotations = (current.get("metadata") or {}).get("annotations") or {}
        try:
            last = json.loads(annotations.get(LAST_APPLIED) or "{}")
        except ValueError:
            last = {}
        patch = three_way_patch(last, desired, current)
        if not patch:
            return "unchanged"
        try:
            client.replace(m.kind, codec.merge_patch(current, patch))
        except StatusError as e:
            if e.code == 409 and e.reason == "Conflict":
                continue
            raise
        return "configured"
    raise ClientError(f"error: {m.name}: the object kept changing; try again")


def three_way_patch(original: Any, modified: dict[str, Any],
                    current: dict[str, Any], *, top: bool = True) -> dict[str, Any]:
    """The merge patch that takes CURRENT to MODIFIED, deleting what ORIGINAL (the
    last applied manifest) had and MODIFIED dropped; ``status`` is never touched."""
    original = original if isinstance(original, dict) else {}
    patch: dict[str, Any] = {}
    for key, value in modified.items():
        if top and key == "status":
            continue
        live = current.get(key)
        if isinstance(value, dict) and isinstance(live, dict):
            sub = three_way_patch(original.get(key), value, live, top=False)
            if sub:
                patch[key] = sub
        elif live != value:
            patch[key] = value
    for key in original:
        if key not in modified and key in current and not (top and key == "status"):
            patch[key] = None
    return patch


def _load(filenames: tuple[str, ...], namespace: str | None, *,
          generate_name: bool = False) -> list[Manifest]:
    if not filenames:
        raise click.UsageError("must specify one of -f and -k")
    return manifests.load(filenames, namespace=namespace or DEFAULT_NAMESPACE,
                          explicit_namespace=namespace is not None,
                          generate_name=generate_name)


def _kind_names(args: tuple[str, ...]) -> list[tuple[Kind, str]]:
    """``KIND NAME...`` or ``KIND/NAME...`` as (kind, name) pairs."""
    if not args:
        raise click.UsageError("give KIND NAME..., KIND/NAME... or -f FILE")
    if all("/" in a for a in args):
        return [(kind_named(k), n) for k, _, n in (a.partition("/") for a in args)]
    if len(args) < 2 or any("/" in a for a in args):
        raise click.UsageError("give KIND NAME..., KIND/NAME... or -f FILE")
    kind = kind_named(args[0])
    return [(kind, name) for name in args[1:]]


def _each(items: Iterable[T], one: Callable[[T], str | None]) -> None:
    """Run ONE on every item, print its line; report failures and exit 1 at the end."""
    failed = False
    for item in items:
        try:
            line = one(item)
        except ClientError as e:
            click.echo(str(e), err=True)
            failed = True
            continue
        if line:
            click.echo(line)
    if failed:
        raise SystemExit(1)
