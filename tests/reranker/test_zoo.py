"""Multi-tenant rerankers as shared blocks (reranker.zoo, reranker.equivalence), real model, fp32."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch

from reranker.blockrank import BlockRankForward
from reranker.engine import DEFAULT_ADAPTER, Reranker, RerankerConfig, merge_adapter
from reranker.errors import AdapterInvalid, AdapterNotFound, UnknownTenant
from reranker.prompt import PromptTemplate
from reranker.synthetic import derive_adapter

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
def reranker(adapters_root):
    r = Reranker(RerankerConfig(adapter="none", equivalence="sync", adapters_root=str(adapters_root)))
    yield r
    r.close()


def scores(r: Reranker, tenant: str, query: str = QUERY) -> torch.Tensor:
    handle = r.handle(tenant)
    return torch.tensor(r.score_prompts([r.build_prompt(query, DOCS, handle)], [handle])[0])


def handle_bytes(handle) -> int:
    return sum(d.nbytes for layer in handle.route.layers if layer for d in layer.values())


def test_prefix_split_keeps_the_joined_tokenisation(reranker):
    builder = reranker.default.builder
    template = PromptTemplate()
    for query in [QUERY, "x", "  two spaces", "5'-nucleotidase metabolizes 6MP.", "Ünïcode — dash"]:
        prompt = builder.build(query, DOCS[:1])
        joined = builder._bos + builder._ids(template.prefix.format(instruction=template.instruction,
                                                                      query=builder.query_ids_text(query)))
        assert prompt.prefix == joined
        assert 0 < prompt.shared_prefix < len(prompt.prefix)


def test_tenant_scores_equal_the_merged_standalone_model(reranker):
    reranker.load_adapter("acme", "scifact")
    served = scores(reranker, "acme")
    cached = scores(reranker, "acme")  # second pass reads the shared-prefix K/V from the cache
    assert reranker.prefix_cache.hits > 0
    handle = reranker.handle("acme")
    merged = merge_adapter(copy.deepcopy(reranker.lm.model), DEFAULT_ADAPTER)
    standalone = BlockRankForward(merged).score([reranker.build_prompt(QUERY, DOCS, handle)], handle.spec)[0]
    assert (served - standalone).abs().max() <= 1e-4
    assert (cached - standalone).abs().max() <= 1e-4
    base = scores(reranker, "")
    assert (served - base).abs().max() > 1e-3, "the adapter must change the scores"


def test_mixed_tenant_batch_keeps_each_tenant_apart(reranker):
    reranker.load_adapter("acme", "scifact")
    reranker.load_adapter("noisy", "noisy")
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
        assert (torch.tensor(got) - alone[key]).abs().max() <= 1e-5, key


def test_identical_and_equivalent_blocks_are_stored_once(reranker):
    reranker.load_adapter("acme", "scifact")
    before = reranker.zoo.usage().tenant_bytes
    reranker.load_adapter("acme-copy", "scifact")  # same bytes: same content-addressed blocks
    assert reranker.zoo.usage().tenant_bytes == before
    assert reranker.zoo.tenants["acme-copy"].chain == reranker.zoo.tenants["acme"].chain
    assert reranker.tenant_usage("acme-copy").own_blocks == 0

    reranker.load_adapter("fresh", "untrained")  # B = 0: every block equals the base block
    decisions = [d for d in reranker.checker.decisions if d.tenant == "fresh"]
    assert decisions and all(d.accepted and d.replacement_kind == "base" for d in decisions)
    assert reranker.zoo.tenants["fresh"].chain == reranker.zoo.base_chain
    assert reranker.tenant_usage("fresh").own_bytes == 0
    fresh = reranker.handle("fresh")
    base = reranker.forward.score([reranker.build_prompt(QUERY, DOCS, fresh)], fresh.spec)[0]
    assert torch.allclose(scores(reranker, "fresh"), base, atol=1e-6)

    reranker.load_adapter("twin", "twin")  # within 1e-6 of scifact: equivalent to acme's blocks
    twin = [d for d in reranker.checker.decisions if d.tenant == "twin"]
    assert twin and all(d.accepted and d.replacement_kind == "tenant" for d in twin)
    assert all(d.max_relative_error <= 1e-3 and d.ranking_agreement >= 0.999 and d.max_score_change <= 1e-4
               for d in twin)
    assert reranker.zoo.tenants["twin"].chain == reranker.zoo.tenants["acme"].chain
    assert reranker.zoo.usage().tenant_bytes == before

    reranker.load_adapter("noisy", "noisy")  # really different: nothing substituted
    assert not [d for d in reranker.checker.decisions if d.tenant == "noisy" and d.accepted]
    for tenant in ("acme-copy", "fresh", "twin"):
        reranker.unload_adapter(tenant)


def test_tight_budget_evicts_lru_blocks_and_reloads_them(reranker):
    zoo = reranker.zoo
    reranker.load_adapter("acme", "scifact")
    reranker.load_adapter("noisy", "noisy")
    expected = scores(reranker, "acme")
    one_adapter = reranker.tenant_usage("acme").own_bytes
    budget = zoo.budget_bytes
    zoo.set_budget(one_adapter)
    try:
        scores(reranker, "noisy")  # noisy's chain is pinned, acme's blocks are the LRU victims
        assert not reranker.tenant_usage("acme").resident
        assert zoo.usage().tenant_bytes <= one_adapter
        evictions, reloads = zoo.evictions, zoo.reloads
        assert torch.equal(scores(reranker, "acme"), expected)  # read back transparently
        assert zoo.reloads > reloads and zoo.evictions > evictions
        assert reranker.tenant_usage("acme").resident and not reranker.tenant_usage("noisy").resident
    finally:
        zoo.set_budget(budget)


def test_unload_frees_blocks_and_unknown_names_are_refused(reranker, adapters_root):
    reranker.load_adapter("gone", "noisy")
    handle = reranker.handle("gone")
    if "noisy" in reranker.zoo.tenants:
        assert reranker.unload_adapter("noisy") == 0, "its blocks are still used by tenant 'gone'"
    freed = reranker.unload_adapter("gone")
    assert freed == handle_bytes(handle) > 0
    with pytest.raises(UnknownTenant):
        reranker.handle("gone")
    # A request that resolved its handle before the unload still runs.
    prompt = reranker.build_prompt(QUERY, DOCS, handle)
    assert len(reranker.score_prompts([prompt], [handle])[0]) == len(DOCS)
    for bad in ["../scifact", "/etc", "a/b", "", ".hidden", "x" * 200]:
        with pytest.raises(AdapterInvalid):
            reranker.load_adapter("t", bad)
    with pytest.raises(AdapterNotFound):
        reranker.load_adapter("t", "missing")
    with pytest.raises(AdapterInvalid):
        reranker.load_adapter("", "scifact")
    with pytest.raises(UnknownTenant):
        reranker.unload_adapter("never-loaded")
    broken = adapters_root / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "use_dora": True}))
    with pytest.raises(AdapterInvalid):
        reranker.load_adapter("t", "broken")


def test_mlp_and_attention_deltas_match_the_merged_model(reranker, adapters_root):
    """An adapter on every linear of the layer (MLP included), random non-zero B: the grouped path for
    gate/up/down must equal merging as well."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(copy.deepcopy(reranker.lm.model), LoraConfig(
        r=4, lora_alpha=8, target_modules=modules, layers_to_transform=list(range(6)), init_lora_weights=False))
    for name, param in peft_model.named_parameters():
        if "lora_" in name:
            param.data.mul_(0.05)
    peft_model.save_pretrained(str(adapters_root / "all-linear"))
    meta = {"layer": 5, "heads": [], "block_tokens": 64, "base_model": reranker.lm.name}
    (adapters_root / "all-linear" / "blockrank.json").write_text(json.dumps(meta))
    reranker.load_adapter("wide", "all-linear")
    handle = reranker.handle("wide")
    assert any("mlp.down_proj" in layer for layer in handle.route.layers if layer)
    served = scores(reranker, "wide")
    merged = merge_adapter(copy.deepcopy(reranker.lm.model), adapters_root / "all-linear")
    standalone = BlockRankForward(merged).score([reranker.build_prompt(QUERY, DOCS, handle)], handle.spec)[0]
    assert (served - standalone).abs().max() <= 1e-4
    # Layer 0's update is within 1e-3 of the base's, but swapping it would move scores by ~1e-3: refused.
    assert not any(d.accepted for d in reranker.checker.decisions if d.tenant == "wide")
    reranker.unload_adapter("wide")
