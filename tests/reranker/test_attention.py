"""The fused (SDPA) documents' attention, the GPU default, against the einsum one and the dense reference."""

import pytest
import torch

from common.device import Dtype
from reranker.attention import attend_docs, attend_docs_fused
from reranker.blockrank import BlockRankForward, ForwardPath, ScoringSpec
from reranker.model import load_model
from reranker.prompt import PromptBuilder, PromptLimits
from reranker.reference import reference_scores
from tests.conftest import FIXTURE_DOCS
from tests.reranker.numerics import longest_inner_product, same_order_where_separated, scores_bound

BLOCK = 40


def test_fused_equals_einsum_with_padding_and_gqa():
    torch.manual_seed(0)
    n, t, kv, g, hd, prefix = 5, 12, 3, 3, 16, 7
    q = torch.randn(n, t, kv, g, hd)
    k, v = torch.randn(n, t, kv, hd), torch.randn(n, t, kv, hd)
    pk, pv = torch.randn(prefix, kv, hd), torch.randn(prefix, kv, hd)
    lengths = torch.tensor([12, 1, 5, 9, 12])
    valid = torch.arange(t)[None] < lengths[:, None]
    einsum = attend_docs(q, k, v, valid, pk, pv, 0.25)
    fused = attend_docs_fused(q, k, v, valid, pk, pv, 0.25)
    assert fused.shape == einsum.shape
    # Real query rows agree; pad rows are never read (keys masked, no score), so only real ones count. Outputs are
    # means of N(0, 1) values over <= 19 keys: two fp32 orders differ by a few u * sqrt(19) * |v|max ~ 1e-6.
    assert float((fused - einsum)[valid].abs().max()) < 1e-5


@pytest.mark.parametrize(("path", "block"), [(ForwardPath.PACKED, BLOCK), (ForwardPath.CHUNKED, BLOCK),
                                             (ForwardPath.PACKED, 8)])  # 8: every document fills its block
def test_forward_with_either_attention_matches_dense_reference(path, block):
    lm = load_model(device="cpu", dtype="fp32", attn_implementation="eager")  # the GPU path's arithmetic, on CPU
    builder = PromptBuilder(lm.tokenizer, limits=PromptLimits(block_tokens=block))
    prompt = builder.build("blood sugar and insulin", [(title, text) for _, title, text in FIXTURE_DOCS[:5]])
    assert (min(map(len, prompt.docs)) == block) is (block == 8)  # padded documents, or none
    spec = ScoringSpec(layer=6, block_tokens=block)
    scores = BlockRankForward(lm.model, path=path).score([prompt], spec)[0]
    reference, _ = reference_scores(lm.model, prompt, spec)
    tolerance = scores_bound(spec.layer, longest_inner_product(lm.model.config), fp32_sides=2)
    assert float((scores - reference).abs().max()) <= tolerance
    assert same_order_where_separated(scores, reference, tolerance)


def test_packed_path_equals_chunked_path_across_tenants_and_the_prefix_cache(tmp_path, monkeypatch):
    """A mixed batch of two chains (the shipped adapter twice, a derived one), shared-prefix cache on, scored at
    two layers: the packed rows give the chunked path's masses, in one piece, with the row-wise work in chunks
    of 37 rows (boundaries inside prompts, parts and documents), with the documents' padding in the rows (as on
    a GPU) and without (as on a CPU), and as the automatic path's packed groups when the batch is past the CPU's
    packed limit."""
    from reranker import packed
    from reranker.adapters import DEFAULT_ADAPTER
    from reranker.engine import Reranker, RerankerConfig
    from reranker.tenants import EquivalenceMode
    from reranker.training.derive import derive_adapter

    derive_adapter(DEFAULT_ADAPTER, tmp_path / "noisy", seed=1, noise=0.5)
    with Reranker(RerankerConfig(adapter="default", device="cpu", dtype=Dtype.FP32, block_tokens=BLOCK,
                                 equivalence=EquivalenceMode.OFF, adapters_root=str(tmp_path))) as r:
        r.tenants.load("noisy", "noisy")
        handles = [r.handle(), r.handle("noisy"), r.handle()]
        docs = [(title, text) for _, title, text in FIXTURE_DOCS]
        prompts = [r.build_prompt("blood sugar and insulin", docs[:5], handles[0]),
                   r.build_prompt("volcano eruption with lava", [*docs[::-1], ("Lava", "hot rock")], handles[1]),
                   r.build_prompt("Q", docs[6:7], handles[2])]
        routes = [h.route for h in handles]
        lengths = [len(d) for p in prompts for d in p.docs]
        assert min(lengths) <= max(lengths) // 2  # a document most of whose padded rows are padding
        forward = r.forward
        assert forward.ragged_docs  # the CPU's layout
        results = {}
        runs = ((ForwardPath.PACKED, 0, True), (ForwardPath.PACKED, 37, True), (ForwardPath.PACKED, 37, False),
                (ForwardPath.CHUNKED, 0, True))
        for path, chunk_rows, ragged in runs:
            forward.path, forward.packed_chunk_rows, forward.ragged_docs = path, chunk_rows, ragged
            with torch.inference_mode():
                results[path, chunk_rows, ragged] = forward._run(prompts, routes, [BLOCK] * 3, [[3, 9]] * 3, 9)
        forward.path, forward.packed_chunk_rows, forward.ragged_docs = ForwardPath.AUTO, 2048, True
        assert r.batch_tokens == packed.CPU_PACKED_MAX_ROW_BYTES // 4  # the batcher's default cap: one fp32 group
        # A limit that the last two prompts fit together and the first two do not: groups [0] and [1, 2].
        forward.cpu_packed_bytes = packed.packed_rows(prompts[1:]) * 4
        assert packed.cpu_packed_groups(prompts, 4, forward.cpu_packed_bytes) == [slice(0, 1), slice(1, 3)]
        with torch.inference_mode():
            results[ForwardPath.AUTO, 2048, True] = forward._run(prompts, routes, [BLOCK] * 3, [[3, 9]] * 3, 9)
        assert r.prefix_cache.hits > 0  # the second and third prompts' instruction came from the cache
        inner = longest_inner_product(forward.model.config)
        for key in [*runs[:3], (ForwardPath.AUTO, 2048, True)]:
            for packed_masses, chunked_masses in zip(results[key], results[ForwardPath.CHUNKED, 0, True], strict=True):
                for layer in (3, 9):
                    bound = scores_bound(layer, inner, fp32_sides=2)
                    assert float((packed_masses[layer] - chunked_masses[layer]).abs().max()) <= bound, key
