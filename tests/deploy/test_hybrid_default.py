"""The default hybrid weight's choice on synthetic collections whose answer is known by construction."""

from pathlib import Path

import pytest

from deploy.hybrid_default import FirstStage, choose, report

# Three documents per query, "a" relevant. The favoured side ranks a, b, c at min-max 1, 0.5, 0; the other side
# ranks b, c, a. Fused at favoured weight w: a = w, b = 1 - w/2, c = (1 - w)/2, so a is first for w > 2/3,
# second for 1/3 < w < 2/3 and last below 1/3: nDCG@10 1, 1/log2(3) = 0.631 or 1/2.
FAVOURED = [("a", 1.0), ("b", 0.5), ("c", 0.0)]
OTHER = [("b", 1.0), ("c", 0.5), ("a", 0.0)]


def collection(name: str, dense_is_right: bool, queries: int = 4) -> FirstStage:
    dense, lexical = (FAVOURED, OTHER) if dense_is_right else (OTHER, FAVOURED)
    ids = [f"q{i}" for i in range(queries)]
    return FirstStage(name, "train", {q: {"a": 1} for q in ids}, {q: dense for q in ids}, {q: lexical for q in ids})


def test_the_choice_maximises_the_worst_margin_and_leave_one_out_shows_its_price() -> None:
    dense_side, lexical_side = collection("dense-side", True), collection("lexical-side", False)
    result = choose([dense_side, lexical_side], [])
    # Each alone is served best at weights where its own side wins (>= 0.7, <= 0.3; the nearest to 0.5), and
    # there the other ranks "a" last (margin -0.5); between, both rank it second (-0.369): the maximin is 0.5.
    assert result["chosen_dense_weight"] == 0.5
    rows = {row["collection"]: row for row in result["leave_one_out"]}
    assert rows["dense-side train"]["weight_from_the_others"] == 0.3
    assert rows["lexical-side train"]["weight_from_the_others"] == 0.7
    for row in rows.values():
        assert row["margin"]["mean"] == pytest.approx(-0.5)
        assert row["better_single_stage"] == ("dense" if row["collection"].startswith("dense") else "lexical")
    at_choice = result["measured"][0]["variants"]["convex 0.50 (chosen)"]
    assert at_choice["margin"]["mean"] == pytest.approx(1 / 1.584962500721156 - 1)
    assert "chosen dense weight 0.50" in report(result)


def test_lists_survive_a_round_trip(tmp_path: Path) -> None:
    stage = collection("c", True)
    stage.save(tmp_path / "c.json.gz")
    assert FirstStage.load(tmp_path / "c.json.gz") == stage
