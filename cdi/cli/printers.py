"""How ``cdi get`` shows objects: kubectl's tables, ages and output formats.

Users read ``cdi get`` output the way they read ``kubectl get``, and scripts
parse it, so the shapes follow kubectl: upper-case headers, columns padded to
the widest cell plus three spaces, ages like ``5s``, ``3m10s``, ``2h``,
``4d``, and names in ``-o name`` as ``datavolume.cdi.kubevirt.io/NAME``.
Each kind's columns are the ones kubectl (or CDI's printer columns) shows;
kinds without a table of their own show NAME and AGE.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable, Sequence
from typing import Any

from cdi.api.kinds import Kind
from cdi.apiserver import codec

Obj = dict[str, Any]
Column = tuple[str, Callable[[Obj, datetime.datetime], str]]

PADDING = 3
MIN_WIDTH = 6  # kubectl's tabwriter: cells are at least this wide, padding included

ACCESS_MODES = {"ReadWriteOnce": "RWO", "ReadOnlyMany": "ROX", "ReadWriteMany": "RWX",
                "ReadWriteOncePod": "RWOP"}
DEFAULT_CLASS = "storageclass.kubernetes.io/is-default-class"


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def parse_time(value: Any) -> datetime.datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        t = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=datetime.UTC)


def human_duration(seconds: float) -> str:
    """A duration the way kubectl prints ages: two units at most, coarser as it grows."""
    if seconds < -1:
        return "<invalid>"
    s = max(int(seconds), 0)
    minutes, hours, days = s // 60, s // 3600, s // 86400
    if s < 120:
        return f"{s}s"
    if minutes < 10:
        return f"{minutes}m{s % 60}s" if s % 60 else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        return f"{days}d{hours % 24}h" if hours % 24 else f"{days}d"
    if days < 365 * 2:
        return f"{days}d"
    years = days // 365
    if years < 8:
        return f"{years}y{days % 365}d" if days % 365 else f"{years}y"
    return f"{years}y"


def age(timestamp: Any, at: datetime.datetime) -> str:
    t = parse_time(timestamp)
    return human_duration((at - t).total_seconds()) if t else "<unknown>"


def widths(rows: Sequence[Sequence[str]]) -> list[int]:
    """Column widths for ROWS (header included), the last column excluded."""
    return [max(MIN_WIDTH, max(len(r[i]) for r in rows) + PADDING)
            for i in range(len(rows[0]) - 1)]


def line(cells: Sequence[str], column_widths: Sequence[int]) -> str:
    """One table line; a cell wider than its column widens it for this line only."""
    padded = "".join(c.ljust(max(w, len(c) + PADDING))
                     for c, w in zip(cells, column_widths, strict=False))
    return (padded + cells[-1]).rstrip()


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Lines of a column-aligned table (kubectl's tabwriter layout)."""
    all_rows = [list(header), *[list(r) for r in rows]]
    w = widths(all_rows)
    return [line(r, w) for r in all_rows]


def qualified_name(kind: Kind, name: str) -> str:
    """``datavolume.cdi.kubevirt.io/NAME`` (``pod/NAME`` for the core group)."""
    resource = f"{kind.singular}.{kind.group}" if kind.group else kind.singular
    return f"{resource}/{name}"


def name_of(obj: Obj) -> str:
    return str((obj.get("metadata") or {}).get("name") or "")


def columns(kind: Kind, *, wide: bool = False, namespaces: bool = False) -> list[Column]:
    """The table columns for KIND."""
    cols = list(_COLUMNS.get(kind.kind, _GENERIC))
    if wide:
        cols += _WIDE.get(kind.kind, [])
    if namespaces:
        cols.insert(0, ("NAMESPACE", lambda o, t: _get(o, "metadata", "namespace")))
    return cols


def header(cols: Sequence[Column]) -> list[str]:
    return [title for title, _ in cols]


def row(cols: Sequence[Column], obj: Obj, at: datetime.datetime) -> list[str]:
    return [cell(obj, at) for _, cell in cols]


def render(obj: Any, output: str) -> str:
    """OBJ as ``json`` or ``yaml`` text, ending in a newline."""
    if output == "json":
        return json.dumps(obj, indent=4) + "\n"
    return codec.dump_yaml(obj)


def as_list(items: list[Obj]) -> Obj:
    """Several objects as kubectl prints them with -o json/yaml."""
    return {"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": ""},
            "items": items}


# -- cells -------------------------------------------------------------------

def _get(obj: Any, *keys: str | int, default: str = "") -> str:
    for key in keys:
        if isinstance(obj, dict) and isinstance(key, str):
            obj = obj.get(key)
        elif isinstance(obj, list) and isinstance(key, int) and -len(obj) <= key < len(obj):
            obj = obj[key]
        else:
            return default
    return default if obj is None or obj == "" else str(obj)


def _age(obj: Obj, at: datetime.datetime) -> str:
    return age(_get(obj, "metadata", "creationTimestamp"), at)


def _name(obj: Obj, at: datetime.datetime) -> str:
    return name_of(obj)


def access_modes(modes: Any) -> str:
    if not isinstance(modes, list):
        return ""
    return ",".join(ACCESS_MODES.get(m, str(m)) for m in modes)


