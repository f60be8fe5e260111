"""CDI's space maths: how much of a volume an image may use.

A filesystem volume loses part of its capacity to the filesystem itself, so CDI
inflates the requested size when it creates the claim and the importer deflates
what it finds when it decides how large the disk image may be.  The two
functions must stay exact inverses of what CDI computes (reference section 3.7),
or images that fit under CDI would not fit here.
"""

from __future__ import annotations

import math
from decimal import Decimal

from importer import units


def usable(overhead: float | Decimal, available: int) -> int:
    """Bytes a disk image may use on a volume of ``available`` bytes.

    RoundDown(ceil(available / (1 + overhead)), 1 MiB).
    """
    o = Decimal(str(overhead))
    return units.round_down(math.ceil(Decimal(available) / (1 + o)), units.MiB)


def required(overhead: float | Decimal, size: int) -> int:
    """Bytes to request for a filesystem volume that must hold ``size`` bytes.

    ceil(RoundUp(size, 1 MiB) * (1 + overhead)).
    """
    o = Decimal(str(overhead))
    return math.ceil(Decimal(units.round_up(size, units.MiB)) * (1 + o))
