"""``cdi describe``: one object for a human, with its conditions and events.

Like ``kubectl describe``: identity and metadata first, then what was asked
for (spec) and what happened (status), the conditions as a table, and the
Events whose ``involvedObject`` is this object, oldest first.  DataVolumes and
PVCs get a summary of the fields people look for (source, size, phase,
progress, restarts, claim); other kinds show their spec and status as nested
``Key: value`` lines, the way kubectl shows custom resources.
"""

from __future__ import annotations

import datetime
import re
from typing import Any

import click

from cdi.api.kinds import BY_KIND, Kind
from cdi.cli import printers
from cdi.cli.client import Client
from cdi.cli.options import DEFAULT_NAMESPACE, api_command, kind_named, namespace_option

Obj = dict[str, Any]
INDENT = "  "


@click.command()
@click.argument("kind")
@click.argument("name")
@namespace_option
@api_command
def describe(client: Client, kind: str, name: str, namespace: str | None) -> None:
    """Show one object in detail, with its conditions and events."""
    if "/" in kind:
        raise click.UsageError("give KIND NAME")
    k = kind_named(kind)
    ns = (namespace or DEFAULT_NAMESPACE) if k.namespaced else None
    obj = client.get(k, name, ns)
    events = client.list(BY_KIND["Event"], ns)
    click.echo(render(k, obj, events.get("items") or [], printers.now()), nl=False)


def render(kind: Kind, obj: Obj, events: list[Obj], at: datetime.datetime) -> str:
    """The whole description of OBJ, given the Events of its namespace."""
    meta = obj.get("metadata") or {}
    lines: list[str] = []
    top = [("Name", str(meta.get("name", "")))]
    if kind.namespaced:
        top.append(("Namespace", str(meta.get("namespace", ""))))
    top += [("Labels", _pairs(meta.get("labels"))),
            ("Annotations", _pairs(meta.get("annotations"))),
            ("API Version", str(obj.get("apiVersion", kind.api_version))),
            ("Kind", str(obj.get("kind", kind.kind))),
            ("Created", _created(meta.get("creationTimestamp"), at))]
    if meta.get("deletionTimestamp"):
        top.append(("Deleting since", str(meta["deletionTimestamp"])))
    lines += _fields(top, "")
    spec, status = _summary(kind, obj)
    lines.append("Spec:" if spec else "Spec:  <none>")
    lines += _fields(spec, INDENT)
    lines.append("Status:" if status else "Status:  <none>")
    lines += _fields(status, INDENT)
    lines += _conditions(obj)
    lines += _events(kind, obj, events, at)
    return "\n".join(lines) + "\n"


def _summary(kind: Kind, obj: Obj) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    spec = obj.get("spec") if isinstance(obj.get("spec"), dict) else {}
    status = obj.get("status") if isinstance(obj.get("status"), dict) else {}
    assert isinstance(spec, dict) and isinstance(status, dict)
    if kind.kind == "DataVolume":
        return _dv_spec(spec), _present([
            ("Phase", status.get("phase")), ("Progress", status.get("progress")),
            ("Restart Count", status.get("restartCount")),
            ("Claim Name", status.get("claimName"))])
    if kind.kind == "PersistentVolumeClaim":
        return _claim(spec), _present([
            ("Phase", status.get("phase")),
            ("Capacity", (status.get("capacity") or {}).get("storage")),
            ("Access Modes", printers.access_modes(status.get("accessModes")))])
    rest = {k: v for k, v in status.items() if k != "conditions"}
    return _nested(spec), _nested(rest)


def _dv_spec(spec: Obj) -> list[tuple[str, str]]:
    fields: list[tuple[str, Any]] = []
    source = spec.get("source")
    if isinstance(source, dict) and source:
        for source_type, details in source.items():
            fields.append(("Source", f"{source_type}{_inline(details)}"))
    elif isinstance(spec.get("sourceRef"), dict):
        ref = spec["sourceRef"]
        fields.append(("Source Ref", f"{ref.get('kind', 'DataSource')} "
                                     f"{ref.get('namespace', '')}/{ref.get('name', '')}"
                       .replace(" /", " ")))
    for key in ("storage", "pvc"):
        if isinstance(spec.get(key), dict):
            fields += [(f"{key.upper() if key == 'pvc' else 'Storage'} {k}", v)
                       for k, v in _claim(spec[key])]
    return _present(fields)


def _claim(spec: Obj) -> list[tuple[str, str]]:
    requests = (spec.get("resources") or {}).get("requests") or {}
    return _present([("Size", requests.get("storage")),
                     ("Access Modes", printers.access_modes(spec.get("accessModes"))),
                     ("Storage Class", spec.get("storageClassName")),
                     ("Volume Mode", spec.get("volumeMode")),
                     ("Volume Name", spec.get("volumeName"))])


