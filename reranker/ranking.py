"""Pure ranking arithmetic: ordering scores, fusing the reranker with the first stage, comparing
two rankings. No model, no state."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class RankedResult:
    index: int
    score: float  # what the ranking is sorted by (fused when fusion applied)
    model_score: float = 0.0  # the reranker's own score


def minmax(values: Sequence[float]) -> list[float]:
    low, high = min(values), max(values)
    return [0.0] * len(values) if high <= low else [(v - low) / (high - low) for v in values]


def fuse(model_scores: Sequence[float], first_stage: Sequence[float], weight: float) -> list[float]:
    """Convex mix of per-request min-max normalised scores; weight 1 = the reranker alone."""
    return [weight * m + (1 - weight) * f for m, f in zip(minmax(model_scores), minmax(first_stage), strict=True)]


def rank_scores(scores: Sequence[float], top_n: int | None = None,
                model_scores: Sequence[float] | None = None) -> list[RankedResult]:
    """Best first; ties keep the input order (stable), so equal scores never reshuffle."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    if top_n:
        order = order[:top_n]
    own = model_scores if model_scores is not None else scores
    return [RankedResult(i, float(scores[i]), float(own[i])) for i in order]


def kendall_tau(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall's tau-a between two score lists (1 = the same order, -1 = reversed; ties count 0)."""
    if len(a) != len(b):
        raise ValueError(f"score lists differ in length: {len(a)} vs {len(b)}")
    pairs = [(i, j) for i in range(len(a)) for j in range(i + 1, len(a))]
    if not pairs:
        return 1.0
    return sum(_sign((a[i] - a[j]) * (b[i] - b[j])) for i, j in pairs) / len(pairs)


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)
