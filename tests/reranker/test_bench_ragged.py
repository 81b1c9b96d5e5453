"""`python -m reranker.bench ragged`: both document layouts timed on the same prompts, with the padding share."""

from __future__ import annotations

import argparse
from pathlib import Path

from common.paths import SHARED_DATA
from reranker.bench import ragged
from reranker.model import load_model
from tests.reranker.numerics import longest_inner_product, scores_bound


def test_both_layouts_are_timed_on_the_same_prompts_and_agree(tmp_path: Path) -> None:
    # CACM's records are short beside a 64-token block: most padded rows are padding.
    args = argparse.Namespace(model="", data=[SHARED_DATA / "cacm"], dtype="fp32", n_docs=3, block_tokens=64,
                              queries=2, rounds=1, out=tmp_path / "r.json")
    result = ragged.run(args)
    config = load_model(device="cpu", dtype="fp32").model.config
    bound = scores_bound(config.num_hidden_layers - 1, longest_inner_product(config), fp32_sides=2)  # any layer
    (row,) = result["results"]
    assert row["collection"] == "cacm" and result["block_tokens"] == 64
    assert 0 < row["padding_share"] < 1
    assert row["padded_s_per_query"] > 0 and row["ragged_s_per_query"] > 0
    assert row["max_score_difference"] <= bound  # fp32 both ways: the same masses, other row chunks
    ragged.plot(result, tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 0
