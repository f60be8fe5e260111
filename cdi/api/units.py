"""Kubernetes quantities at the edge of the control plane: text in manifests, ``int`` bytes inside.

Parsing is the data plane's (``importer.units.parse_quantity``); this module
adds what the API side needs on top: quantities as YAML delivers them (text or
numbers, possibly signed) and the way back to text for claims CDI writes.
"""

from __future__ import annotations

import math

from importer import units
from importer.units import MiB, parse_quantity

__all__ = ["MiB", "format_quantity", "parse_quantity", "to_bytes"]

_BINARY = (("Ei", 1 << 60), ("Pi", 1 << 50), ("Ti", units.TiB), ("Gi", units.GiB),
           ("Mi", units.MiB), ("Ki", units.KiB))


def to_bytes(quantity: str | int | float) -> int:
    """Bytes in a quantity as found in a manifest ("10Gi", "-1", 1073741824), rounded up.

    Raises ValueError for anything that is not a quantity.
    """
    if isinstance(quantity, bool):
        raise ValueError(f"{quantity!r} is not a quantity")
    if isinstance(quantity, int):
        return quantity
    if isinstance(quantity, float):
        return math.ceil(quantity)
    text = quantity.strip()
    if text[:1] in ("+", "-"):
        value = parse_quantity(text[1:])
        return -value if text[0] == "-" else value
    return parse_quantity(text)


def format_quantity(size: int) -> str:
    """Bytes as a quantity: the largest binary suffix that divides exactly ("1Gi"), else digits."""
    if size > 0:
        for suffix, unit in _BINARY:
            if size % unit == 0:
                return f"{size // unit}{suffix}"
    return str(size)
