"""The block-sparse fast path (fp32) against the dense block-masked reference in float64, on the real model, on
the --device of the run (tests/conftest.py; cpu by default); bounds from tests/reranker/numerics.py.
tests/reranker/test_cuda.py reuses the helpers."""

import copy
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
from tests.reranker.numerics import (
    fp32_bound,
    longest_inner_product,
    relative_error,
    same_order_where_separated,
    scores_bound,
)

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
    return relative_error(a, b)


def float64_copy(model: HFModule) -> HFModule:
    """The same weights in float64: the reference the fp32 paths are measured against."""
    return copy.deepcopy(model).to(torch.float64)


def equivalence_prompts(builder: PromptBuilder) -> list[Prompt]:
    """Uneven lengths (padded blocks), a truncated block, N = 1 and a batch of 3 prompts in one pass."""
    return [builder.build("blood sugar and insulin", DOCS[:5] + [LONG]),
            builder.build("Q", DOCS[6:7]),
            builder.build("volcano eruption with lava", DOCS[::-1])]


def assert_matches_dense_reference(model: HFModule, prompts: Sequence[Prompt], spec: ScoringSpec,
                                   chunk_tokens: int, exact: HFModule) -> None:
    """The fp32 fast path against the dense block-masked reference run in float64 (`exact`): its batched scores and
    scoring-layer attention masses within `scores_bound` of the reference's, the same order for every pair of
    documents the bound separates, and every layer's hidden states up to l* within `fp32_bound` of their depth
    (tests/reranker/numerics.py derives both). The model's own dense forward in fp32 is held to the same bounds:
    if it missed them, the error model, not the fast path, would be wrong for this machine."""
    fast = BlockRankForward(model)
    fast.chunk_tokens = chunk_tokens  # 100: documents run through each layer two at a time
    inner = longest_inner_product(model.config)
    score_tol = scores_bound(spec.layer, inner)
    captured: list[Captured] = []
    masses = fast.head_masses(prompts, spec.layer, [spec.layer], spec.block_tokens, capture=captured)
    batched_scores = [s.cpu() for s in fast.score(prompts, spec)]
    start = 0
    for i, prompt in enumerate(prompts):
        reference, hidden = reference_scores(exact, prompt, spec)
        dense32, hidden32 = reference_scores(model, prompt, spec)
        selected = list(spec.heads) or list(range(fast.n_heads))
        mass_scores = masses[i][0][:, selected].mean(dim=(0, 1)).cpu()
        # On CPU both calls take the chunked path; on CUDA score() takes the packed GPU path and head_masses
        # (which captures) the chunked one: two fp32 computations of the same scores.
        assert float((mass_scores - batched_scores[i]).abs().max()) <= scores_bound(spec.layer, inner, fp32_sides=2)
        for got in (mass_scores, batched_scores[i], dense32):
            assert float((got.double() - reference.double()).abs().max()) <= score_tol
            assert same_order_where_separated(got, reference, score_tol)
        # Every layer's hidden states up to l*: prefix, real document tokens, final segment.
        # The batch pads every block to the longest of all prompts, the reference to this prompt's longest.
        n0, width = len(prompt.prefix), max(len(doc) for doc in prompt.docs)
        ids, _, _, _ = block_sparse_layout(prompt, spec.block_tokens)
        assert ids.shape[0] == n0 + width * prompt.n_docs + len(prompt.final)
        for depth, (prefix, docs, final) in enumerate(captured):
            ref, bound = hidden[depth][0], fp32_bound(depth, inner)
            assert rel_err(hidden32[depth][0], ref) <= bound, "the fp32 dense forward misses the error model"
            assert rel_err(prefix[i][0], ref[:n0]) <= bound
            assert rel_err(final[i][0], ref[-len(prompt.final):]) <= bound
            ref_docs = ref[n0:n0 + width * prompt.n_docs].view(prompt.n_docs, width, -1)
            rows = docs[start:start + prompt.n_docs]
            for d, doc in enumerate(prompt.docs):
                assert rel_err(rows[d, :len(doc)], ref_docs[d, :len(doc)]) <= bound
        start += prompt.n_docs


@pytest.fixture(scope="module")
def exact_model(eager_lm):
    return float64_copy(eager_lm.model)


@pytest.mark.parametrize("layer,heads,chunk_tokens", [(4, (), 4096), (15, (0, 4, 8), 100)])
def test_scores_and_hidden_states_match_dense_reference(eager_lm, exact_model, builder, layer, heads, chunk_tokens):
    spec = ScoringSpec(layer=layer, heads=heads, block_tokens=BLOCK)
    assert_matches_dense_reference(eager_lm.model, equivalence_prompts(builder), spec, chunk_tokens, exact_model)


def test_scores_are_a_distribution_over_documents(eager_lm, builder):
    scores = BlockRankForward(eager_lm.model).score([builder.build("q", DOCS)], ScoringSpec(8, (), BLOCK))[0]
    assert scores.shape == (len(DOCS),)
    # A sum of 8 fp32 fractions of one: rounding error at most 8 u, far below 1e-5.
    assert abs(float(scores.sum()) - 1.0) < 1e-5 and bool((scores > 0).all())


def test_permuting_documents_permutes_scores(eager_lm):
    # With an identifier that does not name the slot, nothing else depends on it: equivariance up to rounding (the
    # documents sit in other rows of the batch, so other summation orders), two fp32 forwards compared.
    slot_free = PromptBuilder(eager_lm.tokenizer, PromptTemplate(tag="Document:"), PromptLimits(block_tokens=BLOCK))
    forward = BlockRankForward(eager_lm.model)
    spec = ScoringSpec(layer=12, block_tokens=BLOCK)
    perm = [5, 2, 7, 0, 3, 1, 6, 4]
    base = forward.score([slot_free.build("insulin and blood glucose", DOCS)], spec)[0]
    permuted = forward.score([slot_free.build("insulin and blood glucose", [DOCS[i] for i in perm])], spec)[0]
    bound = scores_bound(spec.layer, longest_inner_product(eager_lm.model.config), fp32_sides=2)
    assert float((permuted - base[perm]).abs().max()) <= bound


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
