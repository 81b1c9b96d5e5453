"""Multi-tenant rerankers as shared blocks (reranker.zoo, reranker.tenants, reranker.equivalence), real
model, fp32, on the --device of the run (tests/conftest.py). The model is loaded once per module; every
test loads the tenants it uses under its own names, and a fixture unloads every tenant and restores the
budget afterwards, so no test depends on another's leftovers or on the order they run in."""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Iterator

import pytest
import torch

from common.device import Dtype
from reranker.adapters import ADAPTER_CONFIG, DEFAULT_ADAPTER
from reranker.blockrank import BlockRankForward
from reranker.engine import Reranker, RerankerConfig
from reranker.equivalence import ReplacementKind
from reranker.errors import AdapterInvalid, AdapterNotFound, UnknownTenant
from reranker.prompt import PromptTemplate
from reranker.tenants import DEFAULT_TENANT, EquivalenceMode, TenantHandle
from reranker.training.derive import derive_adapter, merge_adapter
from tests.reranker.lora import save_all_linear_adapter
from tests.reranker.numerics import longest_inner_product, scores_bound

QUERY = "Insulin lowers blood glucose in diabetes"
DOCS = [("Insulin", "Insulin lowers blood glucose; type 1 diabetes destroys the beta cells that make it."),
        ("Bread", "Yeast ferments the dough, which rises before baking into a crusty loaf."),
        ("Glucose", "Blood sugar rises after meals and is cleared by insulin acting on muscle and liver."),
        ("Rome", "The Roman Empire built roads, aqueducts and the Colosseum."),
        ("Metformin", "Metformin reduces hepatic glucose output in type 2 diabetes.")]
OTHER_QUERY = "volcanic eruptions and lava"


@pytest.fixture(scope="module")
def adapters_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    shutil.copytree(DEFAULT_ADAPTER, root / "scifact", ignore=shutil.ignore_patterns("*.png", "*.jsonl", "*.md"))
    derive_adapter(DEFAULT_ADAPTER, root / "noisy", seed=1, noise=0.5)
    derive_adapter(DEFAULT_ADAPTER, root / "untrained", seed=2, noise=0.0, zero_b=True)
    derive_adapter(DEFAULT_ADAPTER, root / "twin", seed=3, noise=1e-6)
    return root


@pytest.fixture(scope="module")
def shared_reranker(adapters_root, device: str) -> Iterator[Reranker]:
    with Reranker(RerankerConfig(adapter="none", device=device, dtype=Dtype.FP32,
                                 equivalence=EquivalenceMode.SYNC, adapters_root=str(adapters_root))) as r:
        yield r


@pytest.fixture
def reranker(shared_reranker: Reranker) -> Iterator[Reranker]:
    """The module's reranker with no tenant but the default; whatever a test loads is unloaded after it."""
    zoo = shared_reranker.tenants.zoo
    budget = zoo.budget_bytes
    assert shared_reranker.tenants.loaded() == [], "a previous test left tenants behind"
    yield shared_reranker
    zoo.set_budget(budget)
    for tenant in shared_reranker.tenants.loaded():
        shared_reranker.tenants.unload(tenant)


def scores(r: Reranker, tenant: str, query: str = QUERY) -> torch.Tensor:
    handle = r.handle(tenant)
    return torch.tensor(r.score_prompts([r.build_prompt(query, DOCS, handle)], [handle])[0])


def two_forwards_bound(r: Reranker, tenant: str) -> float:
    """How far two fp32 forwards of the same scores may be apart (tests/reranker/numerics.py)."""
    layer = r.handle(tenant).settings.spec.layer
    return scores_bound(layer, longest_inner_product(r.forward.model.config), fp32_sides=2)


def merged_scores(r: Reranker, adapter_dir, handle: TenantHandle, query: str = QUERY) -> torch.Tensor:
    """The same tenant as the naive deployment would serve it: its adapter merged into its own model (on the
    served model's device), scores on the CPU."""
    merged = merge_adapter(copy.deepcopy(r.lm.model), adapter_dir)
    prompt = r.build_prompt(query, DOCS, handle)
    return BlockRankForward(merged).score([prompt], handle.settings.spec)[0].cpu()


def handle_bytes(handle: TenantHandle) -> int:
    return sum(d.nbytes for layer in handle.route.layers if layer for d in layer.values())


