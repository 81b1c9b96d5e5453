"""What a CUDA graph of the packed forward is bound to (reranker.graphs), checked on CPU: batches that may
replay one graph share a key, batches that may not get another. The capture and replay themselves run on a
GPU (tests/reranker/test_cuda.py)."""

from __future__ import annotations

import pytest

from reranker.engine import Reranker, RerankerConfig
from reranker.graphs import _key
from reranker.packed import pack
from reranker.tenants import EquivalenceMode
from tests.reranker.test_zoo import DOCS, OTHER_QUERY, QUERY

BLOCK = 32


@pytest.fixture(scope="module")
def reranker(tmp_path_factory: pytest.TempPathFactory) -> Reranker:
    from reranker.adapters import DEFAULT_ADAPTER
    from reranker.training.derive import derive_adapter

    root = tmp_path_factory.mktemp("adapters")
    derive_adapter(DEFAULT_ADAPTER, root / "noisy", seed=1, noise=0.5)
    r = Reranker(RerankerConfig(device="cpu", block_tokens=BLOCK, equivalence=EquivalenceMode.OFF,
                                adapters_root=str(root)))
    r.tenants.load("acme", "noisy")
    return r


def key_of(r: Reranker, batch: list[tuple[str, str, list]]) -> object:
    handles = [r.handle(tenant) for tenant, _, _ in batch]
    prompts = [r.build_prompt(query, docs, h) for (_, query, docs), h in zip(batch, handles, strict=True)]
    routes = [h.route for h in handles]
    packed = pack(r.forward, prompts, routes, [BLOCK] * len(prompts))
    layer = handles[0].settings.spec.layer
    return _key(packed, [p.signal_tokens for p in prompts], routes, [(layer,)] * len(prompts), layer)


def test_same_layout_shares_a_key_and_other_layouts_do_not(reranker: Reranker) -> None:
    base = key_of(reranker, [("", QUERY, DOCS)])
    # The same shape with other tokens (the documents reversed: other lengths per row, same width): one graph.
    assert key_of(reranker, [("", QUERY, DOCS[::-1])]) == base
    assert key_of(reranker, [("", QUERY, DOCS)]) == base  # a new Route object for the same chain
    assert key_of(reranker, [("", QUERY, DOCS[:-1])]) != base  # fewer documents
    assert key_of(reranker, [("", OTHER_QUERY, DOCS)]) != base  # another prefix length
    assert key_of(reranker, [("acme", QUERY, DOCS)]) != base  # other deltas, same shape
    assert key_of(reranker, [("", QUERY, DOCS), ("acme", QUERY, DOCS)]) != base  # two prompts


def test_a_reloaded_block_is_a_new_key(reranker: Reranker) -> None:
    before = key_of(reranker, [("acme", QUERY, DOCS)])
    reranker.tenants.unload("acme")
    reranker.tenants.load("acme", "noisy")  # the same adapter read again: new tensors
    assert key_of(reranker, [("acme", QUERY, DOCS)]) != before