def _conditions(obj: Obj) -> list[str]:
    conditions = [c for c in ((obj.get("status") or {}).get("conditions") or [])
                  if isinstance(c, dict)]
    if not conditions:
        return []
    rows = [[str(c.get(k) or "") for k in ("type", "status", "reason", "message")]
            for c in conditions]
    return ["Conditions:", *(INDENT + line for line in printers.table(
        ["TYPE", "STATUS", "REASON", "MESSAGE"], rows))]


def _events(kind: Kind, obj: Obj, events: list[Obj], at: datetime.datetime) -> list[str]:
    meta = obj.get("metadata") or {}
    mine = [e for e in events if _involves(e.get("involvedObject") or {}, kind, meta)]
    if not mine:
        return ["Events:  <none>"]
    mine.sort(key=lambda e: printers.parse_time(printers.event_time(e))
              or datetime.datetime.min.replace(tzinfo=datetime.UTC))
    rows = [[str(e.get("type") or ""), str(e.get("reason") or ""),
             printers.age(printers.event_time(e), at), str(e.get("message") or "")]
            for e in mine]
    return ["Events:", *(INDENT + line for line in printers.table(
        ["TYPE", "REASON", "AGE", "MESSAGE"], rows))]


def _involves(involved: Obj, kind: Kind, meta: Obj) -> bool:
    if involved.get("uid") and meta.get("uid"):
        return bool(involved["uid"] == meta["uid"])
    return (involved.get("kind") == kind.kind and involved.get("name") == meta.get("name")
            and (not kind.namespaced
                 or (involved.get("namespace") or meta.get("namespace"))
                 == meta.get("namespace")))


def _fields(pairs: list[tuple[str, str]], indent: str) -> list[str]:
    """``Key:  value`` lines with the values aligned; multi-line values continue
    under the first."""
    if not pairs:
        return []
    width = max(len(key) for key, _ in pairs) + 3
    lines = []
    for key, value in pairs:
        if value == "\0nested":
            lines.append(f"{indent}{key}:")
            continue
        first, *more = value.split("\n") if value else [""]
        lines.append(f"{indent}{(key + ':').ljust(width)}{first}".rstrip())
        lines += [f"{indent}{' ' * width}{m}" for m in more]
    return lines


def _nested(value: Obj, depth: int = 0) -> list[tuple[str, str]]:
    """A dict as (key, value) pairs, sub-dicts indented under their key; the key
    names in Title Case as kubectl shows custom resources."""
    pairs: list[tuple[str, str]] = []
    pad = INDENT * depth
    for key, item in value.items():
        title = pad + _title(str(key))
        if isinstance(item, dict) and item:
            pairs.append((title, "\0nested"))
            pairs += _nested(item, depth + 1)
        elif isinstance(item, list) and item and all(isinstance(i, dict) for i in item):
            pairs.append((title, "\0nested"))
            for element in item:
                pairs += _nested(element, depth + 1)
        else:
            pairs.append((title, _scalar(item)))
    return pairs


def _present(fields: list[tuple[str, Any]]) -> list[tuple[str, str]]:
    return [(k, _scalar(v)) for k, v in fields if v not in (None, "", [], {})]


def _scalar(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(_scalar(v) for v in value)
    if isinstance(value, bool):
        return str(value).lower()
    return "" if value is None else str(value)


def _inline(details: Any) -> str:
    if not isinstance(details, dict) or not details:
        return ""
    parts = [f"{k}={_scalar(v) if not isinstance(v, dict) else _inline_dict(v)}"
             for k, v in details.items()]
    return " (" + ", ".join(parts) + ")"


def _inline_dict(value: Obj) -> str:
    return "{" + ", ".join(f"{k}={_scalar(v)}" for k, v in value.items()) + "}"


def _pairs(mapping: Any) -> str:
    if not isinstance(mapping, dict) or not mapping:
        return "<none>"
    return "\n".join(f"{k}={_shorten(str(v))}" for k, v in sorted(mapping.items()))


def _shorten(value: str, limit: int = 80) -> str:
    value = value.replace("\n", " ")
    return value if len(value) <= limit else value[:limit - 3] + "..."


def _created(timestamp: Any, at: datetime.datetime) -> str:
    if not timestamp:
        return "<unknown>"
    return f"{timestamp} ({printers.age(timestamp, at)} ago)"


_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


def _title(key: str) -> str:
    """``storageClassName`` -> ``Storage Class Name``."""
    words = _CAMEL.sub(" ", key).split(" ")
    return " ".join(w[:1].upper() + w[1:] for w in words)
