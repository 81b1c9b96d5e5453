"""The Milvus backend (retriever.milvus) on Milvus Lite in a temporary file: the StoredCollection and
Backend protocols, ids that need escaping, documents past Milvus's VARCHAR limit, reopening."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("pymilvus", reason="pymilvus is not installed (the Milvus backend's client)")
pytest.importorskip("milvus_lite", reason="milvus-lite is not installed (Milvus in a local file)")

from common.types import Document  # noqa: E402
from retriever.fusion import FusionMethod, FusionSettings, RetrievalMode  # noqa: E402
from retriever.lexical import analyze, query_terms  # noqa: E402
from retriever.milvus import (  # noqa: E402
    VARCHAR_MAX_BYTES,
    MilvusBackend,
    MilvusCollection,
    milvus_name,
    our_name,
    split_utf8,
)
from retriever.types import CollectionExists, CollectionSpec, IndexKind  # noqa: E402

DIM = 16
ODD_IDS = ['quote"d', "back\\slash", "single'quote", 'x" or id != "', '"]) or true or ("', "ünï©ødé 文档 🚀",
           "\\", '"', "tab\tand new\nline", "plain"]


def unit_vectors(n: int, seed: int, dim: int = DIM) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    b = MilvusBackend(str(tmp_path_factory.mktemp("milvus") / "shared.db"))
    yield b
    b.close()


def create(backend: MilvusBackend, name: str, **spec) -> MilvusCollection:
    return backend.create(CollectionSpec(name=name, dimension=DIM, **spec))


def test_names_are_valid_reversible_and_collision_free():
    names = ["a", "0x", "a_b", "a.b", "a-b", "a__b", "a._b", "a_.b", "ab_", "a_u", "a_d", "a___", "a-.-_.",
             "A" + "." * 127, "9" + "_-" * 63 + "_"]
    encoded = [milvus_name(n) for n in names]
    assert len(set(encoded)) == len(names)
    for name, milvus in zip(names, encoded, strict=True):
        assert our_name(milvus) == name
        assert len(milvus) <= 255 and milvus[0].isalpha() and all(c.isalnum() or c == "_" for c in milvus)
    assert milvus_name("my.coll-v1_2") == "rt_my_dcoll_hv1__2"
    assert our_name("other_app") is None and our_name("rt_bad_z") is None and our_name("rt_") is None


def test_split_utf8_keeps_characters_whole():
    text = "aé文🚀" * 30_000
    parts = split_utf8(text)
    assert "".join(parts) == text and len(parts) > 1
    assert all(len(p.encode("utf-8")) <= VARCHAR_MAX_BYTES for p in parts)
    assert split_utf8("") == []


def test_upsert_get_replace_delete_with_odd_ids(backend):
    c = create(backend, "crud.odd-ids")
    docs = [Document(i, f"title {n}", f"text {n}", {"n": str(n), "id": i}) for n, i in enumerate(ODD_IDS)]
    c.upsert(docs, unit_vectors(len(docs), 0))
    assert c.stats().document_count == len(ODD_IDS)
    asked = [*reversed(ODD_IDS), "missing", ODD_IDS[0]]
    assert c.get(asked) == list(reversed(docs)), "order asked, each once, unknown ids left out"

    c.upsert([Document(ODD_IDS[0], "new", "replaced"), Document("plain", "first"), Document("plain", "last")],
             unit_vectors(3, 1))
    assert c.stats().document_count == len(ODD_IDS)
    assert c.get([ODD_IDS[0], "plain"]) == [Document(ODD_IDS[0], "new", "replaced"), Document("plain", "last")]

    gone = [ODD_IDS[3], "missing", ODD_IDS[1], ODD_IDS[3]]
    assert c.delete(gone) == [ODD_IDS[3], ODD_IDS[1]], "those present, each once, in the order given"
    assert c.delete(gone) == []
    assert c.stats().document_count == len(ODD_IDS) - 2
    assert {d.id for d in c.get(ODD_IDS)} == set(ODD_IDS) - {ODD_IDS[1], ODD_IDS[3]}, "no filter injection"


def test_dense_search_is_exact_inner_product(backend):
    c = create(backend, "dense")
    vectors = unit_vectors(400, 2)
    c.upsert([Document(f"d{i}", text=f"doc {i}") for i in range(len(vectors))], vectors)
    queries = unit_vectors(8, 3)
    results = c.search_dense(queries, 10)
    scores = queries @ vectors.T
    for row, ranked in zip(scores, results, strict=True):
        top = np.argsort(-row, kind="stable")[:10]
        assert [doc_id for doc_id, _ in ranked] == [f"d{i}" for i in top]
        np.testing.assert_allclose([s for _, s in ranked], row[top], atol=1e-5)
    assert c.search_dense(queries[:1], 0) == [[]]


def test_hnsw_collection_searches(backend):
    c = create(backend, "hnsw", index=IndexKind.HNSW)
    vectors = unit_vectors(200, 4)
    c.upsert([Document(f"h{i}", text="x") for i in range(len(vectors))], vectors)
    ranked = c.search_dense(vectors[:5], 3)
    assert [r[0][0] for r in ranked] == [f"h{i}" for i in range(5)]
    dense = backend.client.describe_index(c.milvus_name, "dense")
    assert dense["index_type"] == "HNSW" and dense["params"] == {"M": 32, "efConstruction": 200}
    assert backend.client.describe_index(c.milvus_name, "sparse")["params"] == {"bm25_k1": 1.2, "bm25_b": 0.75}


def test_lexical_search_stems_and_ranks(backend):
    c = create(backend, "lexical")
    docs = [Document("runner", "Marathon", "She runs every morning and ran a marathon."),
            Document("cats", "Domestic cats", "Kittens purr and chase mice."),
            Document("bread", "Baking bread", "Yeast ferments the dough before baking.")]
    c.upsert(docs, unit_vectors(3, 5))
    assert c.search_lexical("running", 3)[0][0] == "runner", "running ~ runs"
    hits = c.search_lexical("purring kitten chasing", 3)
    assert hits[0][0] == "cats" and all(score > 0 for _, score in hits)
    assert c.search_lexical("zebra", 3) == [] and c.search_lexical("!!! ???", 3) == []
    assert c.search_lexical('"]) or ("', 3) == []
    assert dict(c.search_lexical("baking kittens runs", 3)) == pytest.approx(bm25(docs, "baking kittens runs"))


def bm25(docs: list[Document], query: str, k1: float = 1.2, b: float = 0.75) -> dict[str, float]:
    """Textbook BM25 (Lucene's idf) over the default backend's terms: what Milvus must compute."""
    terms = {d.id: analyze(d.embedding_text()) for d in docs}
    avgdl = sum(map(len, terms.values())) / len(docs)
    scores: dict[str, float] = {}
    for term in query_terms(query):
        df = sum(term in t for t in terms.values())
        idf = math.log(1 + (len(docs) - df + 0.5) / (df + 0.5))
        for doc_id, t in terms.items():
            if tf := t.count(term):
                norm = tf + k1 * (1 - b + b * len(t) / avgdl)
                scores[doc_id] = scores.get(doc_id, 0.0) + idf * tf * (k1 + 1) / norm
    return scores


def test_long_document_round_trips_exactly(backend):
    c = create(backend, "long")
    text = "Überlänge: " + "naïve café 文字 🚀 words " * 45_000  # ~1.1 MB of UTF-8, past 65,535 bytes
    doc = Document("long", "A very long title " * 100, text, {"size": "big"})
    assert len((doc.title + doc.text).encode("utf-8")) > 16 * VARCHAR_MAX_BYTES and len(doc.title + doc.text) < 1e6
    c.upsert([doc], unit_vectors(1, 6))
    assert c.get(["long"]) == [doc]
    assert c.search_lexical("naive cafe words", 1)[0][0] == "long"


def test_export_round_trip(backend):
    c = create(backend, "export")
    docs = [Document(i, f"t {i}", f"x {i}", {"i": i}) for i in ODD_IDS] + [Document(f"e{i}") for i in range(25)]
    docs = [d if d.title else Document(d.id, text="body") for d in docs]
    vectors = unit_vectors(len(docs), 7)
    c.upsert(docs, vectors)
    batches = list(c.export(7))
    assert all(len(b) <= 7 for b, _ in batches) and len(batches) == -(-len(docs) // 7)
    exported = {d.id: (d, v) for b, vs in batches for d, v in zip(b, vs, strict=True)}
    assert len(exported) == len(docs)
    for doc, vector in zip(docs, vectors, strict=True):
        assert exported[doc.id][0] == doc
        np.testing.assert_allclose(exported[doc.id][1], vector, atol=1e-7)


def test_reopen_finds_collections_specs_and_documents_and_ignores_others(tmp_path):
    path = str(tmp_path / "reopen.db")
    first = MilvusBackend(path)
    c = first.create(CollectionSpec(name="0re.open-me", dimension=DIM, index=IndexKind.HNSW))
    vectors = unit_vectors(len(ODD_IDS), 8)
    c.upsert([Document(i, "Runs", f"body {i}") for i in ODD_IDS], vectors)
    fusion = FusionSettings(method=FusionMethod.RRF, candidate_depth=50)
    c.update_settings(RetrievalMode.LEXICAL, fusion)
    first.client.create_collection("other_app", dimension=4)  # not ours: no prefix, no spec
    first.client.create_collection("rt_unmarked", dimension=4)  # our prefix but no spec
    first.close()

    second = MilvusBackend(path)
    [reopened] = second.load_all()
    assert reopened.spec == CollectionSpec(name="0re.open-me", dimension=DIM, index=IndexKind.HNSW,
                                           default_mode=RetrievalMode.LEXICAL, fusion=fusion)
    assert reopened.stats().document_count == len(ODD_IDS)
    assert [d.id for d in reopened.get(ODD_IDS)] == ODD_IDS
    assert reopened.search_dense(vectors[2:3], 1)[0][0][0] == ODD_IDS[2]
    assert len(reopened.search_lexical("running", 100)) == len(ODD_IDS)
    second.drop(reopened)
    assert second.load_all() == [] and "other_app" in second.client.list_collections()
    second.close()


def test_empty_collection_and_empty_requests(backend):
    c = create(backend, "empty")
    assert c.stats().document_count == 0 and list(c.export(10)) == []
    assert c.search_dense(unit_vectors(2, 9), 5) == [[], []] and c.search_lexical("anything", 5) == []
    assert c.get([]) == [] and c.delete([]) == [] and c.delete(["nope"]) == []
    c.upsert([], np.zeros((0, DIM), np.float32))
    with pytest.raises(CollectionExists):
        create(backend, "empty")
