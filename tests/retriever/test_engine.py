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
    assert engine.upsert("c", docs()) == len(FIXTURE_DOCS)
    assert engine.search("c", "my kitten chases mice", 1)[0].document.id == "cats"

    engine.upsert("c", [Document(id="cats", title="Volcanoes", text="Lava and ash from an erupting volcano.")])
    assert engine.get_stats("c").document_count == len(FIXTURE_DOCS)
    assert engine.search("c", "my kitten chases mice", 1)[0].document.id != "cats"

    deleted, missing = engine.delete("c", ["stocks", "nope"])
    assert (deleted, missing) == (["stocks"], ["nope"])

    reloaded = RetrieverEngine(tmp_path, embedder)
    reloaded.load()
    assert reloaded.get_stats("c").document_count == len(FIXTURE_DOCS) - 1
    assert reloaded.get_stats("c").spec.index is kind
    hits = reloaded.search("c", "equities sold in a panic", 8)
    assert "stocks" not in [h.document.id for h in hits]
    assert reloaded.search("c", "Roman emperors and aqueducts", 1)[0].document.id == "rome"
    reloaded.upsert("c", [Document(id="new", text="Brand new document about honey bees.")])
    assert reloaded.search("c", "bees making honey", 1)[0].document.id == "new"


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
