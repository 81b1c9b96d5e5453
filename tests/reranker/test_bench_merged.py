"""`python -m reranker.bench merged`: a tenant's CPU rerank with its deltas apart, through merged weights and as a
merged model, timed side by side in rounds and scoring alike."""

from __future__ import annotations

import argparse
from pathlib import Path

from common.paths import SCIFACT
from reranker.bench import merged
from reranker.model import load_model
from tests.reranker.numerics import longest_inner_product, scores_bound


def test_three_ways_are_timed_in_rounds_and_score_alike(tmp_path: Path) -> None:
    args = argparse.Namespace(n_docs="3", block_tokens=40, dtype="fp32", rounds=2, repeats=1, data=SCIFACT,
                              out=tmp_path / "r.json")
    result = merged.run(args)
    (row,) = result["results"]
    assert row["n_docs"] == 3 and result["merged_weights_bytes"] > 0
    config = load_model(device="cpu", dtype="fp32").model.config
    bound = scores_bound(config.num_hidden_layers - 1, longest_inner_product(config), fp32_sides=2)  # any layer
    for way in merged.WAYS:
        assert len(row[way]["rounds_s"]) == 2 and row[way]["seconds"] > 0
        assert row[way]["max_score_difference"] <= bound  # fp32 all three: the same scores, other sums
    assert row["deltas apart"]["speedup_over_first"] == 1.0
    merged.plot(result, tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 0
