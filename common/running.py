"""A running mean that follows change: each new sample moves it by a fixed share of its distance (an
exponentially weighted moving average). Admission (services.admission) and the reranker's batcher estimate
service times with it."""

from __future__ import annotations


class RunningMean:
    """Exponentially weighted mean of the samples added (None before the first)."""

    def __init__(self, weight: float) -> None:
        if not 0 < weight <= 1:
            raise ValueError(f"weight must be in (0, 1], got {weight}")
        self.weight = weight
        self.value: float | None = None

    def add(self, sample: float) -> float:
        self.value = sample if self.value is None else self.value + self.weight * (sample - self.value)
        return self.value
