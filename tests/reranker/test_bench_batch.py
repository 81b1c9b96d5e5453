"""`python -m reranker.bench batch`: both paths timed on the same prompts, with the automatic one in groups."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from common.paths import SCIFACT
from reranker import packed
from reranker.bench import batch
from reranker.model import load_model
from tests.reranker.numerics import longest_inner_product, scores_bound


def test_a_batch_past_the_limit_is_timed_both_ways_on_the_same_prompts(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # A limit of about one 3-document query's rows in fp32: a batch of three runs as several packed forwards.
    monkeypatch.setattr(packed, "CPU_PACKED_MAX_ROW_BYTES", 300 * 4)
    args = argparse.Namespace(model="", data=SCIFACT, dtype="fp32", n_docs=3, block_tokens=32, batches="1,3",
                              rounds=1, out=tmp_path / "r.json")
    result = batch.run(args)
    config = load_model(device="cpu", dtype="fp32").model.config
    bound = scores_bound(config.num_hidden_layers - 1, longest_inner_product(config), fp32_sides=2)  # any layer
    one, three = result["results"]
    assert (one["batch"], three["batch"]) == (1, 3) and three["packed_groups"] > 1
    for row in result["results"]:
        assert row["chunked_s_per_query"] > 0 and row["auto_s_per_query"] > 0
        assert row["max_score_difference"] <= bound  # fp32 both ways: the same masses summed in another order
    batch.plot(result, tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 0
