"""A chain's deltas merged into copies of the base weights (reranker.routing.MergedWeights) for chunks of rows
that all run that chain: the arithmetic of merging, the keys (never another tenant's delta), the byte budget,
and the packed forward, which gives the scores of the deltas applied apart whatever the tenants' mix."""

from __future__ import annotations

from pathlib import Path

import torch

from common.device import Dtype
from reranker.blockrank import ForwardPath
from reranker.engine import Reranker, RerankerConfig
from reranker.packed import packed_rows
from reranker.routing import LoraDelta, MergedWeights
from reranker.rowops import CompileSetting
from reranker.tenants import DEFAULT_TENANT, EquivalenceMode
from tests.conftest import FIXTURE_DOCS
from tests.reranker.lora import save_all_linear_adapter
from tests.reranker.numerics import longest_inner_product, scores_bound


def delta(out: int, width: int, seed: int, dtype: torch.dtype = torch.float32) -> LoraDelta:
    generator = torch.Generator().manual_seed(seed)
    return LoraDelta(torch.randn(4, width, generator=generator).to(dtype),
                     torch.randn(out, 4, generator=generator).to(dtype))


def test_a_merged_weight_is_the_base_plus_each_parts_delta_and_leaves_the_base_alone():
    base = torch.randn(12, 8, generator=torch.Generator().manual_seed(0))
    before = base.clone()
    q, k = delta(8, 8, 1), delta(4, 8, 2)
    merged = MergedWeights(1 << 20).weight(base, [(slice(0, 8), q), (slice(8, 12), k)])
    assert merged is not None and torch.equal(base, before), "a float32 base is copied, not added to"
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(3))
    apart = x @ base.T
    apart[:, :8] += q(x)
    apart[:, 8:] += k(x)
    # Two float32 orders of sums of 8 + 4 products of N(0, 1) values: a few units of 2^-24 times ~16.
    assert float((x @ merged.T - apart).abs().max()) < 1e-4
    only_k = MergedWeights(1 << 20).weight(base, [(slice(0, 8), None), (slice(8, 12), k)])
    assert only_k is not None and torch.equal(only_k[:8], base[:8]), "columns without a delta are the base's"


def test_entries_are_per_delta_object_and_the_budget_holds():
    base = torch.zeros(16, 16, dtype=torch.bfloat16)  # 512 bytes
    cache = MergedWeights(max_bytes=2 * 512)
    first, twin = delta(16, 16, 1, torch.bfloat16), delta(16, 16, 1, torch.bfloat16)  # equal values, two objects
    a = cache.weight(base, [(slice(None), first)])
    assert cache.weight(base, [(slice(None), first)]) is a and cache.hits == 1
    assert cache.weight(base, [(slice(None), twin)]) is not a, "another tenant's delta never finds this entry"
    cache.weight(base, [(slice(None), delta(16, 16, 2, torch.bfloat16))])
    assert cache.nbytes == 2 * 512, "least recently used out"
    assert cache.weight(base, [(slice(None), None)]) is None, "nothing to merge"
    assert MergedWeights(0).weight(base, [(slice(None), first)]) is None, "0 bytes: off"


def test_the_packed_forward_with_merged_weights_gives_the_scores_of_the_deltas_apart(tmp_path: Path) -> None:
    """fp32, a tenant whose adapter changes every linear and the default tenant: alone (every chunk one chain's,
    merged) and mixed in one batch in chunks of 31 rows (chunks of one chain merged, chunks across two tenants
    with the deltas apart), against the same batches with no merged weights."""
    reranker = Reranker(RerankerConfig(device="cpu", dtype=Dtype.FP32, block_tokens=40, cpu_compile=CompileSetting.OFF,
                                       equivalence=EquivalenceMode.OFF, adapters_root=str(tmp_path)))
    save_all_linear_adapter(reranker.lm.model, tmp_path / "all-linear", reranker.lm.name, layer=5, block_tokens=40)
    reranker.tenants.load("wide", "all-linear")
    forward = reranker.forward
    forward.path, forward.packed_chunk_rows = ForwardPath.PACKED, 31
    merged = forward.weights.merged
    assert merged is not None, "a CPU forward keeps merged weights by default"
    handles = [reranker.handle(), reranker.handle("wide")]
    docs = [(title, text) for _, title, text in FIXTURE_DOCS[:5]]
    batches = {"default alone": [handles[0]] * 2, "wide alone": [handles[1]] * 2, "mixed": handles}
    scores: dict[tuple[str, bool], list[list[float]]] = {}
    for name, batch in batches.items():
        prompts = [reranker.build_prompt(q, docs, h) for q, h in zip(("blood sugar", "roman emperors"), batch,
                                                                      strict=True)]
        assert packed_rows(prompts) > 2 * 31
        for kept in (True, False):
            forward.weights.merged = merged if kept else None
            scores[name, kept] = reranker.score_prompts(prompts, batch)
    assert merged.misses > 0 and merged.hits > 0, "merged weights were made, then found again"
    layer = max(reranker.handle(t).settings.spec.layer for t in (DEFAULT_TENANT, "wide"))
    tolerance = scores_bound(layer, longest_inner_product(forward.model.config), fp32_sides=2)
    for name in batches:
        for got, expected in zip(scores[name, True], scores[name, False], strict=True):
            assert max(abs(a - b) for a, b in zip(got, expected, strict=True)) <= tolerance, name