def decisions_of(r: Reranker, tenant: str):
    return [d for d in r.tenants.checker.decisions if d.tenant == tenant]


def test_prefix_split_keeps_the_joined_tokenisation(reranker):
    builder = reranker.handle().builder
    template, tokenizer = PromptTemplate(), builder.tokenizer
    bos = [tokenizer.bos_token_id] if tokenizer("x")["input_ids"][0] == tokenizer.bos_token_id else []
    for query in [QUERY, "x", "  two spaces", "5'-nucleotidase metabolizes 6MP.", "Ünïcode — dash"]:
        prompt = builder.build(query, DOCS[:1])
        text = template.prefix.format(instruction=template.instruction, query=builder.query_ids_text(query))
        assert prompt.prefix == bos + tokenizer(text, add_special_tokens=False)["input_ids"]
        assert 0 < prompt.shared_prefix < len(prompt.prefix)


def test_tenant_scores_equal_the_merged_standalone_model(reranker):
    reranker.tenants.load("acme", "scifact")
    served = scores(reranker, "acme")
    hits = reranker.prefix_cache.hits
    cached = scores(reranker, "acme")  # second pass reads the shared-prefix K/V from the cache
    assert reranker.prefix_cache.hits > hits
    standalone = merged_scores(reranker, DEFAULT_ADAPTER, reranker.handle("acme"))
    assert (served - standalone).abs().max() <= two_forwards_bound(reranker, "acme")
    assert (cached - standalone).abs().max() <= two_forwards_bound(reranker, "acme")
    assert (served - scores(reranker, DEFAULT_TENANT)).abs().max() > 1e-3, "the adapter must change the scores"


def test_mixed_tenant_batch_keeps_each_tenant_apart(reranker):
    reranker.tenants.load("acme", "scifact")
    reranker.tenants.load("noisy", "noisy")
    alone = {(t, q): scores(reranker, t, q) for t in ("acme", "noisy", "") for q in (QUERY, OTHER_QUERY)}
    assert (alone[("acme", QUERY)] - alone[("noisy", QUERY)]).abs().max() > 1e-3
    order = [("acme", QUERY), ("noisy", QUERY), ("", OTHER_QUERY), ("acme", OTHER_QUERY), ("noisy", OTHER_QUERY)]
    handles = [reranker.handle(t) for t, _ in order]
    prompts = [reranker.build_prompt(q, DOCS, h) for (_, q), h in zip(order, handles, strict=True)]
    reranker.forward.chunk_tokens = 200  # chunks hold rows of several tenants
    try:
        together = reranker.score_prompts(prompts, handles)
    finally:
        reranker.forward.chunk_tokens = 2048
    for key, got in zip(order, together, strict=True):
        # Rows of several tenants per chunk: other matmul shapes, so other summation orders than alone.
        assert (torch.tensor(got) - alone[key]).abs().max() <= two_forwards_bound(reranker, key[0]), key


def test_identical_uploads_share_their_blocks(reranker):
    zoo = reranker.tenants.zoo
    reranker.tenants.load("acme", "scifact")
    before = zoo.usage().tenant_bytes
    reranker.tenants.load("acme-copy", "scifact")  # same bytes: same content-addressed blocks
    assert zoo.usage().tenant_bytes == before
    assert zoo.tenants["acme-copy"].chain == zoo.tenants["acme"].chain
    assert reranker.tenants.usage("acme-copy").own_blocks == 0


def test_untrained_adapter_collapses_onto_the_base_chain(reranker):
    zoo = reranker.tenants.zoo
    reranker.tenants.load("fresh", "untrained")  # B = 0: every block equals the base block
    decisions = decisions_of(reranker, "fresh")
    assert decisions and all(d.accepted and d.replacement_kind is ReplacementKind.BASE for d in decisions)
    assert zoo.tenants["fresh"].chain == zoo.base_chain
    assert reranker.tenants.usage("fresh").own_bytes == 0
    fresh = reranker.handle("fresh")
    base = reranker.forward.score([reranker.build_prompt(QUERY, DOCS, fresh)], fresh.settings.spec)[0].cpu()
    assert torch.allclose(scores(reranker, "fresh"), base, atol=1e-6)


