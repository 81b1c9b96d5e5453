"""First-stage quality through the real SearchService on SciFact test (300 queries)."""

import ir_measures
import pytest
from ir_measures import nDCG

from common.beir import load_qrels, split_queries
from services.client import search
from tests.conftest import SCIFACT, SCIFACT_TIMEOUT_S

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.long]  # all of SciFact ingested


@pytest.mark.timeout(SCIFACT_TIMEOUT_S)
def test_scifact_ndcg_at_10(server_factory, scifact_retriever):
    gateway = server_factory("services.gateway", ["--retriever-target", scifact_retriever.target]).start()
    queries = split_queries(SCIFACT, "test")
    assert len(queries) == 300
    run = {}
    for qid, text in queries.items():
        reply = search(gateway.target, "scifact", text, top_k=10, rerank_depth=0)
        run[qid] = {hit.document.id: hit.retrieval_score for hit in reply.results}
    score = ir_measures.calc_aggregate([nDCG @ 10], load_qrels(SCIFACT, "test"), run)[nDCG @ 10]
    print(f"SciFact test nDCG@10 (first stage) = {score:.4f}")
    assert score >= 0.63
