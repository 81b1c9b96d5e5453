"""The shared-prefix K/V cache (reranker.routing.SharedPrefixCache): keys, LRU by bytes."""

import torch

from reranker.routing import SharedPrefixCache


def entry(n_floats: int) -> tuple[torch.Tensor, ...]:
    return (torch.zeros(n_floats), torch.zeros(n_floats))  # 8 bytes per float pair


def test_entries_are_found_by_chain_key_and_tokens():
    cache = SharedPrefixCache(max_bytes=1 << 20)
    cache.put(("chain-a", (1, 2, 3)), entry(4))
    assert cache.get(("chain-a", (1, 2, 3))) is not None
    assert cache.get(("chain-b", (1, 2, 3))) is None, "another chain up to this layer: another entry"
    assert cache.get(("chain-a", (1, 2))) is None, "other tokens: another entry"
    assert cache.hits == 1


def test_lru_eviction_by_bytes():
    cache = SharedPrefixCache(max_bytes=3 * 32)  # room for three 32-byte entries
    for name in "abc":
        cache.put((name, ()), entry(4))
    assert cache.nbytes == 96
    assert cache.get(("a", ())) is not None  # a is now the most recently used
    cache.put(("d", ()), entry(4))
    assert cache.get(("b", ())) is None, "b was least recently used"
    assert all(cache.get((k, ())) is not None for k in "acd")
    assert cache.nbytes == 96


def test_putting_a_known_key_changes_nothing_and_one_entry_always_fits():
    cache = SharedPrefixCache(max_bytes=16)
    first = entry(8)
    cache.put(("a", ()), first)
    assert cache.nbytes == 64, "a single entry larger than the budget is kept (the forward needs it)"
    cache.put(("a", ()), entry(100))
    assert cache.get(("a", ())) is first and cache.nbytes == 64
    cache.put(("b", ()), entry(2))
    assert cache.get(("a", ())) is None and cache.nbytes == 16
