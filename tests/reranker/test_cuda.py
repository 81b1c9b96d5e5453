"""The BlockRank reranker on a CUDA GPU: the fast path against the dense reference in fp32, bf16 against fp32,
tenants in one routed forward against merged models, and the engine against the CPU engine. The whole module
is skipped without a GPU. Every check is small (a few short documents per prompt): most of the module's time
is loading the model, three times. The equivalence helpers are the CPU tests' own (test_blockrank.py,
test_zoo.py).

    python -m pytest tests/reranker/test_cuda.py -q
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from common.device import Dtype
from reranker import kernels
from reranker.adapters import DEFAULT_ADAPTER
from reranker.blockrank import BlockRankForward, ForwardPath, ScoringSpec
from reranker.engine import DocumentInput, Reranker, RerankerConfig
from reranker.model import LoadedModel, load_model
from reranker.prompt import PromptBuilder, PromptLimits
from reranker.reference import reference_scores
from reranker.tenants import DEFAULT_TENANT, EquivalenceMode
from reranker.training.derive import derive_adapter
from tests.reranker.numerics import BF16_SCORE_REL_TOL, DENSE_BF16_FACTOR, TOP1_MARGIN
from tests.reranker.test_blockrank import (
    BLOCK,
    DOCS,
    assert_matches_dense_reference,
    equivalence_prompts,
    float64_copy,
    rel_err,
)
from tests.reranker.test_zoo import DOCS as TENANT_DOCS
from tests.reranker.test_zoo import OTHER_QUERY, QUERY, merged_scores

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (torch.cuda.is_available() is False)")

# bf16's bounds (BF16_SCORE_REL_TOL, DENSE_BF16_FACTOR, TOP1_MARGIN): tests/reranker/numerics.py; the figure is
# printed. Tenant scores against the adapter merged into its own model: tests/reranker/test_zoo.py's fp32 bound.
MERGED_TOL = 1e-4
# The shipped reranker's scoring layer (reranker/adapters/scifact-lora/blockrank.json), all heads.
SHIPPED_LAYER = 13
# A dozen prompts, each query's topical document among the candidates, in three orders: the bound compares
# mean errors, because the worst of three prompts swung by 2x between runs of the same code (H100 session 3:
# 1.52x the dense forward's worst against 0.67x on CPU) while the mean over prompts is stable.
BF16_QUERIES = ["blood sugar and insulin", "volcano eruption with lava", "kittens purring",
                "roads and aqueducts of the emperors"]
BF16_PROMPTS = [(query, docs) for query in BF16_QUERIES for docs in (DOCS[:6], DOCS[::-1], DOCS[1::2] + DOCS[::2])]
# Neighbours at least 2 x BF16_SCORE_REL_TOL of the top score apart in fp32, so half precision cannot swap
# them (checked before comparing): the order is the model's, not rounding's.
ENGINE_CASES: list[tuple[str, list[DocumentInput]]] = [
    ("kittens purring", ["The stock market fell.", ("Cats", "Cats purr."),
                         ("Rome", "Emperors built roads.")]),
    ("How does insulin control blood sugar?", [
        ("Stocks", "Share prices fell sharply as investors sold equities."),
        ("Insulin", "Insulin lowers blood glucose; type 1 diabetes destroys the beta cells that make it."),
        ("Glucose", "Blood sugar rises after meals and is cleared by insulin acting on muscle and liver.")]),
]


@pytest.fixture(scope="module", autouse=True)
def ieee_fp32() -> Iterator[None]:
    """fp32 means IEEE fp32 here: TF32 matmuls (~1e-3 relative) are outside the fp32 error model
    (tests/reranker/numerics.py)."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


@pytest.fixture(scope="module")
def lm() -> LoadedModel:
    """fp32 on the GPU with eager attention, so the reference can return its attention probabilities."""
    loaded = load_model(device="cuda", dtype=Dtype.FP32, attn_implementation="eager")
    assert loaded.device.type == "cuda"
    return loaded


@pytest.fixture(scope="module")
def builder(lm: LoadedModel) -> PromptBuilder:
    return PromptBuilder(lm.tokenizer, limits=PromptLimits(block_tokens=BLOCK))


