import numpy as np
import pytest

from retriever.index import StringIdIndex
from retriever.types import HnswSettings, IndexKind


def unit_vectors(n: int, dim: int = 32, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.mark.parametrize("kind", [IndexKind.FLAT, IndexKind.HNSW])
def test_upsert_search_replace_delete(kind):
    index = StringIdIndex(32, kind, HnswSettings(m=16, ef_construction=64, ef_search=64))
    vectors = unit_vectors(50)
    ids = [f"d{i}" for i in range(50)]
    index.upsert(ids, vectors)
    assert len(index) == 50
    assert index.search(vectors[7:8], 1)[0][0][0] == "d7"

    # Replacing d7 with d8's vector: a query for d8's vector now finds both, d7 is no longer at the old place.
    index.upsert(["d7"], vectors[8:9])
    assert len(index) == 50
    top2 = {doc for doc, _ in index.search(vectors[8:9], 2)[0]}
    assert top2 == {"d7", "d8"}
    assert "d7" not in [doc for doc, _ in index.search(vectors[7:8], 1)[0]]

    assert index.remove(["d8", "missing"]) == ["d8"]
    assert len(index) == 49
    assert all(doc != "d8" for doc, _ in index.search(vectors[8:9], 49)[0])


def test_hnsw_rebuilds_after_many_tombstones():
    index = StringIdIndex(32, IndexKind.HNSW, HnswSettings(m=16, ef_construction=64, ef_search=64))
    vectors = unit_vectors(100)
    index.upsert([f"d{i}" for i in range(100)], vectors)
    index.remove([f"d{i}" for i in range(30)])
    assert not index.tombstones, "crossing the tombstone fraction rebuilds the graph"
    assert index.faiss_index.ntotal == 70
    assert index.search(vectors[50:51], 1)[0][0][0] == "d50"


def test_search_on_empty_index_returns_nothing():
    index = StringIdIndex(8, IndexKind.FLAT, HnswSettings())
    assert index.search(unit_vectors(2, 8), 5) == [[], []]


@pytest.mark.parametrize("kind", [IndexKind.FLAT, IndexKind.HNSW])
def test_searches_skip_exactly_the_tombstones_across_writes_and_restore(kind, tmp_path):
    import faiss

    index = StringIdIndex(32, kind, HnswSettings(m=16, ef_construction=64, ef_search=256))
    vectors = unit_vectors(300)
    index.upsert([f"d{i}" for i in range(200)], vectors[:200])
    live = {f"d{i}" for i in range(200)}
    rng = np.random.default_rng(1)
    for write in range(6):  # removals and replacements, below the compaction fraction, labels growing past bytes
        gone = [f"d{i}" for i in rng.choice(200, 4, replace=False)]
        held = index._tombstone_bits
        held_then = None if held is None else held.copy()
        index.remove(gone)
        live -= set(gone)
        if held is not None and held_then is not None:
            assert np.array_equal(held, held_then), "a search's selector is never changed under it"
        added = [f"n{write}-{j}" for j in range(3)]
        index.upsert(added, vectors[200 + 3 * write: 203 + 3 * write])
        live |= set(added)
        found = {doc for doc, _ in index.search(vectors[:1], len(live))[0]}
        assert found <= live and (kind is IndexKind.HNSW or found == live)
    assert index.tombstones, "still below the compaction fraction: the bitmap carries them"

    snapshot, state = index.snapshot()
    faiss.write_index(snapshot, str(tmp_path / "index"))
    restored = StringIdIndex(32, kind, HnswSettings(m=16, ef_construction=64, ef_search=256))
    restored.restore(str(tmp_path / "index"), state)
    assert restored.search(vectors[:5], 40) == index.search(vectors[:5], 40)
