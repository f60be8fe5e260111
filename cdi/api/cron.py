"""DataImportCron schedules: the cron dialect CDI accepts, and when a schedule fires next.

CDI checks ``spec.schedule`` with the "standard" parser of robfig/cron: five
fields (minute, hour, day of month, month, day of week) with ``*``, ``?``,
lists, ranges and steps, month and weekday names, the ``@daily`` family and
``@every <duration>``, optionally after ``CRON_TZ=<zone>``.  The admission
webhook needs ``parse`` and the DataImportCron controller needs
``Schedule.next`` for its requeue, so both live here.
"""

from __future__ import annotations

import dataclasses
import datetime
import re
import zoneinfo

__all__ = ["CronError", "Schedule", "parse"]


class CronError(ValueError):
    """The schedule is not one CDI would accept."""


@dataclasses.dataclass(frozen=True)
class _Field:
    name: str
    low: int
    high: int
    names: tuple[str, ...] = ()  # names[i] stands for low + i


_FIELDS = (
    _Field("minute", 0, 59),
    _Field("hour", 0, 23),
    _Field("day of month", 1, 31),
    _Field("month", 1, 12, ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep",
                            "oct", "nov", "dec")),
    _Field("day of week", 0, 6, ("sun", "mon", "tue", "wed", "thu", "fri", "sat")),
)
_DESCRIPTORS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_DURATION = re.compile(r"^[+-]?((\d+(\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h))+$|^0$")
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0,
                 "m": 60.0, "h": 3600.0}
_SEARCH_YEARS = 5


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A parsed schedule; either the five field sets or a fixed interval (``@every``)."""

    minutes: frozenset[int] = frozenset()
    hours: frozenset[int] = frozenset()
    days: frozenset[int] = frozenset()
    months: frozenset[int] = frozenset()
    weekdays: frozenset[int] = frozenset()
    # robfig: when either day field is "*" or "?", both must match; otherwise either may.
    any_day: bool = True
    every: datetime.timedelta | None = None
    tz: zoneinfo.ZoneInfo | None = None

    def next(self, after: datetime.datetime) -> datetime.datetime:
        """The first time strictly after ``after`` when the schedule fires.

        Computed in the schedule's ``CRON_TZ`` if it has one (a naive ``after``
        is then taken as UTC), else in ``after``'s own zone or naive time.
        """
        if self.every is not None:
            return after.replace(microsecond=0) + self.every
        tz: datetime.tzinfo | None = self.tz
        if tz is not None:
            aware = after if after.tzinfo else after.replace(tzinfo=datetime.UTC)
            wall = aware.astimezone(tz).replace(tzinfo=None)
        else:
            tz = after.tzinfo
            wall = after.replace(tzinfo=None)
        found = self._next_wall(wall)
        return found.replace(tzinfo=tz) if tz is not None else found

    def _next_wall(self, wall: datetime.datetime) -> datetime.datetime:
        t = wall.replace(second=0, microsecond=0) + datetime.timedelta(minutes=1)
        give_up = t.year + _SEARCH_YEARS
        while t.year <= give_up:
            if t.month not in self.months:
                first = t.replace(day=1, hour=0, minute=0)
                t = (first + datetime.timedelta(days=32)).replace(day=1)
            elif not self._day_matches(t):
                t = t.replace(hour=0, minute=0) + datetime.timedelta(days=1)
            elif t.hour not in self.hours:
                t = t.replace(minute=0) + datetime.timedelta(hours=1)
            elif t.minute not in self.minutes:
                t += datetime.timedelta(minutes=1)
            else:
                return t
        raise CronError(f"schedule never fires within {_SEARCH_YEARS} years")

    def _day_matches(self, t: datetime.datetime) -> bool:
        dom = t.day in self.days
        dow = (t.isoweekday() % 7) in self.weekdays
        return (dom and dow) if self.any_day else (dom or dow)


def parse(spec: str) -> Schedule:
    """Parse a schedule as CDI's webhook does; raises CronError with the reason."""
    text = spec.strip()
    tz: zoneinfo.ZoneInfo | None = None
    if text.startswith(("CRON_TZ=", "TZ=")):
        zone, _, text = text.partition(" ")
        try:
            tz = zoneinfo.ZoneInfo(zone.split("=", 1)[1])
        except (ValueError, zoneinfo.ZoneInfoNotFoundError) as e:
            raise CronError(f"provided bad location {zone.split('=', 1)[1]}") from e
        text = text.strip()
    if text.startswith("@every "):
        return Schedule(every=_duration(text[len("@every "):].strip()), tz=tz)
    if text.startswith("@"):
        if text not in _DESCRIPTORS:
            raise CronError(f"unrecognized descriptor: {text}")
        text = _DESCRIPTORS[text]
    fields = text.split()
    if len(fields) != len(_FIELDS):
        raise CronError(f"expected exactly {len(_FIELDS)} fields, found {len(fields)}: {spec}")
    sets = []
    stars = []
    for raw, field in zip(fields, _FIELDS, strict=True):
        values, star = _parse_field(raw, field)
        sets.append(frozenset(values))
        stars.append(star)
    return Schedule(minutes=sets[0], hours=sets[1], days=sets[2], months=sets[3],
                    weekdays=sets[4], any_day=stars[2] or stars[4], tz=tz)


def _parse_field(raw: str, field: _Field) -> tuple[set[int], bool]:
    values: set[int] = set()
    star = False
    for part in raw.split(","):
        range_text, slash, step_text = part.partition("/")
        if range_text in ("*", "?"):
            low, high = field.low, field.high
            star = star or not slash or step_text == "1"
        else:
            first, dash, last = range_text.partition("-")
            low = _value(first, field)
            high = _value(last, field) if dash else low
            if slash and not dash:
                high = field.high
        step = 1
        if slash:
            step = _number(step_text, field)
            if step <= 0:
                raise CronError(f"step of range should be a positive number: {part}")
        if low < field.low:
            raise CronError(f"beginning of range ({low}) below minimum ({field.low}): {part}")
        if high > field.high:
            raise CronError(f"end of range ({high}) above maximum ({field.high}): {part}")
        if low > high:
            raise CronError(f"beginning of range ({low}) beyond end of range ({high}): {part}")
        values.update(range(low, high + 1, step))
    return values, star


def _value(text: str, field: _Field) -> int:
    lowered = text.lower()
    if lowered in field.names:
        return field.low + field.names.index(lowered)
    return _number(text, field)


def _number(text: str, field: _Field) -> int:
    if not text.isdigit():
        raise CronError(f"failed to parse {field.name} {text!r}")
    return int(text)


def _duration(text: str) -> datetime.timedelta:
    if not _DURATION.match(text):
        raise CronError(f"failed to parse duration @every {text}")
    seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(text))
    if text.startswith("-"):
        seconds = -seconds
    # robfig rounds intervals below a second up to one second and drops fractions.
    return datetime.timedelta(seconds=max(1, int(seconds)))
