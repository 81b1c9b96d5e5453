"""The reranker-weight evidence on synthetic collections whose answer is known by construction."""

import math

import numpy as np
import pytest

from deploy import evidence
from deploy.evidence import Candidates, Evidence, choose, fused_order, paired_bootstrap
from deploy.fit_fusion import fit_rerank

RANKS = 10
FIRST_STAGE = [1.0 - r / RANKS for r in range(RANKS)]  # min-max: 1, 0.889, ..., 0


def collection(name: str, queries: int, relevant_rank: int, model_likes_relevant: bool, split: str = "dev") -> Evidence:
    """Each query: one relevant document at `relevant_rank` of the first stage; the model scores it 1 and the rest 0
    (or the reverse). With it at rank 2, a weight above 0.18 lifts it to the top (w + 0.778(1-w) > 1-w); at rank 0
    with the model against it, any weight above 0.1 drops it below rank 1 (1-w < w + 0.889(1-w))."""
    qrels, lists = {}, {}
    for q in range(queries):
        ids = [f"{name}-{q}-{r}" for r in range(RANKS)]
        relevant = ids[relevant_rank]
        model = [float((doc == relevant) == model_likes_relevant) for doc in ids]
        qrels[f"q{q}"] = {relevant: 1}
        lists[f"q{q}"] = Candidates(ids, FIRST_STAGE, model)
    return Evidence(name, split, RANKS, qrels, lists)


def test_fused_order_is_the_first_stage_at_0_and_the_model_at_1() -> None:
    c = Candidates(["a", "b", "c", "d"], [4.0, 3.0, 2.0, 1.0], [0.1, 0.9, 0.5])  # head of 3, tail "d"
    assert fused_order(c, 0.0) == ["a", "b", "c", "d"]
    assert fused_order(c, 1.0) == ["b", "c", "a", "d"]


def test_bootstrap_interval_of_a_constant_is_the_constant() -> None:
    interval = paired_bootstrap([0.1] * 50)
    assert interval.mean == pytest.approx(0.1) and interval.low == pytest.approx(0.1)
    assert interval.high == pytest.approx(0.1)


def test_bootstrap_interval_matches_the_normal_approximation() -> None:
    values = np.random.default_rng(3).normal(0.0, 0.2, 400)
    interval = paired_bootstrap(values.tolist())
    half_width = 1.96 * values.std(ddof=1) / math.sqrt(values.size)  # the mean's 95% interval, large sample
    assert interval.low < interval.mean < interval.high
    assert (interval.high - interval.low) / 2 == pytest.approx(half_width, rel=0.1)


def test_a_collection_the_reranker_hurts_drives_the_default_to_0() -> None:
    good = collection("good", 20, relevant_rank=2, model_likes_relevant=True)
    bad = collection("bad", 20, relevant_rank=0, model_likes_relevant=False)
    result = choose([good, bad], [])
    assert "default weight 0.00" in evidence.report(result)
    by_held_out = {row["held_out"]: row for row in result["leave_one_out"]}
    assert by_held_out["bad dev"]["weight_from_the_others"] == 0.2  # the smallest weight with good's full gain
    assert by_held_out["bad dev"]["gain"]["mean"] < 0  # ...which the held-out collection pays for
    assert not result["held_out_gains_above_noise"] and result["default_weight"] == 0.0


def test_collections_it_helps_get_the_smallest_weight_with_the_full_gain() -> None:
    tune = [collection("a", 20, 2, True), collection("b", 15, 2, True)]
    measured = collection("m", 10, 2, True, split="test")
    result = choose(tune, [measured])
    assert result["held_out_gains_above_noise"] and result["default_weight"] == 0.2
    gain = result["measured_at_default"][0]["gain"]
    assert gain["low"] == pytest.approx(1 - 1 / math.log2(4))  # rank 3 -> rank 1 for every query
    assert "default weight 0.20" in evidence.report(result)


def test_fit_stores_a_weight_only_when_its_gain_is_above_noise() -> None:
    weight, gains, interval = fit_rerank(collection("helped", 30, 2, True))
    assert weight == 0.2 and interval is not None and interval.low > 0 and gains[0.0] == 0.0
    # Half the queries gain, half lose as much: the best weight's interval straddles 0, so 0 is stored.
    mixed = collection("mixed", 16, 2, True)
    lost = collection("mixed", 16, 0, False)
    half = Evidence("mixed", "dev", RANKS, {**mixed.qrels, **{f"x{q}": r for q, r in lost.qrels.items()}},
                    {**mixed.queries, **{f"x{q}": c for q, c in lost.queries.items()}})
    weight, _, interval = fit_rerank(half)
    assert weight == 0.0


def test_choosing_on_a_test_split_is_refused(tmp_path) -> None:
    path = tmp_path / "t.json.gz"
    collection("t", 3, 2, True, split="test").save(path)
    assert Evidence.load(path).queries == collection("t", 3, 2, True, split="test").queries
    with pytest.raises(SystemExit):
        evidence.main(["choose", "--tune", str(path)])


def test_a_held_out_gain_within_its_noise_is_not_enough() -> None:
    """Both collections gain on average at 0.2, but one only as 6 queries up and 5 down: its interval spans 0."""
    helped = collection("a", 20, 2, True)
    up, down = collection("b", 6, 2, True), collection("b-down", 5, 0, False)
    mixed = Evidence("b", "dev", RANKS, {**up.qrels, **{f"x{q}": r for q, r in down.qrels.items()}},
                     {**up.queries, **{f"x{q}": c for q, c in down.queries.items()}})
    result = choose([helped, mixed], [])
    row = {r["held_out"]: r for r in result["leave_one_out"]}["b dev"]
    assert row["gain"]["mean"] > 0 > row["gain"]["low"]
    assert result["default_weight"] == 0.0