def _dv_source(obj: Obj, at: datetime.datetime) -> str:
    spec = obj.get("spec") or {}
    source = spec.get("source") or {}
    if isinstance(source, dict) and source:
        return ",".join(source)
    if spec.get("sourceRef"):
        return f"sourceRef:{_get(spec, 'sourceRef', 'name')}"
    return ""


def _dv_size(obj: Obj, at: datetime.datetime) -> str:
    spec = obj.get("spec") or {}
    for key in ("storage", "pvc"):
        size = _get(spec, key, "resources", "requests", "storage")
        if size:
            return size
    return ""


def _pod_ready(obj: Obj, at: datetime.datetime) -> str:
    statuses = _list(obj, "status", "containerStatuses")
    total = len(_list(obj, "spec", "containers")) or len(statuses)
    ready = sum(1 for s in statuses if isinstance(s, dict) and s.get("ready"))
    return f"{ready}/{total}"


def _pod_status(obj: Obj, at: datetime.datetime) -> str:
    if _get(obj, "metadata", "deletionTimestamp"):
        return "Terminating"
    for s in _list(obj, "status", "containerStatuses"):
        for state in ("waiting", "terminated"):
            reason = _get(s, "state", state, "reason")
            if reason:
                return reason
    return _get(obj, "status", "reason") or _get(obj, "status", "phase")


def _pod_restarts(obj: Obj, at: datetime.datetime) -> str:
    total = 0
    for s in _list(obj, "status", "containerStatuses"):
        if isinstance(s, dict) and isinstance(s.get("restartCount"), int):
            total += s["restartCount"]
    return str(total)


def _sc_name(obj: Obj, at: datetime.datetime) -> str:
    default = _get(obj, "metadata", "annotations", DEFAULT_CLASS) == "true"
    return name_of(obj) + (" (default)" if default else "")


def _event_object(obj: Obj, at: datetime.datetime) -> str:
    involved = obj.get("involvedObject") or {}
    return f"{str(involved.get('kind', '')).lower()}/{involved.get('name', '')}"


def event_time(obj: Obj) -> str:
    """When an Event last happened (the fields differ between event producers)."""
    for key in ("lastTimestamp", "eventTime", "firstTimestamp"):
        if obj.get(key):
            return str(obj[key])
    return _get(obj, "metadata", "creationTimestamp")


def _list(obj: Obj, *keys: str) -> list[Any]:
    value: Any = obj
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value if isinstance(value, list) else []


def _field(*keys: str, default: str = "") -> Callable[[Obj, datetime.datetime], str]:
    return lambda obj, at: _get(obj, *keys, default=default)


_GENERIC: list[Column] = [("NAME", _name), ("AGE", _age)]
_COLUMNS: dict[str, list[Column]] = {
    "DataVolume": [("NAME", _name), ("PHASE", _field("status", "phase")),
                   ("PROGRESS", _field("status", "progress", default="N/A")),
                   ("RESTARTS", _field("status", "restartCount", default="0")),
                   ("AGE", _age)],
    "PersistentVolumeClaim": [
        ("NAME", _name), ("STATUS", _field("status", "phase")),
        ("VOLUME", _field("spec", "volumeName")),
        ("CAPACITY", _field("status", "capacity", "storage")),
        ("ACCESS MODES", lambda o, t: access_modes(_list(o, "status", "accessModes"))),
        ("STORAGECLASS", _field("spec", "storageClassName")), ("AGE", _age)],
    "PersistentVolume": [
        ("NAME", _name), ("CAPACITY", _field("spec", "capacity", "storage")),
        ("ACCESS MODES", lambda o, t: access_modes(_list(o, "spec", "accessModes"))),
        ("RECLAIM POLICY", _field("spec", "persistentVolumeReclaimPolicy")),
        ("STATUS", _field("status", "phase")),
        ("CLAIM", lambda o, t: "/".join(filter(None, (_get(o, "spec", "claimRef", "namespace"),
                                                       _get(o, "spec", "claimRef", "name"))))),
        ("STORAGECLASS", _field("spec", "storageClassName")), ("AGE", _age)],
    "Pod": [("NAME", _name), ("READY", _pod_ready), ("STATUS", _pod_status),
            ("RESTARTS", _pod_restarts), ("AGE", _age)],
    "StorageClass": [("NAME", _sc_name), ("PROVISIONER", _field("provisioner")),
                     ("RECLAIMPOLICY", _field("reclaimPolicy", default="Delete")),
                     ("VOLUMEBINDINGMODE", _field("volumeBindingMode", default="Immediate")),
                     ("AGE", _age)],
    "DataImportCron": [("NAME", _name), ("FORMAT", _field("status", "sourceFormat")),
                       ("AGE", _age)],
    "Namespace": [("NAME", _name), ("STATUS", _field("status", "phase", default="Active")),
                  ("AGE", _age)],
    "Event": [("LAST SEEN", lambda o, t: age(event_time(o), t)), ("TYPE", _field("type")),
              ("REASON", _field("reason")), ("OBJECT", _event_object),
              ("MESSAGE", _field("message"))],
}
_WIDE: dict[str, list[Column]] = {
    "DataVolume": [("SOURCE", _dv_source), ("SIZE", _dv_size)],
    "PersistentVolumeClaim": [("VOLUMEMODE", _field("spec", "volumeMode",
                                                    default="Filesystem"))],
    "Pod": [("IP", _field("status", "podIP")), ("NODE", _field("spec", "nodeName"))],
}
