"""Moving a collection between the local backend and Milvus (Milvus Lite) and back: every document, its
vector and the collection's settings arrive; the copy searches like the original."""

from __future__ import annotations

import numpy as np
import pytest

from common.types import Document
from retriever.collection import LocalBackend
from retriever.fusion import FusionSettings, RetrievalMode
from retriever.migrate import main, migrate, parse_backend
from retriever.types import CollectionSpec, IndexKind

pytest.importorskip("milvus_lite", reason="the milvus extra is not installed")
DIM = 16


def test_faiss_to_milvus_and_back(tmp_path, capsys):
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(300, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    documents = [Document(f"doc-{i}", f"title {i}", f"word{i % 17} text number{i}", {"n": str(i)}) for i in range(300)]
    spec = CollectionSpec("docs", DIM, IndexKind.FLAT, default_mode=RetrievalMode.LEXICAL,
                          fusion=FusionSettings(dense_weight=0.3))
    local = LocalBackend(tmp_path / "faiss")
    source = local.create(spec)
    source.upsert(documents, vectors)
    source.delete(["doc-5"])
    expected_dense = source.search_dense(vectors[:5], 10)
    source.close()

    milvus_uri = str(tmp_path / "m.db")
    assert migrate(LocalBackend(tmp_path / "faiss"), parse_backend(f"milvus:{milvus_uri}"), "docs", batch_size=64) == 299
    main(["--collection", "docs", "--source", f"milvus:{milvus_uri}", "--target", f"faiss:{tmp_path / 'back'}"])
    assert "299 documents moved" in capsys.readouterr().out

    [back] = LocalBackend(tmp_path / "back").load_all()
    assert back.spec == spec and back.stats().document_count == 299
    found = back.search_dense(vectors[:5], 10)
    assert [[i for i, _ in row] for row in found] == [[i for i, _ in row] for row in expected_dense]
    assert np.allclose([[s for _, s in row] for row in found], [[s for _, s in row] for row in expected_dense],
                       atol=1e-6), "the vectors travel unchanged"
    assert back.get(["doc-7", "doc-5"]) == [documents[7]]
    assert back.search_lexical("number42", 1)[0][0] == "doc-42"
    back.close()

    with pytest.raises(ValueError, match="already exists"):
        migrate(LocalBackend(tmp_path / "faiss"), parse_backend(f"milvus:{milvus_uri}"), "docs")
    with pytest.raises(ValueError, match="not found"):
        migrate(LocalBackend(tmp_path / "faiss"), LocalBackend(tmp_path / "other"), "nope")
