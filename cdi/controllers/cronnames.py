"""DataImportCron's pure rules: times, names of imports, garbage order, conditions.

Kept apart from the controller (``dataimportcron.py``) because they are
functions of their arguments only, tested as such: how CDI names an import
from a digest and shortens long names, which imports garbage collection
removes, and how a condition's heartbeat and transition times move.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable

from cdi.backends.port import Obj

A = "cdi.kubevirt.io/"
ANN_LAST_USE_TIME = A + "storage.import.lastUseTime"
DIGEST_SUFFIX_LENGTH = 12
DIGEST_PREFIXES = ("sha256:", "uid:")
MAX_NAME = 253


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def rfc3339(t: datetime.datetime) -> str:
    return t.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def rfc3339nano(t: datetime.datetime) -> str:
    return t.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str) -> datetime.datetime | None:
    try:
        t = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=datetime.UTC)


def _fnv32a(text: str) -> str:
    h = 0x811C9DC5
    for b in text.encode():
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return f"{h:08x}"


def resource_name(base: str, suffix: str) -> str:
    """``<base>-<suffix>``, or CDI's shortened ``<base...>-<fnv32a(base)>-<suffix>``."""
    name = f"{base}-{suffix}"
    if len(name) <= MAX_NAME:
        return name
    keep = MAX_NAME - len(suffix) - 8 - 2
    return f"{base[:keep]}-{_fnv32a(base)}-{suffix}"


def dv_name(managed_data_source: str, digest: str) -> str:
    """The import's name: the DataSource name and 12 characters of the digest."""
    prefix = next((p for p in DIGEST_PREFIXES if digest.startswith(p)), None)
    if prefix is None:
        raise ValueError("Digest has no supported prefix")
    suffix = digest[len(prefix):len(prefix) + DIGEST_SUFFIX_LENGTH]
    if len(suffix) < DIGEST_SUFFIX_LENGTH:
        raise ValueError("Digest is too short")
    return resource_name(managed_data_source, suffix)


def digested_url(url: str, digest: str) -> str:
    """``docker://host/repo:tag`` + digest -> ``docker://host/repo@digest``."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    rest = rest.partition("@")[0]
    slash = rest.rfind("/")
    if ":" in rest[slash + 1:]:
        rest = rest.rpartition(":")[0]
    return f"{scheme}{'://' if sep else ''}{rest}@{digest}"


def garbage(volumes: Iterable[Obj], keep: int) -> list[str]:
    """Names beyond the KEEP newest by ``lastUseTime`` (CDI compares the strings; a volume
    without the annotation sorts oldest).  VOLUMES: claims and DataVolumes, a name once."""
    newest: dict[str, str] = {}
    for obj in volumes:
        meta = obj["metadata"]
        used = (meta.get("annotations") or {}).get(ANN_LAST_USE_TIME, "")
        newest[meta["name"]] = max(newest.get(meta["name"], ""), used)
    ordered = sorted(newest, key=lambda n: (newest[n], n), reverse=True)
    return ordered[max(keep, 0):]


def set_condition(conditions: list[Obj], ctype: str, status: str, reason: str, message: str,
                  now: str) -> None:
    """CDI's updateConditionState: heartbeat on any change, transition on a status change."""
    cond = next((c for c in conditions if c.get("type") == ctype), None)
    if cond is None:
        cond = {"type": ctype}
        conditions.append(cond)
    if (cond.get("status"), cond.get("reason"), cond.get("message")) == (status, reason, message):
        return
    if cond.get("status") != status:
        cond["status"] = status
        cond["lastTransitionTime"] = now
    cond["lastHeartbeatTime"] = now
    cond["reason"] = reason
    cond["message"] = message
