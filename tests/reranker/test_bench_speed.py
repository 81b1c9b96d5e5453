"""`python -m reranker.bench speed` with several variants: side by side, each in fresh processes, rounds rotating."""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import pytest

from common.allocator import RERANKER_ARENAS, RERANKER_KEEP_MB
from common.fresh import rotations
from common.paths import SCIFACT
from reranker.bench import variants

BLOCK_TOKENS = 32


def bench_args(tmp_path: Path, **overrides: object) -> argparse.Namespace:
    values = {"model": "", "device": "cpu", "dtype": "fp32,bf16", "path": "chunked", "data": SCIFACT,
              "n_docs": "2,3", "block_tokens": BLOCK_TOKENS, "repeats": 1, "rounds": 2, "budget_s": 60.0,
              "dense_budget_s": 0, "malloc_arenas": RERANKER_ARENAS, "malloc_keep_mb": RERANKER_KEEP_MB,
              "out": tmp_path / "s.json"}
    return argparse.Namespace(**(values | overrides))


def test_rounds_rotate_so_each_variant_runs_first_and_last() -> None:
    assert rotations(["a", "b", "c"], 3) == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert rotations(["a", "b"], 1) == ["a", "b"]


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
