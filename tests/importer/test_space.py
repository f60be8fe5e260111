"""Quantities and CDI's space maths."""

from __future__ import annotations

import pytest

from importer import space, units

MiB = units.MiB


@pytest.mark.parametrize("text,value", [
    ("1073741824", 1 << 30), ("10Gi", 10 << 30), ("500M", 500_000_000), ("1.5Gi", 3 << 29),
    ("1k", 1000), ("2Ti", 2 << 40), ("0.5", 1),
])
def test_parse_quantity(text: str, value: int) -> None:
    assert units.parse_quantity(text) == value


@pytest.mark.parametrize("text", ["", "10 Gi", "10GB", "-1", "1e3", "Gi"])
def test_parse_quantity_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="is not a quantity"):
        units.parse_quantity(text)


@pytest.mark.parametrize("overhead,available,usable", [
    (0, 100 * MiB, 100 * MiB),
    (0.06, 100 * MiB, 94 * MiB),  # ceil(104857600/1.06) = 98922265 -> 94 MiB
    (0.055, 1 << 30, 970 * MiB),  # ceil(1073741824/1.055) = 1017764762 -> 970 MiB
    (0.06, MiB + 1, 0),
    (1, 10 * MiB, 5 * MiB),
])
def test_usable(overhead: float, available: int, usable: int) -> None:
    assert space.usable(overhead, available) == usable


@pytest.mark.parametrize("overhead,size,required", [
    (0, 100 * MiB, 100 * MiB),
    (0.06, 100 * MiB, 111149056),  # 104857600 * 1.06, exact
    (0.06, 1, 1111491),  # rounded up to 1 MiB first
])
def test_required(overhead: float, size: int, required: int) -> None:
    assert space.required(overhead, size) == required


@pytest.mark.parametrize("size", [MiB, 10 * MiB, 5 << 30, 123 * MiB])
@pytest.mark.parametrize("overhead", [0.0, 0.055, 0.06, 0.1])
def test_required_then_usable_round_trips(size: int, overhead: float) -> None:
    assert space.usable(overhead, space.required(overhead, size)) == size