@pytest.fixture(scope="module")
def adapters_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped adapter and two derived from it (distinct weights, comparable behaviour)."""
    root = tmp_path_factory.mktemp("cuda-adapters")
    weights_only = shutil.ignore_patterns("*.png", "*.jsonl", "*.md")
    shutil.copytree(DEFAULT_ADAPTER, root / "scifact", ignore=weights_only)
    for seed in (1, 2):
        derive_adapter(DEFAULT_ADAPTER, root / f"noisy-{seed}", seed=seed, noise=0.5)
    return root


@pytest.mark.parametrize("layer,heads,chunk_tokens", [(4, (), 1 << 16), (15, (0, 4, 8), 100)])
def test_fp32_fast_path_matches_dense_reference(lm: LoadedModel, builder: PromptBuilder, layer: int,
                                                heads: tuple[int, ...], chunk_tokens: int) -> None:
    # Padded blocks, uneven and truncated documents, 3 prompts in one batch; 1 << 16: a single chunk.
    spec = ScoringSpec(layer=layer, heads=heads, block_tokens=BLOCK)
    assert_matches_dense_reference(lm.model, equivalence_prompts(builder), spec, chunk_tokens, float64_copy(lm.model))


@dataclass(frozen=True)
class Bf16Result:
    query: str
    fast: float  # rel_err of the bf16 fast path's scores from the fp32 dense reference's
    dense: float  # the same for the model's own dense bf16 forward (reranker.reference in bf16)
    same_top1: bool  # the fast path's best document is the reference's (True where fp32's top two are too close)
    variants: dict[str, float]  # the same error with one part of the fast path swapped out (printed)


def summary(results: list[Bf16Result]) -> str:
    return "; ".join(f"{r.query!r}: fast path {r.fast:.4f}, dense bf16 {r.dense:.4f}, same top-1 {r.same_top1}, "
                     + ", ".join(f"{name} {err:.4f}" for name, err in r.variants.items()) for r in results)


@contextmanager
def triton_off() -> Iterator[None]:
    before, kernels.ENABLED = kernels.ENABLED, False
    try:
        yield
    finally:
        kernels.ENABLED = before


# Where the fast path's bf16 error comes from: the same scores with the fused Triton kernels off, with SDPA's
# math kernel instead of flash, and through the chunked path (einsum attention, no packing).
VARIANTS: dict[str, Callable[[], AbstractContextManager]] = {
    "no Triton": triton_off, "math SDPA": lambda: sdpa_kernel(SDPBackend.MATH)}


@pytest.fixture(scope="module")
def bf16_results(lm: LoadedModel, builder: PromptBuilder) -> list[Bf16Result]:
    bf16 = copy.deepcopy(lm.model).to(torch.bfloat16)  # the same weights load_model(dtype="bf16") gives
    spec = ScoringSpec(layer=SHIPPED_LAYER, block_tokens=BLOCK)
    prompts = [builder.build(query, docs) for query, docs in BF16_PROMPTS]
    fast = BlockRankForward(bf16).score(prompts, spec)
    variants: dict[str, list[torch.Tensor]] = {}
    for name, context in VARIANTS.items():
        with context():
            variants[name] = BlockRankForward(bf16, cuda_graphs=0).score(prompts, spec)
    variants["chunked"] = BlockRankForward(bf16, path=ForwardPath.CHUNKED).score(prompts, spec)
    results = []
    for i, ((query, _), prompt, scores) in enumerate(zip(BF16_PROMPTS, prompts, fast, strict=True)):
        reference, _ = reference_scores(lm.model, prompt, spec)
        dense, _ = reference_scores(bf16, prompt, spec)
        got = scores.float().cpu()
        top2 = reference.topk(2).values
        decided = float(top2[0] - top2[1]) >= TOP1_MARGIN * float(top2[0].abs())
        results.append(Bf16Result(query, rel_err(got, reference), rel_err(dense.float(), reference),
                                  int(got.argmax()) == int(reference.argmax()) or not decided,
                                  {name: rel_err(v[i].float().cpu(), reference) for name, v in variants.items()}))
    return results


def test_bf16_fast_path_is_as_close_to_fp32_as_dense_bf16(bf16_results: list[Bf16Result]) -> None:
    # Top-1 only: unrelated documents' scores lie within bf16 rounding of each other, so the order below the
    # first is rounding's.
    print("bf16 relative score errors from fp32:", summary(bf16_results))  # shown with pytest -rA (the GPU job)
    assert all(r.same_top1 for r in bf16_results), summary(bf16_results)
    # Error of the fast path's own, beyond what bf16 costs the model anyway: rounding falls differently along
    # the two computations, so the comparison is of means over the prompts.
    mean_fast = sum(r.fast for r in bf16_results) / len(bf16_results)
    mean_dense = sum(r.dense for r in bf16_results) / len(bf16_results)
    print(f"mean bf16 error: fast path {mean_fast:.4f}, dense bf16 {mean_dense:.4f}")
    assert mean_fast <= DENSE_BF16_FACTOR * mean_dense, summary(bf16_results)


def test_mixed_tenant_batch_equals_merged_models(lm: LoadedModel, adapters_root: Path) -> None:
    # Equivalence off: no block is substituted, so each tenant must equal its own merged model to rounding.
    config = RerankerConfig(adapter="none", equivalence=EquivalenceMode.OFF, adapters_root=str(adapters_root))
    reranker = Reranker(config, loaded=lm)
    adapters = {"acme": "scifact", "beta": "noisy-1", "gamma": "noisy-2"}
    for tenant, adapter in adapters.items():
        reranker.tenants.load(tenant, adapter)
    # Three tenants and the base model (its own scoring spec and block length) in one routed forward.
    order = [("acme", QUERY), ("beta", QUERY), (DEFAULT_TENANT, OTHER_QUERY), ("gamma", OTHER_QUERY),
             ("acme", OTHER_QUERY), ("beta", OTHER_QUERY), (DEFAULT_TENANT, QUERY)]
    handles = [reranker.handle(tenant) for tenant, _ in order]
    prompts = [reranker.build_prompt(query, TENANT_DOCS, handle)
               for (_, query), handle in zip(order, handles, strict=True)]
    together = [torch.tensor(s) for s in reranker.score_prompts(prompts, handles)]
    assert (together[0] - together[1]).abs().max() > 1e-3, "the adapters must differ"
    for (tenant, query), handle, prompt, got in zip(order, handles, prompts, together, strict=True):
        if tenant == DEFAULT_TENANT:
            alone = BlockRankForward(lm.model).score([prompt], handle.settings.spec)[0].cpu()
        else:
            alone = merged_scores(reranker, adapters_root / adapters[tenant], handle, query)
        assert (got - alone).abs().max() <= MERGED_TOL, (tenant, query)


def test_engine_ranks_like_the_cpu_engine() -> None:
    gpu = Reranker(RerankerConfig(device="cuda"))  # auto dtype: bf16 (fp16 where bf16 is unsupported)
    cpu = Reranker(RerankerConfig(device="cpu", dtype=Dtype.FP32))
    assert gpu.lm.device.type == "cuda" and gpu.lm.dtype in (torch.bfloat16, torch.float16)
    for query, docs in ENGINE_CASES:
        expected = cpu.rank(query, docs)
        margin = 2 * BF16_SCORE_REL_TOL * expected[0].score
        assert all(a.score - b.score > margin for a, b in itertools.pairwise(expected)), \
            f"{query!r}: scores too close to call in half precision: {[r.score for r in expected]}"
        got = gpu.rank(query, docs)
        assert [r.index for r in got] == [r.index for r in expected], (query, got, expected)


def test_cuda_graph_replays_equal_the_eager_forward(lm: LoadedModel, adapters_root: Path) -> None:
    # A batch shape is captured the second time it is seen; then a batch of the same shape with other inputs
    # (the documents reversed: other lengths at each row, same layout) must replay to its own eager scores.
    config = RerankerConfig(adapter="none", equivalence=EquivalenceMode.OFF, adapters_root=str(adapters_root))
    graphed = Reranker(config, loaded=lm)
    eager = Reranker(dataclasses.replace(config, cuda_graphs=0), loaded=lm)
    graphed.tenants.load("acme", "noisy-1")
    eager.tenants.load("acme", "noisy-1")

    def batch(reranker: Reranker, docs: Sequence[DocumentInput]) -> list[list[float]]:
        handles = [reranker.handle(), reranker.handle("acme")]
        prompts = [reranker.build_prompt(q, docs, h) for q, h in zip((QUERY, OTHER_QUERY), handles, strict=True)]
        return reranker.score_prompts(prompts, handles)

    forward, reverse = list(TENANT_DOCS), list(TENANT_DOCS)[::-1]
    runs = [batch(graphed, forward) for _ in range(3)] + [batch(graphed, reverse)]
    graphs = graphed.forward.graphs
    assert (graphs.captures, graphs.replays) == (1, 3), "eager, capture + replay, replay, replay"
    for got, docs in zip(runs, [forward] * 3 + [reverse], strict=True):
        expected = batch(eager, docs)
        for a, b in zip(got, expected, strict=True):
            assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5), (a, b)
    assert eager.forward.graphs.captures == 0
    # Dropping every graph releases their memory pool: capturing again must start a new one (reusing the
    # released pool failed an allocator assertion on an H100) and replay the same scores.
    graphs.clear()
    again = [batch(graphed, forward) for _ in range(3)]
    assert (graphs.captures, graphs.replays) == (2, 5)
    for got in again:
        for a, b in zip(got, batch(eager, forward), strict=True):
            assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5), (a, b)
