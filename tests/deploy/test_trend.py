"""The soak's verdict on synthetic series whose answer is known."""

import numpy as np

from deploy.trend import fit_trend

T = np.arange(0.0, 600.0, 5.0)  # a ten-minute run sampled every 5 s


def test_a_flat_noisy_series_does_not_grow() -> None:
    rng = np.random.default_rng(0)
    for seed in range(20):
        values = 500 + rng.normal(0, 3, len(T))  # 3 MiB of noise around a flat level
        assert not fit_trend(T, values, floor=4.0).grows, seed


def test_a_steady_leak_grows_even_under_noise() -> None:
    rng = np.random.default_rng(1)
    values = 500 + 0.05 * T + rng.normal(0, 3, len(T))  # 30 MiB over the run, in 3 MiB of noise
    trend = fit_trend(T, values, floor=4.0)
    assert trend.grows
    assert abs(trend.whole.rise - 0.05 * np.ptp(T)) < 5  # the line's rise is the leak's, within the noise


def test_a_clean_rise_below_the_floor_does_not_fail() -> None:
    values = 40 + (T > 300)  # one more file descriptor held from the middle on: real, but below the floor of 2
    assert not fit_trend(T, values, floor=2.0).grows


def test_a_rise_within_its_own_noise_does_not_fail() -> None:
    rng = np.random.default_rng(2)
    values = 100 + 0.01 * T + rng.normal(0, 10, len(T))  # +6 over the run against noise of 10
    assert not fit_trend(T, values, floor=1.0).grows


def test_too_few_samples_never_grow() -> None:
    assert not fit_trend([0.0, 5.0], [1.0, 100.0], floor=0.0).grows
    assert not fit_trend([], [], floor=0.0).grows


def test_a_climb_to_a_high_water_mark_that_then_stays_level_does_not_grow() -> None:
    rng = np.random.default_rng(3)
    # 50 MiB gained over the first 40% of the window, level afterwards (the largest batch has been seen).
    values = 1000 + 50 * np.minimum(T / (0.4 * np.ptp(T)), 1.0) + rng.normal(0, 3, len(T))
    trend = fit_trend(T, values, floor=4.0)
    assert trend.whole.rises and not trend.last_half.rises and not trend.grows
