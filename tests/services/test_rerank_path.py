"""The reranking path through live services: replicas that die mid-traffic, and which weight ranks a Search
(0 skips the reranker)."""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from services.gen.retrieval.v1 import (
    adapter_pb2,
    adapter_pb2_grpc,
    document_pb2,
    reranker_pb2,
    reranker_pb2_grpc,
    retriever_pb2,
    retriever_pb2_grpc,
    search_pb2,
    search_pb2_grpc,
)
from services.run import RERANK_BY_DEFAULT
from tests.conftest import free_port, ingest_fixture
from tests.services.live_stack import Stack, reranks_answered, stack_fixture  # noqa: F401 - the module's fixture

pytestmark = pytest.mark.integration


def test_gateway_keeps_answering_when_a_reranker_replica_dies(stack: Stack, server_factory) -> None:
    """Two reranker replicas behind one gateway, the default tenant spread over both (--tenant-spread 2): calls go
    to both; one is SIGKILLed mid-traffic and not one Search fails (the call that found it down moves on)."""
    port = free_port()
    replica = server_factory("services.reranker", ["--block-tokens", "64", "--metrics-port", str(port),
                                                   *RERANK_BY_DEFAULT]).start()
    gateway = server_factory("services.gateway", ["--retriever-target", stack.retriever.target, "--reranker-target",
                                                  f"{stack.reranker.target},{replica.target}",
                                                  "--tenant-spread", "2"]).start()
    search = search_pb2_grpc.SearchServiceStub(gateway.channel()).Search
    queries = ["blood sugar", "volcanic ash", "kittens purr", "baking bread", "roman emperors"] * 4

    def one(query: str) -> search_pb2.SearchResponse:
        return search(search_pb2.SearchRequest(collection="c", query=query, top_k=3, rerank_depth=4), timeout=60)

    # A replica in service has answered before: warm this one, or its first (cold) call can outlast the eight calls
    # the warm replica finishes while the least-loaded rule steers around it.
    reranker_pb2_grpc.RerankerServiceStub(replica.channel()).Rerank(reranker_pb2.RerankRequest(
        query="warm", documents=[document_pb2.Document(id="w", text="warm up")]), timeout=120)
    ports = (port, stack.ports["reranker"])
    before = [reranks_answered(p) for p in ports]

    def both_answered() -> bool:
        return all(reranks_answered(p) > b for p, b in zip(ports, before, strict=True))

    with ThreadPoolExecutor(3) as pool:  # three calls in flight at a time: the kill catches some mid-call
        calls = [pool.submit(one, q) for q in queries]
        while sum(c.done() for c in calls) < 8 or not both_answered():
            assert not all(c.done() for c in calls), "spread over both: every call finished before both had answered"
            time.sleep(0.05)
        replica.stop(signal.SIGKILL)
        replies = [c.result() for c in calls]  # raises if any call failed
    assert all(r.reranked for r in replies), [r.rerank_skipped_reason for r in replies]
    from services.client import health_status

    assert health_status(gateway.target) == "SERVING"  # one replica left is enough


def test_a_weight_of_zero_skips_the_reranker_and_every_reply_says_which_weight(stack: Stack) -> None:
    """The weight comes from the request, else the collection's fitted one, else the tenant's adapter or the default
    model; at 0 Search keeps the first stage's order without the reranker's cost and says why."""
    search = search_pb2_grpc.SearchServiceStub(stack.gateway.channel()).Search
    reranker_port = stack.ports["reranker"]

    def one(collection: str = "c", tenant: str = "", rerank_weight: float | None = None) -> search_pb2.SearchResponse:
        return search(search_pb2.SearchRequest(collection=collection, query="blood sugar", top_k=4, rerank_depth=4,
                                               tenant=tenant, rerank_weight=rerank_weight), timeout=60)

    first_stage = [h.document.id for h in search(search_pb2.SearchRequest(
        collection="c", query="blood sugar", top_k=4), timeout=60).results]
    default = one()
    assert default.reranked and default.rerank_weight_source == document_pb2.RERANK_WEIGHT_SOURCE_DEFAULT
    assert 0 < default.rerank_weight <= 1

    calls = reranks_answered(reranker_port)
    asked = one(rerank_weight=0.0)
    assert not asked.reranked and asked.rerank_weight == 0.0
    assert asked.rerank_weight_source == document_pb2.RERANK_WEIGHT_SOURCE_REQUEST
    assert "weight 0 (asked for in the request)" in asked.rerank_skipped_reason
    assert [h.document.id for h in asked.results] == first_stage
    assert asked.timings.rerank_ms == 0 and reranks_answered(reranker_port) == calls, "the reranker is not called"
    explicit = one(rerank_weight=1.0)
    assert explicit.reranked and explicit.rerank_weight == 1.0
    assert explicit.rerank_weight_source == document_pb2.RERANK_WEIGHT_SOURCE_REQUEST

    # A collection whose fitted weight is 0 (deploy.fit_fusion stores 0 when reranking does not help it).
    retriever = retriever_pb2_grpc.RetrieverServiceStub(stack.retriever.channel())
    ingest_fixture(stack.retriever.target, "zero")
    retriever.UpdateCollection(retriever_pb2.UpdateCollectionRequest(
        collection="zero", fusion=retriever_pb2.FusionParams(rerank_weight=0.0)), timeout=30)
    fitted = one("zero")
    assert not fitted.reranked and fitted.rerank_weight_source == document_pb2.RERANK_WEIGHT_SOURCE_COLLECTION
    assert "fitted for the collection" in fitted.rerank_skipped_reason
    assert reranks_answered(reranker_port) == calls + 1, "only the explicit request reached the reranker"
    assert one("zero", rerank_weight=0.5).reranked, "a request may still ask for reranking"

    # A tenant whose adapter is bound at weight 0: the reranker answers once without running the model, then
    # the gateway knows the weight (for --rerank-weight-ttl-s) and does not call at all.
    adapters = adapter_pb2_grpc.AdapterServiceStub(stack.reranker.channel())
    adapters.LoadAdapter(adapter_pb2.LoadAdapterRequest(tenant="nil", adapter="scifact-lora", fusion_weight=0.0),
                         timeout=120)
    calls = reranks_answered(reranker_port)
    learned, known = one(tenant="nil"), one(tenant="nil")
    for reply in (learned, known):
        assert not reply.reranked and reply.rerank_weight == 0.0
        assert reply.rerank_weight_source == document_pb2.RERANK_WEIGHT_SOURCE_ADAPTER
        assert [h.document.id for h in reply.results] == first_stage
    assert "the tenant's adapter" in known.rerank_skipped_reason
    assert reranks_answered(reranker_port) == calls + 1, "learned once, then skipped without a call"
