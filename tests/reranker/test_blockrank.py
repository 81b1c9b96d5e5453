"""The block-sparse fast path against the dense block-masked reference, on the real model (fp32), on the
--device of the run (tests/conftest.py; cpu by default). tests/reranker/test_cuda.py reuses the helpers."""

from collections.abc import Sequence

import pytest
import torch

from reranker.blockrank import BlockRankForward, Captured, ScoringSpec
from reranker.engine import Reranker, RerankerConfig
from reranker.errors import RerankInputError
from reranker.model import HFModule, LoadedModel, load_model
from reranker.prompt import Prompt, PromptBuilder, PromptLimits, PromptTemplate
from reranker.reference import block_sparse_layout, reference_scores
from tests.conftest import FIXTURE_DOCS

BLOCK = 48
DOCS = [(title, text) for _, title, text in FIXTURE_DOCS]
LONG = ("Long one", " ".join(["a long document about many unrelated things"] * 20))  # truncated to BLOCK


@pytest.fixture(scope="module")
def eager_lm(device: str) -> LoadedModel:
    """fp32 with eager attention, so the reference can return its attention probabilities."""
    return load_model(device=device, dtype="fp32", attn_implementation="eager")


@pytest.fixture(scope="module")
def builder(eager_lm):
    return PromptBuilder(eager_lm.tokenizer, limits=PromptLimits(block_tokens=BLOCK))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def equivalence_prompts(builder: PromptBuilder) -> list[Prompt]:
    """Uneven lengths (padded blocks), a truncated block, N = 1 and a batch of 3 prompts in one pass."""
    return [builder.build("blood sugar and insulin", DOCS[:5] + [LONG]),
            builder.build("Q", DOCS[6:7]),
            builder.build("volcano eruption with lava", DOCS[::-1])]


def assert_matches_dense_reference(model: HFModule, prompts: Sequence[Prompt], spec: ScoringSpec,
                                   chunk_tokens: int) -> None:
    """The fast path's batched scores and its scoring-layer attention masses within 1e-4 of the dense
    reference's, the same ranking, and every layer's hidden states up to l* within 1e-5 (CPU; 2e-5 on CUDA) of the
    largest reference value (fp32: hidden states reach ~700, so an absolute bound would measure only rounding)."""
    fast = BlockRankForward(model)
    fast.chunk_tokens = chunk_tokens  # 100: documents run through each layer two at a time
    captured: list[Captured] = []
    masses = fast.head_masses(prompts, spec.layer, [spec.layer], spec.block_tokens, capture=captured)
    batched_scores = [s.cpu() for s in fast.score(prompts, spec)]
    # On CPU both calls take the chunked path; on CUDA score() takes the packed GPU path and head_masses
    # (which captures) the chunked one, so they agree to rounding only.
    same_path_atol = 1e-8 if fast.device.type == "cpu" else 1e-5
    # Hidden states: 1e-5 of the largest reference value on CPU; on an H100 (IEEE fp32, cuBLAS's own reduction
    # order on both sides) the worst measured was 1.04e-5 (2026-11-26), so 2e-5 there.
    hidden_tol = 1e-5 if fast.device.type == "cpu" else 2e-5
    start = 0
    for i, prompt in enumerate(prompts):
        reference, hidden = reference_scores(model, prompt, spec)
        selected = list(spec.heads) or list(range(fast.n_heads))
        mass_scores = masses[i][0][:, selected].mean(dim=(0, 1)).cpu()
        assert torch.allclose(mass_scores, batched_scores[i], atol=same_path_atol)
        assert float((mass_scores - reference).abs().max()) <= 1e-4
        assert float((batched_scores[i] - reference).abs().max()) <= 1e-4
        assert torch.equal(batched_scores[i].argsort(), reference.argsort())
        # Every layer's hidden states up to l*: prefix, real document tokens, final segment.
        # The batch pads every block to the longest of all prompts, the reference to this prompt's longest.
        n0, width = len(prompt.prefix), max(len(doc) for doc in prompt.docs)
        ids, _, _, _ = block_sparse_layout(prompt, spec.block_tokens)
        assert ids.shape[0] == n0 + width * prompt.n_docs + len(prompt.final)
        for j, (prefix, docs, final) in enumerate(captured):
            ref = hidden[j][0]
            assert rel_err(prefix[i][0], ref[:n0]) <= hidden_tol
            assert rel_err(final[i][0], ref[-len(prompt.final):]) <= hidden_tol
            ref_docs = ref[n0:n0 + width * prompt.n_docs].view(prompt.n_docs, width, -1)
            rows = docs[start:start + prompt.n_docs]
            for d, doc in enumerate(prompt.docs):
                assert rel_err(rows[d, :len(doc)], ref_docs[d, :len(doc)]) <= hidden_tol
        start += prompt.n_docs


