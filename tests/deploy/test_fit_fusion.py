"""deploy.fit_fusion against real servers: it fits the hybrid weight on a split's judged queries, stores it
with the collection, and refuses a test split."""

import json

import pytest

from deploy import fit_fusion
from services.gen.retrieval.v1 import document_pb2, retriever_pb2, retriever_pb2_grpc
from tests.conftest import FIXTURE_DOCS

pytestmark = pytest.mark.integration

# Queries a keyword index answers (exact words) and queries only embeddings answer (paraphrases).
QUERIES = {"q1": ("kittens purr", "cats"), "q2": ("lava and volcanic ash", "volcano"),
           "q3": ("a pet feline", "cats"), "q4": ("sugar in the blood and the pancreas", "insulin"),
           "q5": ("emperors aqueducts", "rome"), "q6": ("equities sold in a panic", "stocks")}


def beir_dir(root):
    (root / "qrels").mkdir(parents=True)
    (root / "corpus.jsonl").write_text("".join(json.dumps({"_id": i, "title": t, "text": x}) + "\n"
                                               for i, t, x in FIXTURE_DOCS))
    (root / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": text}) + "\n"
                                                for q, (text, _) in QUERIES.items()))
    rows = "".join(f"{q}\t{doc}\t1\n" for q, (_, doc) in QUERIES.items())
    for split in ("train", "test"):
        (root / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + rows)
    return root


def test_fits_and_stores_the_hybrid_weight(server_factory, fixture_retriever, tmp_path):
    gateway = server_factory("services.gateway", ["--retriever-target", fixture_retriever.target]).start()
    data = beir_dir(tmp_path / "beir")
    out = tmp_path / "fit.json"
    common = ["--gateway", gateway.target, "--retriever", fixture_retriever.target, "--data", str(data),
              "--collection", "c", "--rerank-depth", "0"]
    with pytest.raises(SystemExit):
        fit_fusion.main([*common, "--split", "test"])
    stub = retriever_pb2_grpc.RetrieverServiceStub(fixture_retriever.channel())
    try:
        assert fit_fusion.main([*common, "--out", str(out)]) == 0
        result = json.loads(out.read_text())
        assert len(result["hybrid_grid"]) == 21 and result["queries"] == len(QUERIES)
        best = max(result["hybrid_grid"].values())
        assert result["hybrid_grid"][str(result["dense_weight"])] == best
        info = stub.ListCollections(retriever_pb2.ListCollectionsRequest(), timeout=10).collections[0]
        assert info.fusion.dense_weight == pytest.approx(result["dense_weight"])
        assert info.default_mode == document_pb2.RETRIEVAL_MODE_HYBRID
    finally:  # the module's collection goes back to the defaults for the tests after this one
        stub.UpdateCollection(retriever_pb2.UpdateCollectionRequest(collection="c", fusion=retriever_pb2.FusionParams()),
                              timeout=30)
    with pytest.raises(SystemExit, match="no collection"):
        fit_fusion.main([*common[:4], "--data", str(data), "--collection", "missing", "--rerank-depth", "0"])
