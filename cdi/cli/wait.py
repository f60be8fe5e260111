"""``cdi wait``: block until objects reach a condition or are deleted.

Scripts (and the quick start) wait for a DataVolume to be Ready rather than
poll ``get``.  Each object is read once, then watched from the version read
(``fieldSelector=metadata.name=...``), so no change between the two is
missed; a watch the server ends early (its own timeout, a restart, a 410
``Gone``) is simply read and watched again until the deadline.  The output
and the messages are kubectl's: ``<resource>/<name> condition met`` and
``error: timed out waiting for the condition on <plural>/<name>``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator
from typing import Any

import click

from cdi.api.kinds import Kind
from cdi.cli import printers
from cdi.cli.client import Client, StatusError
from cdi.cli.options import (
    DEFAULT_NAMESPACE,
    CommandError,
    api_command,
    kind_named,
    namespace_option,
    parse_duration,
)


@dataclasses.dataclass(frozen=True)
class Goal:
    """``--for``: a condition with its wanted status, or deletion."""

    delete: bool = False
    condition: str = ""
    status: str = "True"

    @classmethod
    def parse(cls, text: str) -> Goal:
        what, _, rest = text.partition("=")
        if what == "delete" and not rest:
            return cls(delete=True)
        if what == "condition" and rest:
            condition, _, status = rest.partition("=")
            return cls(condition=condition, status=status or "True")
        raise CommandError(f'error: unrecognized condition: "{text}" (use --for=condition=NAME'
                           '[=VALUE] or --for=delete)')

    def met(self, obj: dict[str, Any]) -> bool:
        for c in (obj.get("status") or {}).get("conditions") or []:
            if (isinstance(c, dict)
                    and str(c.get("type", "")).casefold() == self.condition.casefold()):
                return str(c.get("status", "")).casefold() == self.status.casefold()
        return False


class TimedOut(Exception):
    pass


@click.command()
@click.argument("resources", nargs=-1, required=True)
@click.option("--for", "for_", required=True, metavar="CONDITION",
              help="condition=NAME[=VALUE] (VALUE defaults to True) or delete.")
@click.option("--timeout", default="30s", show_default=True,
              help="How long to wait, e.g. 60s, 5m; 0 checks once.")
@namespace_option
@api_command
def wait(client: Client, resources: tuple[str, ...], for_: str, timeout: str,
         namespace: str | None) -> None:
    """Wait until KIND/NAME (or KIND NAME...) meets --for."""
    goal = Goal.parse(for_)
    deadline = time.monotonic() + parse_duration(timeout)
    ns = namespace or DEFAULT_NAMESPACE
    for kind, name in _targets(resources):
        target_ns = ns if kind.namespaced else None
        try:
            _wait_one(client, kind, name, target_ns, goal, deadline)
        except TimedOut:
            raise CommandError(f"error: timed out waiting for the condition on "
                               f"{kind.plural}/{name}") from None
        done = "deleted" if goal.delete else "condition met"
        click.echo(f"{printers.qualified_name(kind, name)} {done}")


def _wait_one(client: Client, kind: Kind, name: str, namespace: str | None, goal: Goal,
              deadline: float) -> None:
    for obj in follow(client, kind, name, namespace, deadline, missing_ok=goal.delete):
        if obj is None:
            if goal.delete:
                return
        elif not goal.delete and goal.met(obj):
            return


def follow(client: Client, kind: Kind, name: str, namespace: str | None, deadline: float,
           *, missing_ok: bool = False) -> Iterator[dict[str, Any] | None]:
    """The object now, then each new version of it as it changes, until DEADLINE (TimedOut).

    None stands for "deleted" (or, with MISSING_OK, not there when read); without
    MISSING_OK a missing object raises the 404.  A watch the server ends is
    re-read and watched again, so no change is missed and none waits for a poll.
    """
    while True:
        try:
            obj = client.get(kind, name, namespace)
        except StatusError as e:
            if e.code == 404 and missing_ok:
                yield None
                obj = None
            else:
                raise
        if obj is not None:
            yield obj
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimedOut
        version = ((obj or {}).get("metadata") or {}).get("resourceVersion")
        try:
            for event in client.watch(kind, namespace, resource_version=version,
                                      field_selector=f"metadata.name={name}",
                                      timeout_seconds=max(1, math.ceil(remaining))):
                yield None if event.get("type") == "DELETED" else (event.get("object") or {})
                if time.monotonic() >= deadline:
                    raise TimedOut
        except StatusError as e:
            if e.code != 410:
                raise
        if time.monotonic() >= deadline:
            raise TimedOut


def _targets(resources: tuple[str, ...]) -> list[tuple[Kind, str]]:
    if all("/" in r for r in resources):
        return [(kind_named(k), n) for k, _, n in (r.partition("/") for r in resources)]
    if len(resources) >= 2 and not any("/" in r for r in resources):
        kind = kind_named(resources[0])
        return [(kind, name) for name in resources[1:]]
    raise click.UsageError("give KIND/NAME... or KIND NAME...")
