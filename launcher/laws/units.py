"""Counts written with a K/M/B/T suffix (``600K``, ``1.2M``, ``250B`` tokens), parsed and printed."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any

SUFFIXES = {"K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}


def parse_count(value: Any) -> Any:
    """``"1.2M"`` -> 1200000 (exact decimal arithmetic, so ``0.3M`` is 300000, not 299999); anything else,
    including a string without a known suffix, is returned unchanged for the caller to validate."""
    if isinstance(value, str):
        s = value.strip()
        mult = SUFFIXES.get(s[-1:].upper())
        if mult and s[:-1].replace(".", "", 1).isdigit():
            try:
                n = Decimal(s[:-1]) * mult
            except InvalidOperation:  # pragma: no cover - isdigit() above admits only decimals
                return value
            return int(n) if n == n.to_integral_value() else float(n)
    return value


def format_count(n: float) -> str:
    """1200000 -> ``1.2M``; four significant digits."""
    for suffix, div in reversed(SUFFIXES.items()):
        if abs(n) >= div:
            return f"{n / div:.4g}{suffix}"
    return f"{n:g}"