def test_equivalent_blocks_are_substituted_and_different_ones_are_not(reranker):
    zoo = reranker.tenants.zoo
    reranker.tenants.load("acme", "scifact")
    before = zoo.usage().tenant_bytes
    reranker.tenants.load("twin", "twin")  # within 1e-6 of scifact: equivalent to acme's blocks
    twin = decisions_of(reranker, "twin")
    assert twin and all(d.accepted and d.replacement_kind is ReplacementKind.TENANT for d in twin)
    assert all(d.max_relative_error <= 1e-3 and d.ranking_agreement >= 0.999 and d.max_score_change <= 1e-4
               for d in twin)
    assert zoo.tenants["twin"].chain == zoo.tenants["acme"].chain
    assert zoo.usage().tenant_bytes == before
    reranker.tenants.load("different", "noisy")  # really different: nothing substituted
    assert not [d for d in decisions_of(reranker, "different") if d.accepted]
    assert reranker.tenants.usage("different").own_blocks > 0


def test_tight_budget_evicts_lru_blocks_and_reloads_them(reranker):
    zoo = reranker.tenants.zoo
    reranker.tenants.load("acme", "scifact")
    reranker.tenants.load("noisy", "noisy")
    expected = scores(reranker, "acme")
    one_adapter = reranker.tenants.usage("acme").own_bytes
    zoo.set_budget(one_adapter)
    scores(reranker, "noisy")  # noisy's chain is pinned, acme's blocks are the LRU victims
    assert not reranker.tenants.usage("acme").resident
    assert zoo.usage().tenant_bytes <= one_adapter
    evictions, reloads = zoo.evictions, zoo.reloads
    assert torch.equal(scores(reranker, "acme"), expected)  # read back transparently
    assert zoo.reloads > reloads and zoo.evictions > evictions
    assert reranker.tenants.usage("acme").resident and not reranker.tenants.usage("noisy").resident


def test_unload_frees_blocks_and_in_flight_handles_still_score(reranker):
    reranker.tenants.load("gone", "noisy")
    reranker.tenants.load("stays", "noisy")
    handle = reranker.handle("gone")
    assert reranker.tenants.unload("stays") == 0, "its blocks are still used by tenant 'gone'"
    assert reranker.tenants.unload("gone") == handle_bytes(handle) > 0
    with pytest.raises(UnknownTenant):
        reranker.handle("gone")
    # A request that resolved its handle before the unload still runs.
    prompt = reranker.build_prompt(QUERY, DOCS, handle)
    assert len(reranker.score_prompts([prompt], [handle])[0]) == len(DOCS)


def test_bad_names_and_files_are_refused(reranker, adapters_root):
    for bad in ["../scifact", "/etc", "a/b", "", ".hidden", "x" * 200]:
        with pytest.raises(AdapterInvalid):
            reranker.tenants.load("t", bad)
    with pytest.raises(AdapterNotFound):
        reranker.tenants.load("t", "missing")
    with pytest.raises(AdapterInvalid):
        reranker.tenants.load("", "scifact")
    with pytest.raises(UnknownTenant):
        reranker.tenants.unload("never-loaded")
    broken = adapters_root / "broken"
    broken.mkdir(exist_ok=True)
    (broken / ADAPTER_CONFIG).write_text(json.dumps({"peft_type": "LORA", "r": 8, "use_dora": True}))
    with pytest.raises(AdapterInvalid):
        reranker.tenants.load("t", "broken")
    assert reranker.tenants.loaded() == [], "nothing half-loaded"


def test_mlp_and_attention_deltas_match_the_merged_model(reranker, adapters_root):
    """An adapter on every linear of the layer (MLP included), random non-zero B: the grouped path for
    gate/up/down must equal merging as well."""
    save_all_linear_adapter(reranker.lm.model, adapters_root / "all-linear", reranker.lm.name, layer=5,
                            block_tokens=64)
    reranker.tenants.load("wide", "all-linear")
    handle = reranker.handle("wide")
    assert any("mlp.down_proj" in layer for layer in handle.route.layers if layer)
    served = scores(reranker, "wide")
    assert (served - merged_scores(reranker, adapters_root / "all-linear", handle)).abs().max() <= 1e-4
    # Layer 0's update is within 1e-3 of the base's, but swapping it would move scores by ~1e-3: refused.
    assert not any(d.accepted for d in decisions_of(reranker, "wide"))
