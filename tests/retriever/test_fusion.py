"""Hybrid fusion (retriever.fusion): pure functions, no index."""

import pytest

from retriever.fusion import FusedHit, FusionMethod, FusionSettings, fuse

DENSE = [("a", 1.0), ("b", 0.5), ("c", 0.0)]
LEXICAL = [("c", 12.0), ("d", 8.0), ("a", 4.0)]


def test_convex_mixes_min_max_normalised_sides():
    hits = fuse(DENSE, LEXICAL, FusionSettings(dense_weight=0.5), top_k=10)
    scores = {h.id: h.score for h in hits}
    # dense: a 1, b 0.5, c 0; lexical: c 1, d 0.5, a 0; a side that missed a document counts 0 there
    assert scores == pytest.approx({"a": 0.5, "b": 0.25, "c": 0.5, "d": 0.25})
    assert [h.id for h in hits] == ["a", "c", "b", "d"], "ties: dense order first, then lexical"
    assert hits[0] == FusedHit("a", 0.5, 1.0, 4.0)
    assert next(h for h in hits if h.id == "d").dense is None
    assert next(h for h in hits if h.id == "b").lexical is None


def test_weight_one_or_zero_is_one_side_alone():
    assert [h.id for h in fuse(DENSE, LEXICAL, FusionSettings(dense_weight=1.0), 3)] == ["a", "b", "c"]
    assert [h.id for h in fuse(DENSE, LEXICAL, FusionSettings(dense_weight=0.0), 3)] == ["c", "d", "a"]


def test_rrf_sums_reciprocal_ranks():
    hits = fuse(DENSE, LEXICAL, FusionSettings(method=FusionMethod.RRF, rrf_k=60), top_k=2)
    scores = {h.id: h.score for h in hits}
    assert [h.id for h in hits] == ["a", "c"]
    assert scores["a"] == pytest.approx(1 / 61 + 1 / 63) and scores["c"] == pytest.approx(1 / 63 + 1 / 61)


def test_one_side_empty_or_flat():
    assert [h.id for h in fuse([], LEXICAL, FusionSettings(), 5)] == ["c", "d", "a"]
    assert [h.id for h in fuse(DENSE, [], FusionSettings(), 5)] == ["a", "b", "c"]
    assert fuse([], [], FusionSettings(), 5) == []
    flat = fuse([("x", 0.3)], [("y", 2.0)], FusionSettings(dense_weight=0.5), 5)
    assert [h.score for h in flat] == [0.5, 0.5], "a single candidate tops its side"


def test_settings_are_validated():
    for bad in ({"dense_weight": 1.5}, {"dense_weight": -0.1}, {"candidate_depth": 0}, {"rrf_k": 0},
                {"rerank_weight": 2.0}):
        with pytest.raises(ValueError):
            FusionSettings(**bad)
