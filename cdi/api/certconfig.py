"""Certificate lifetimes: CDI's ``spec.certConfig``, parsed once and checked.

The chart's ``certificates.ca`` and ``certificates.server`` (each a
``duration`` and a ``renewBefore``, Go duration strings such as ``48h0m0s``)
reach ``cdi controller`` and ``cdi apiserver`` as flags or ``CDI_CA_DURATION``,
``CDI_CA_RENEW_BEFORE``, ``CDI_SERVER_DURATION`` and ``CDI_SERVER_RENEW_BEFORE``.
This module turns them into ``CertConfig`` and refuses what CDI's operator
would turn into a certificate that is always due (``renewBefore`` not shorter
than ``duration``) or that cannot be read, naming the setting and its value.
The defaults are CDI's (``pkg/operator/resources/cert``): a CA lasts 48 h and is
replaced 24 h before its end, a server or client certificate lasts 24 h and is
replaced 12 h before its end.
"""

from __future__ import annotations

import dataclasses
import datetime
import re

# Go's time.ParseDuration units.
_UNITS = {"ns": 1e-9, "us": 1e-6, "\u00b5s": 1e-6, "\u03bcs": 1e-6, "ms": 1e-3, "s": 1.0,
          "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")
MAX_CHECK = datetime.timedelta(hours=12)  # the longest wait between two looks


class CertConfigError(ValueError):
    """A certificate lifetime setting that cannot be used; the message names it."""


def parse_duration(text: str, *, setting: str) -> datetime.timedelta:
    """A Go duration (``48h0m0s``, ``90m``, ``1.5h``); SETTING names it in errors."""
    body = text.strip()
    sign = -1.0 if body.startswith("-") else 1.0
    body = body.lstrip("+-")
    if body == "0":
        return datetime.timedelta(0)
    pos, seconds = 0, 0.0
    for match in _PART.finditer(body):
        if match.start() != pos:
            break
        seconds += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if not body or pos != len(body):
        raise CertConfigError(f'{setting}: invalid duration "{text}" (use e.g. 48h0m0s)')
    return datetime.timedelta(seconds=sign * seconds)


def format_duration(value: datetime.timedelta) -> str:
    """As Go prints whole-second durations: ``48h0m0s``."""
    seconds = int(value.total_seconds())
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60}m{rest % 60}s"


@dataclasses.dataclass(frozen=True)
class Lifetime:
    """How long a certificate is valid, and how long before its end it is replaced."""

    duration: datetime.timedelta
    renew_before: datetime.timedelta

    @classmethod
    def parse(cls, setting: str, duration: str, renew_before: str) -> Lifetime:
        """From chart values; SETTING is the value's key (``certificates.ca``)."""
        lifetime = cls(parse_duration(duration, setting=f"{setting}.duration"),
                       parse_duration(renew_before, setting=f"{setting}.renewBefore"))
        if lifetime.duration <= datetime.timedelta(0):
            raise CertConfigError(f'{setting}.duration: "{duration}" must be longer than 0s')
        if lifetime.renew_before <= datetime.timedelta(0):
            raise CertConfigError(
                f'{setting}.renewBefore: "{renew_before}" must be longer than 0s')
        if lifetime.renew_before >= lifetime.duration:
            raise CertConfigError(
                f'{setting}.renewBefore: "{renew_before}" must be shorter than '
                f'{setting}.duration "{duration}"')
        return lifetime

    def renew_at(self, not_after: datetime.datetime) -> datetime.datetime:
        """When a certificate ending at NOT_AFTER is due for replacement."""
        return not_after - self.renew_before

    def __str__(self) -> str:
        return (f"duration={format_duration(self.duration)} "
                f"renewBefore={format_duration(self.renew_before)}")


DEFAULT_CA = Lifetime(datetime.timedelta(hours=48), datetime.timedelta(hours=24))
DEFAULT_SERVER = Lifetime(datetime.timedelta(hours=24), datetime.timedelta(hours=12))


@dataclasses.dataclass(frozen=True)
class CertConfig:
    """The CAs' lifetime (``ca``), and the server and client certificates' (``server``)."""

    ca: Lifetime = DEFAULT_CA
    server: Lifetime = DEFAULT_SERVER

    @classmethod
    def parse(cls, *, ca_duration: str, ca_renew_before: str, server_duration: str,
              server_renew_before: str) -> CertConfig:
        return cls(ca=Lifetime.parse("certificates.ca", ca_duration, ca_renew_before),
                   server=Lifetime.parse("certificates.server", server_duration,
                                         server_renew_before))

    @property
    def max_check(self) -> datetime.timedelta:
        """The longest wait between two looks: half the shortest renewBefore, at most 12 h,
        so a missed look (API server away) still leaves time to renew."""
        return min(self.ca.renew_before / 2, self.server.renew_before / 2, MAX_CHECK)
