"""The steady state of a DataImportCron, reconciled without re-reading what cannot have moved.

A fleet of crons on short schedules spends nearly all its passes in one state:
imported, UpToDate, the digest the same as last time.  A full pass reads the
DataSource, the import's DataVolume and claim, the storage class and profile
and the snapshot (each a store round trip), and every poll's write of the
next run time brings the cron back for another full pass of its own.  With
1,000 crons on a one-minute schedule that was most of `cdi serve`'s CPU
(``docs/performance.md``, DataImportCron).

A pass can know that nothing it depends on moved: every object it reads is
watched, and the runtime asks the controller's mappers for the keys of each
event.  ``Quiet`` counts those events per cron; after a full pass that ended
UpToDate with a good poll it remembers the cron's resourceVersion (the one its
own write produced) and the count at the pass's start.  When both are still
the same, the next pass is a quiet one:

- not due: only the requeue for the next run;
- due: the poll, and one write of its result (the same annotations and
  ``lastExecutionTimestamp`` a full pass would write); a new digest or a
  failed poll ends the quiet state, so the next pass (brought by that write, or
  by the retry) is a full one.

Nothing is remembered across a restart of ``cdi serve``: the first pass of each
cron is a full one.  A controller whose events are not counted (no runtime
asked for its ``watches``, as in tests that call ``reconcile`` directly) never
takes the short pass.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Awaitable, Callable, Iterable

from cdi.backends.port import Obj, ObjectStore
from cdi.controllers.runtime import Key, Mapper, Result

log = logging.getLogger(__name__)

ANN_DESIRED_DIGEST = "cdi.kubevirt.io/storage.import.sourceDesiredDigest"
ANN_LAST_CRON_TIME = "cdi.kubevirt.io/storage.import.lastCronTime"
ANN_NEXT_CRON_TIME = "cdi.kubevirt.io/storage.import.nextCronTime"

PollIfDue = Callable[[Obj, dict[str, str], datetime.datetime], Awaitable[Result | None]]


def _rv(obj: Obj) -> str:
    return str(obj["metadata"].get("resourceVersion", ""))


def up_to_date(dic: Obj) -> bool:
    return any(c.get("type") == "UpToDate" and c.get("status") == "True"
               for c in (dic.get("status") or {}).get("conditions") or [])


class Quiet:
    """Which crons are in the steady state, and the events that end it."""

    def __init__(self) -> None:
        self._events: dict[Key, int] = {}  # watch events mapped to each cron
        self._quiet: dict[Key, tuple[str, int]] = {}  # (resourceVersion, events) when quiet
        self._counting = False  # only once the runtime maps events through ``watching``

    def watching(self, mapper: Mapper) -> Mapper:
        """MAPPER, counting each event it maps to a cron."""
        self._counting = True

        def counted(obj: Obj) -> Iterable[Key]:
            keys = list(mapper(obj))
            for key in keys:
                self._events[key] = self._events.get(key, 0) + 1
            return keys
        return counted

    def mark(self, key: Key) -> int:
        """The event count now (taken at the start of a pass)."""
        return self._events.get(key, 0)

    def unchanged(self, key: Key, dic: Obj) -> bool:
        """Whether the cron is quiet: nothing it depends on moved since its last pass."""
        return self._counting and self._quiet.get(key) == (_rv(dic), self._events.get(key, 0))

    def settle(self, key: Key, dic: Obj, rv: str, mark: int, poll_failed: bool) -> None:
        """After a full pass that wrote DIC (now at RV): quiet if it is steady."""
        if up_to_date(dic) and not poll_failed and dic["metadata"].get("annotations", {}).get(
                ANN_NEXT_CRON_TIME):
            self._quiet[key] = (rv, mark)
        else:
            self._quiet.pop(key, None)

    def forget(self, key: Key) -> None:
        self._quiet.pop(key, None)
        self._events.pop(key, None)

    async def steady_pass(self, store: ObjectStore, dic: Obj, now: datetime.datetime,
                          poll_if_due: PollIfDue, poll_failed: Callable[[], bool],
                          mark: int) -> Result | None:
        """A quiet cron's pass: the poll if due, and its result written."""
        key = (dic["metadata"]["namespace"], dic["metadata"]["name"])
        # Only the annotations and status change here: copy those, share the rest.
        ann: dict[str, str] = dict(dic["metadata"].get("annotations") or {})
        new: Obj = {**dic, "metadata": {**dic["metadata"], "annotations": ann},
                    "status": dict(dic.get("status") or {})}
        before = ann.get(ANN_DESIRED_DIGEST)
        result = await poll_if_due(new, ann, now)
        if poll_failed():
            self._quiet.pop(key, None)  # the retry is a full pass
            return result
        if ann == (dic["metadata"].get("annotations") or {}):
            return result  # not due
        written = await store.patch("DataImportCron", key[1], key[0], {
            "metadata": {"annotations": ann, "resourceVersion": _rv(dic)},
            "status": {"lastExecutionTimestamp": ann.get(ANN_LAST_CRON_TIME)}})
        if ann.get(ANN_DESIRED_DIGEST) == before:
            self._quiet[key] = (_rv(written), mark)
        else:
            log.info("[%s/%s] dataimportcron: new digest, leaving the steady state", *key)
            self._quiet.pop(key, None)  # its write brings the full pass that imports
        return result
