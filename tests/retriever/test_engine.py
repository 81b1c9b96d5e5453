import numpy as np
import pytest

from common.types import Document
from retriever.engine import RetrieverEngine
from retriever.types import CollectionExists, CollectionNotFound, IndexKind, InvalidArgument
from tests.conftest import FIXTURE_DOCS


def docs() -> list[Document]:
    return [Document(id=i, title=t, text=x) for i, t, x in FIXTURE_DOCS]


def test_embedder_is_normalised_and_matches_plain_fp32(embedder):
    from common.device import Dtype
    from retriever.embedder import Embedder, EmbedderConfig

    texts = [d.embedding_text() for d in docs()]
    fast = embedder.encode(texts)
    assert fast.shape == (len(texts), 384)
    np.testing.assert_allclose(np.linalg.norm(fast, axis=1), 1.0, atol=1e-4)
    reference = Embedder(EmbedderConfig(dtype=Dtype.FP32)).encode(texts)
    assert float((fast * reference).sum(1).min()) > 0.999
    assert embedder.encode([]).shape == (0, 384)


@pytest.mark.parametrize("kind", [IndexKind.FLAT, IndexKind.HNSW])
def test_engine_lifecycle_and_reload(tmp_path, embedder, kind):
    engine = RetrieverEngine(tmp_path, embedder)
    engine.load()
    engine.create_collection("c", kind)
    assert engine.upsert("c", docs()).upserted == len(FIXTURE_DOCS)
    assert engine.search("c", "my kitten chases mice", 1).hits[0].document.id == "cats"

    engine.upsert("c", [Document(id="cats", title="Volcanoes", text="Lava and ash from an erupting volcano.")])
    assert engine.get_stats("c").document_count == len(FIXTURE_DOCS)
    assert engine.search("c", "my kitten chases mice", 1).hits[0].document.id != "cats"

    deleted, missing = engine.delete("c", ["stocks", "nope"])
    assert (deleted, missing) == (["stocks"], ["nope"])
    engine.close()

    reloaded = RetrieverEngine(tmp_path, embedder)
    reloaded.load()
    assert reloaded.get_stats("c").document_count == len(FIXTURE_DOCS) - 1
    assert reloaded.get_stats("c").spec.index is kind
    hits = reloaded.search("c", "equities sold in a panic", 8).hits
    assert "stocks" not in [h.document.id for h in hits]
    assert reloaded.search("c", "Roman emperors and aqueducts", 1).hits[0].document.id == "rome"
    reloaded.upsert("c", [Document(id="new", text="Brand new document about honey bees.")])
    assert reloaded.search("c", "bees making honey", 1).hits[0].document.id == "new"


def test_engine_errors(tmp_path, embedder):
    engine = RetrieverEngine(tmp_path, embedder)
    engine.create_collection("c")
    with pytest.raises(CollectionExists):
        engine.create_collection("c")
    with pytest.raises(CollectionNotFound):
        engine.search("missing", "q", 1)
    with pytest.raises(InvalidArgument):
        engine.create_collection("../escape")
    with pytest.raises(InvalidArgument):
        engine.search("c", "   ", 1)
    for bad_k in (0, 1001):
        with pytest.raises(InvalidArgument):
            engine.search("c", "q", bad_k)
    with pytest.raises(InvalidArgument):
        engine.upsert("c", [Document(id="", text="x")])
    with pytest.raises(InvalidArgument):
        engine.upsert("c", [Document(id="a", text="x"), Document(id="a", text="y")])
    with pytest.raises(InvalidArgument):
        engine.delete("c", [])
    engine.delete_collection("c")
    with pytest.raises(CollectionNotFound):
        engine.delete_collection("c")
    assert not (tmp_path / "c").exists()


def test_search_modes_and_their_scores(tmp_path, embedder):
    from retriever.fusion import FusionSettings, RetrievalMode

    engine = RetrieverEngine(tmp_path, embedder)
    engine.create_collection("c")
    engine.upsert("c", docs())
    assert engine.get_stats("c").spec.default_mode is RetrievalMode.HYBRID
    dense = engine.search("c", "kittens purr", 8, RetrievalMode.DENSE)
    lexical = engine.search("c", "kittens purr", 8, RetrievalMode.LEXICAL)
    hybrid = engine.search("c", "kittens purr", 8)
    assert (dense.mode, lexical.mode, hybrid.mode) == (RetrievalMode.DENSE, RetrievalMode.LEXICAL, RetrievalMode.HYBRID)
    assert all(h.dense_score == h.score and h.lexical_score is None for h in dense.hits)
    assert [h.document.id for h in lexical.hits] == ["cats"], "BM25 matches only documents with a query term"
    assert lexical.hits[0].lexical_score == lexical.hits[0].score > 0
    assert hybrid.hits[0].document.id == "cats"
    top = hybrid.hits[0]
    assert top.dense_score is not None and top.lexical_score is not None and top.score == pytest.approx(1.0)
    assert len(hybrid.hits) == len(FIXTURE_DOCS), "the union of both sides, cut to top_k"
    assert all(h.lexical_score is None for h in hybrid.hits[1:])

    engine.update_collection("c", RetrievalMode.LEXICAL, FusionSettings(dense_weight=0.8, rerank_weight=0.3))
    engine.close()
    reloaded = RetrieverEngine(tmp_path, embedder)
    reloaded.load()
    spec = reloaded.get_stats("c").spec
    assert spec.default_mode is RetrievalMode.LEXICAL and spec.fusion.dense_weight == 0.8
    assert spec.fusion.rerank_weight == 0.3
    assert reloaded.search("c", "kittens purr", 8).mode is RetrievalMode.LEXICAL


def test_empty_documents_are_skipped_and_reported(tmp_path, embedder):
    engine = RetrieverEngine(tmp_path, embedder)
    engine.create_collection("c")
    engine.upsert("c", docs())
    result = engine.upsert("c", [Document(id="blank"), Document(id="cats", title=" ", text=""),
                                 Document(id="honey", text="Bees make honey.")])
    assert result.upserted == 1 and result.skipped == ["blank", "cats"]
    ids = {h.document.id for h in engine.search("c", "kittens purr and chase mice", 20).hits}
    assert "cats" not in ids and "blank" not in ids, "an empty version removes the old one"
    assert engine.get_stats("c").document_count == len(FIXTURE_DOCS)  # -cats +honey


def test_collections_written_before_lexical_indexes_get_one_on_load(tmp_path, embedder):
    import shutil

    engine = RetrieverEngine(tmp_path, embedder)
    engine.create_collection("c")
    engine.upsert("c", docs())
    engine.close()
    shutil.rmtree(tmp_path / "c" / "lexical")
    reloaded = RetrieverEngine(tmp_path, embedder)
    reloaded.load()
    from retriever.fusion import RetrievalMode

    assert reloaded.search("c", "aqueducts", 1, RetrievalMode.LEXICAL).hits[0].document.id == "rome"