@pytest.mark.parametrize("layer,heads,chunk_tokens", [(4, (), 4096), (15, (0, 4, 8), 100)])
def test_scores_and_hidden_states_match_dense_reference(eager_lm, builder, layer, heads, chunk_tokens):
    spec = ScoringSpec(layer=layer, heads=heads, block_tokens=BLOCK)
    assert_matches_dense_reference(eager_lm.model, equivalence_prompts(builder), spec, chunk_tokens)


def test_scores_are_a_distribution_over_documents(eager_lm, builder):
    scores = BlockRankForward(eager_lm.model).score([builder.build("q", DOCS)], ScoringSpec(8, (), BLOCK))[0]
    assert scores.shape == (len(DOCS),)
    assert abs(float(scores.sum()) - 1.0) < 1e-5 and bool((scores > 0).all())


def test_permuting_documents_permutes_scores(eager_lm):
    # With an identifier that does not name the slot, nothing else depends on it: exact equivariance.
    slot_free = PromptBuilder(eager_lm.tokenizer, PromptTemplate(tag="Document:"), PromptLimits(block_tokens=BLOCK))
    forward = BlockRankForward(eager_lm.model)
    spec = ScoringSpec(layer=12, block_tokens=BLOCK)
    perm = [5, 2, 7, 0, 3, 1, 6, 4]
    base = forward.score([slot_free.build("insulin and blood glucose", DOCS)], spec)[0]
    permuted = forward.score([slot_free.build("insulin and blood glucose", [DOCS[i] for i in perm])], spec)[0]
    assert float((permuted - base[perm]).abs().max()) <= 1e-5


def test_engine_ranks_and_enforces_limits(eager_lm):
    reranker = Reranker(RerankerConfig(adapter="none", block_tokens=BLOCK, max_documents=4, max_document_tokens=64),
                        loaded=eager_lm)
    docs: list[str | tuple[str, str]] = ["The stock market fell.", ("Cats", "Cats purr."), ("Rome", "Emperors built roads.")]
    handle = reranker.handle()
    model = reranker.score_prompts([reranker.build_prompt("kittens purring", docs, handle)], [handle])[0]
    full = reranker.rank("kittens purring", docs)
    assert [r.index for r in full] == sorted(range(3), key=lambda i: -model[i]), "best model score first"
    assert [r.score for r in full] == [r.model_score for r in full] == sorted(model, reverse=True)
    assert [r.index for r in reranker.rank("kittens purring", docs, top_n=1)] == [full[0].index]
    # The base model's fusion weight is 0 (it does not beat the first stage): first-stage order, model scores kept.
    assert handle.settings.fusion_weight == 0.0
    fused = reranker.rank("kittens purring", docs, first_stage_scores=[0.1, 0.9, 0.5])
    assert [r.index for r in fused] == [1, 2, 0]
    assert {r.index: r.model_score for r in fused} == pytest.approx(dict(enumerate(model)))
    for query, bad in [("", ["x"]), ("q", []), ("q", ["a"] * 5), ("q", ["word " * 500]), ("q", ["  "])]:
        with pytest.raises(RerankInputError):
            reranker.rank(query, bad)
