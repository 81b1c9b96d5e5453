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
