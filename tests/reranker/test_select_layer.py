"""The fusion weight's choice over several collections' held-out queries."""

import pytest

from reranker.training.select_layer import best_weight, macro_grid


def test_fusion_weight_across_collections_gives_each_collection_one_vote():
    big = {0.0: 0.70, 0.3: 0.72, 0.6: 0.74}  # the collection the adapter was trained on: more weight helps
    unseen = {0.0: 0.33, 0.3: 0.34, 0.6: 0.30}  # one it never saw: too much weight hurts
    mean = macro_grid([big, unseen])
    assert mean == pytest.approx({0.0: 0.515, 0.3: 0.53, 0.6: 0.52})
    assert best_weight(big) == 0.6 and best_weight(mean) == 0.3
    assert best_weight({0.0: 0.5, 0.3: 0.5}) == 0.0, "ties go to the more conservative weight"
