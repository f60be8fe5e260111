"""DataImportCron schedules: what CDI's parser accepts, and the next firing time."""

from __future__ import annotations

import datetime

import pytest

from cdi.api import cron

UTC = datetime.UTC


@pytest.mark.parametrize("spec", [
    "0 */12 * * *", "*/5 * * * *", "0 0 1 1 *", "0 0 * * MON-FRI", "0 0 ? * sun",
    "5,10 1-3/2 * JAN,dec 0", "30 4 1-7 * *", "0 0 29 2 *", "  0  0 * * *  ", "7/15 * * * *",
    "@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly",
    "@every 1h30m", "@every 90s", "@every 1.5h", "CRON_TZ=Europe/Prague 0 6 * * *",
    "TZ=UTC @hourly",
])
def test_parse_accepts(spec: str) -> None:
    cron.parse(spec)


@pytest.mark.parametrize("spec", [
    "", "* * * *", "* * * * * *", "60 * * * *", "* 24 * * *", "* * 0 * *", "* * 32 * *",
    "* * * 13 *", "* * * 0 *", "* * * * 7", "5-1 * * * *", "*/0 * * * *", "a * * * *",
    "1,,2 * * * *", "* * * FOO *", "@often", "@every soon", "@every 5", "@every",
    "CRON_TZ=Mars/Olympus * * * * *", "-1 * * * *",
])
def test_parse_refuses(spec: str) -> None:
    with pytest.raises(cron.CronError):
        cron.parse(spec)


@pytest.mark.parametrize(("spec", "after", "expected"), [
    ("0 */12 * * *", "2024-05-01T10:30:00", "2024-05-01T12:00:00"),
    ("0 */12 * * *", "2024-05-01T12:00:00", "2024-05-02T00:00:00"),
    ("*/5 * * * *", "2024-05-01T10:31:59", "2024-05-01T10:35:00"),
    ("0 0 31 * *", "2024-04-01T00:00:00", "2024-05-31T00:00:00"),
    ("0 0 29 2 *", "2024-03-01T00:00:00", "2028-02-29T00:00:00"),
    ("0 0 1 * *", "2024-12-15T00:00:00", "2025-01-01T00:00:00"),
    # both day fields restricted: either may match (2024-09-01 is a Sunday)
    ("0 0 1 * MON", "2024-09-01T00:00:00", "2024-09-02T00:00:00"),
    # day of week "*": day of month alone decides
    ("0 0 1 * *", "2024-09-01T00:00:00", "2024-10-01T00:00:00"),
    ("0 0 * * FRI", "2024-09-01T00:00:00", "2024-09-06T00:00:00"),
    ("30 6 * * 1-5", "2024-09-06T07:00:00", "2024-09-09T06:30:00"),
    ("@hourly", "2024-05-01T10:00:00", "2024-05-01T11:00:00"),
])
def test_next(spec: str, after: str, expected: str) -> None:
    schedule = cron.parse(spec)
    assert schedule.next(datetime.datetime.fromisoformat(after)) == \
        datetime.datetime.fromisoformat(expected)
    aware = datetime.datetime.fromisoformat(after).replace(tzinfo=UTC)
    assert schedule.next(aware) == datetime.datetime.fromisoformat(expected).replace(tzinfo=UTC)


def test_next_in_cron_tz() -> None:
    schedule = cron.parse("CRON_TZ=Asia/Tokyo 0 9 * * *")
    after = datetime.datetime(2024, 5, 1, 0, 0, tzinfo=UTC)  # 09:00 in Tokyo
    found = schedule.next(after)
    assert found.astimezone(UTC) == datetime.datetime(2024, 5, 2, 0, 0, tzinfo=UTC)


def test_every() -> None:
    after = datetime.datetime(2024, 5, 1, 10, 0, 0, 500, tzinfo=UTC)
    assert cron.parse("@every 1h30m").next(after) == \
        datetime.datetime(2024, 5, 1, 11, 30, tzinfo=UTC)
    assert cron.parse("@every 10ms").next(after) == \
        datetime.datetime(2024, 5, 1, 10, 0, 1, tzinfo=UTC)


def test_schedule_that_never_fires() -> None:
    schedule = cron.parse("0 0 30 2 *")
    with pytest.raises(cron.CronError, match="never fires"):
        schedule.next(datetime.datetime(2024, 1, 1))
