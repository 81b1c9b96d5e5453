"""Does a series sampled over time trend upward beyond its noise? (the soak test's and the fuzz test's verdict)

A least-squares line through the samples after warm-up; its rise over that window is compared with the
series' own noise (the residuals' standard deviation around the line) and with a floor below which a rise is
too small to matter (a few MiB of allocator growth, a file descriptor). A line rises when its rise exceeds
both `sigmas` times the noise and the floor, and the slope's 95% interval lies above zero. A last/first ratio
would instead judge two single samples, each as noisy as any other.

A series grows when its line rises over the whole window and also over the window's last half (with the
floor scaled to that half's length). A leak keeps rising; memory that climbs to the high-water mark of the
largest batch the workload happens to form and then stays level is not a leak, and its last half is flat.

Samples taken a few seconds apart are autocorrelated, which makes the slope's interval too narrow; the noise
and floor conditions are what keep a steady but noisy series from failing.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

T_95 = 1.96  # two-sided 95% normal quantile: the windows here have tens of samples or more


@dataclass(frozen=True)
class Line:
    samples: int
    slope_per_s: float
    slope_low_per_s: float  # the 95% interval's lower end
    rise: float  # slope x the window's length
    noise: float  # the residuals' standard deviation
    floor: float
    sigmas: float

    @property
    def rises(self) -> bool:
        return self.slope_low_per_s > 0 and self.rise > max(self.sigmas * self.noise, self.floor)


@dataclass(frozen=True)
class Trend:
    whole: Line
    last_half: Line

    @property
    def grows(self) -> bool:
        return self.whole.rises and self.last_half.rises

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self.whole), "last_half_rise": self.last_half.rise, "last_half_noise": self.last_half.noise,
                "grows": self.grows}


def fit_line(times_s: ArrayLike, values: ArrayLike, floor: float, sigmas: float = 3.0) -> Line:
    """The least-squares line through the samples; fewer than 3 samples never rise."""
    t, y = np.asarray(times_s, dtype=np.float64), np.asarray(values, dtype=np.float64)
    n = len(t)
    if n < 3 or float(np.ptp(t)) == 0.0:
        return Line(n, 0.0, 0.0, 0.0, 0.0, floor, sigmas)
    centred = t - t.mean()
    slope = float(np.dot(centred, y - y.mean()) / np.dot(centred, centred))
    residuals = y - (y.mean() + slope * centred)
    noise = float(math.sqrt(np.dot(residuals, residuals) / (n - 2)))
    slope_se = noise / math.sqrt(float(np.dot(centred, centred)))
    return Line(n, slope, slope - T_95 * slope_se, slope * float(np.ptp(t)), noise, floor, sigmas)


def fit_trend(times_s: ArrayLike, values: ArrayLike, floor: float, sigmas: float = 3.0) -> Trend:
    """The trend of `values` sampled at `times_s` (already past warm-up)."""
    t = np.asarray(times_s, dtype=np.float64)
    y = np.asarray(values, dtype=np.float64)
    if len(t) == 0:
        return Trend(fit_line([], [], floor, sigmas), fit_line([], [], floor, sigmas))
    middle = (t.min() + t.max()) / 2
    tail = t >= middle
    return Trend(fit_line(t, y, floor, sigmas), fit_line(t[tail], y[tail], floor / 2, sigmas))
