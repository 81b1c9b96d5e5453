"""deploy.cpu_layout's bookkeeping: the two layouts' stacks, and ratios taken round by round (each round's layouts
ran back to back, so a slower round of the machine slows both)."""

from __future__ import annotations

import pytest

from deploy import cpu_layout


def level(concurrency: int, rps: float, p50: float) -> dict:
    return {"concurrency": concurrency, "throughput_rps": rps, "error_count": 0,
            "latency_ms": {"p50": p50, "p99": 2 * p50}}


def test_the_layouts_are_one_reranker_on_every_core_and_one_per_core() -> None:
    shared, per_core = cpu_layout.layouts(4)
    assert shared.flags() == ["--reranker-replicas", "1", "--reranker-threads", "0"]
    assert per_core.flags() == ["--reranker-replicas", "4", "--reranker-threads", "1"]


def test_ratios_are_per_round_against_the_first_layout() -> None:
    runs = {"shared": [[level(1, 1.0, 800), level(4, 1.2, 3000)], [level(1, 0.5, 1600), level(4, 0.6, 6000)]],
            "per core": [[level(1, 0.6, 1400), level(4, 1.5, 2500)], [level(1, 0.3, 2800), level(4, 0.75, 5000)]]}
    rows = cpu_layout.summarise(["shared", "per core"], runs, [1, 4])
    assert [(r["layout"], r["concurrency"]) for r in rows] == [("shared", 1), ("shared", 4), ("per core", 1),
                                                               ("per core", 4)]
    saturated = rows[3]
    # The second round ran at half the speed: its ratio is the same, the mean throughput is not.
    assert saturated["ratio_by_round"] == pytest.approx([1.25, 1.25])
    assert saturated["throughput_rps"] == pytest.approx(1.125)
    assert saturated["p50_ms"] == pytest.approx(3750)
    assert rows[0]["ratio_by_round"] == [1.0, 1.0]
    assert "1.25x 1.25x" in cpu_layout.table(rows)


def test_rounds_and_requests_must_be_positive() -> None:
    with pytest.raises(SystemExit):
        cpu_layout.parse_args(["--out", "x", "--rounds", "0"])
