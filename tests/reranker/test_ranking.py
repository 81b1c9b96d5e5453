"""Pure ranking arithmetic (reranker.ranking): no model, milliseconds."""

import pytest

from reranker.ranking import fuse, kendall_tau, minmax, rank_scores


def test_fusion_is_a_convex_mix_of_normalised_scores():
    model, first = [0.1, 0.5, 0.2], [3.0, 1.0, 2.0]
    assert [r.index for r in rank_scores(fuse(model, first, 1.0))] == [1, 2, 0]
    assert [r.index for r in rank_scores(fuse(model, first, 0.0))] == [0, 2, 1]
    assert fuse(model, first, 0.5) == pytest.approx([0.5, 0.5, 0.5 * 0.25 + 0.5 * 0.5])
    assert fuse([1.0, 1.0], [2.0, 1.0], 0.5) == pytest.approx([0.5, 0.0])
    with pytest.raises(ValueError):
        fuse([1.0, 2.0], [1.0], 0.5)


def test_minmax_maps_to_unit_interval_and_flat_lists_to_zero():
    assert minmax([2.0, 4.0, 3.0]) == [0.0, 1.0, 0.5]
    assert minmax([7.0, 7.0]) == [0.0, 0.0]


def test_rank_scores_is_stable_and_keeps_the_model_score():
    ranked = rank_scores([0.2, 0.9, 0.2, 0.5], top_n=3, model_scores=[1.0, 2.0, 3.0, 4.0])
    assert [r.index for r in ranked] == [1, 3, 0], "ties keep the input order; top_n cuts"
    assert [r.model_score for r in ranked] == [2.0, 4.0, 1.0]
    assert [r.index for r in rank_scores([1.0, 1.0, 1.0])] == [0, 1, 2]


def test_kendall_tau():
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    assert kendall_tau([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)  # 2 concordant, 1 discordant pair
    assert kendall_tau([1, 1, 2], [1, 2, 3]) == pytest.approx(2 / 3)  # a tie counts as neither
    assert kendall_tau([5.0], [1.0]) == 1.0
    with pytest.raises(ValueError):
        kendall_tau([1, 2], [1])
