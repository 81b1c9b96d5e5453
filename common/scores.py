"""Score arithmetic both engines use: per-list min-max normalisation before a convex mix."""

from __future__ import annotations

from collections.abc import Sequence


def minmax(values: Sequence[float], flat: float = 0.0) -> list[float]:
    """Scale to 0..1 (lowest 0, highest 1); a list whose values are all equal maps to `flat`."""
    if not values:
        return []
    low, high = min(values), max(values)
    return [flat] * len(values) if high <= low else [(v - low) / (high - low) for v in values]
