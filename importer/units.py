"""Byte units and the rounding helpers the space maths needs.

Sizes are plain ``int`` bytes everywhere in the data plane; Kubernetes quantities
("10Gi", "500M") are parsed once, here, when the worker reads its settings.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40

_SUFFIXES = {
    "": 1,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
    "Ki": KiB,
    "Mi": MiB,
    "Gi": GiB,
    "Ti": TiB,
    "Pi": 1 << 50,
    "Ei": 1 << 60,
}
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)([a-zA-Z]{0,2})$")


def round_up(n: int, step: int) -> int:
    return (n + step - 1) // step * step


def round_down(n: int, step: int) -> int:
    return n // step * step


def parse_quantity(text: str) -> int:
    """Parse a Kubernetes resource quantity into bytes, rounding fractions up.

    Raises ValueError with a readable reason for anything else.
    """
    m = _QUANTITY.match(text.strip())
    if not m or m.group(2) not in _SUFFIXES:
        raise ValueError(f"{text!r} is not a quantity (examples: 10Gi, 500M, 1073741824)")
    try:
        value = Decimal(m.group(1)) * _SUFFIXES[m.group(2)]
    except InvalidOperation as e:  # pragma: no cover - the regex admits only decimals
        raise ValueError(f"{text!r} is not a quantity") from e
    return math.ceil(value)


def humanize(n: float) -> str:
    """1536 -> '1.5 KiB'; for log lines and the quick start's summary."""
    for unit, size in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"
