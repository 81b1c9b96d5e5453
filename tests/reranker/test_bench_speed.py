"""`python -m reranker.bench speed` with several variants: side by side, each in fresh processes, rounds rotating."""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import pytest

from common.allocator import RERANKER_ARENAS, RERANKER_KEEP_MB
from common.fresh import paired_speedup, rotations
from common.paths import SCIFACT
from reranker.bench import allocator, variants

BLOCK_TOKENS = 32


def bench_args(tmp_path: Path, **overrides: object) -> argparse.Namespace:
    values = {"model": "", "device": "cpu", "dtype": "fp32,bf16", "path": "chunked", "cpu_compile": "off",
              "data": SCIFACT, "n_docs": "2,3", "block_tokens": BLOCK_TOKENS, "repeats": 1, "rounds": 2, "budget_s": 60.0,
              "dense_budget_s": 0, "malloc_arenas": RERANKER_ARENAS, "malloc_keep_mb": RERANKER_KEEP_MB,
              "out": tmp_path / "s.json"}
    return argparse.Namespace(**(values | overrides))


def test_rounds_rotate_so_each_variant_runs_first_and_last() -> None:
    assert rotations(["a", "b", "c"], 3) == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert rotations(["a", "b"], 1) == ["a", "b"]


def test_speedup_pairs_rounds_so_shared_drift_cancels() -> None:
    # Round 2 ran on a machine twice as slow for both settings, and its ratio is 2.0 like round 1's; the ratio of
    # the two medians (3.0 over 1.0) mixes rounds and reads 3.0, the one outlying round's figure.
    first, other = [2.0, 4.0, 3.0], [1.0, 2.0, 1.0]
    assert paired_speedup(first, other) == {"speedup_over_first": 2.0, "speedup_range": [2.0, 3.0]}
    assert statistics.median(first) / statistics.median(other) == 3.0
    with pytest.raises(ValueError):
        paired_speedup(first, other[:2])  # rounds that do not pair are an error, not a silent truncation


def test_allocator_summary_pairs_each_setting_with_the_first_by_round() -> None:
    def run(seconds: float) -> dict[str, float]:
        return {"s_per_rerank": seconds, "faults_per_rerank": 0.0, "rss_mib": 1.0, "peak_rss_mib": 2.0}

    samples = {(20, 96, 0): [run(2.0), run(4.0), run(3.0)], (20, 96, 256): [run(1.0), run(2.0), run(1.0)]}
    row = allocator.summary(20, 96, [0, 256], samples)
    assert row["keep_0"]["s_per_rerank"] == 3.0 and "speedup_over_first" not in row["keep_0"]
    assert row["keep_256"]["speedup_over_first"] == 2.0 and row["keep_256"]["speedup_range"] == [2.0, 3.0]


def test_two_settings_that_run_the_same_thing_stop_at_their_first_process(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # `--cpu-compile off,auto` where auto compiles nothing: both children report the same variant.
    started: list[list[str]] = []

    def child(_args: argparse.Namespace, _command: str, child_args: list[str]) -> dict:
        started.append(child_args)
        return {"variant": "bfloat16 auto", "results": []}

    monkeypatch.setattr(variants, "in_fresh_process", child)
    with pytest.raises(SystemExit, match="both ran 'bfloat16 auto'"):
        variants.run(bench_args(tmp_path, dtype="bf16", path="auto", cpu_compile="off,auto", rounds=3))
    assert len(started) == 2


def test_one_variant_times_each_size_on_its_path(tmp_path: Path) -> None:
    result = variants.one_variant(bench_args(tmp_path, dtype="bf16", path="packed"))
    assert result["variant"] == "bfloat16 packed" and result["dtype"] == "torch.bfloat16"
    assert [r["n_docs"] for r in result["results"]] == [2, 3]
    for row in result["results"]:
        assert row["path"] == "packed" and row["blockrank_s"] > 0
        assert row["tokens"] > row["n_docs"] * BLOCK_TOKENS // 2  # SciFact abstracts fill their blocks


def test_variants_are_timed_side_by_side_in_fresh_processes(tmp_path: Path) -> None:
    result = variants.run(bench_args(tmp_path))
    names = ["float32 chunked", "bfloat16 chunked"]
    assert result["first"] == names[0] and result["rounds"] == 2
    assert [v["variant"] for v in result["variants"]] == names
    for row in result["side_by_side"]:
        first = row[names[0]]
        assert first["speedup_over_first"] == 1.0 and first["speedup_range"] == [1.0, 1.0]
        for name in names:
            entry = row[name]
            assert len(entry["rounds_s"]) == 2 and all(s > 0 for s in entry["rounds_s"])
            assert entry["blockrank_s"] == pytest.approx(statistics.median(entry["rounds_s"]))
            ratios = [a / b for a, b in zip(first["rounds_s"], entry["rounds_s"], strict=True)]  # round by round
            assert entry["speedup_over_first"] == pytest.approx(statistics.median(ratios))
            assert entry["speedup_range"] == pytest.approx([min(ratios), max(ratios)])
    variants.plot(result, tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 0
