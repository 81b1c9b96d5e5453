"""RerankerService (and the gateway using it) against real processes on 127.0.0.1."""

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from services.gen.retrieval.v1 import (
    document_pb2,
    reranker_pb2,
    reranker_pb2_grpc,
    search_pb2,
    search_pb2_grpc,
)
from tests.conftest import Server, fixture_documents

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def reranker_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reranker")
    server = Server("services.reranker", ["--block-tokens", "64", "--max-documents", "10",
                                          "--max-document-tokens", "200"], log_path=tmp / "reranker.log").start()
    yield server
    server.stop()


def rerank(server, timeout: float = 120, **fields) -> reranker_pb2.RerankResponse:
    request = reranker_pb2.RerankRequest(**{"query": "insulin and blood sugar", "documents": fixture_documents(),
                                            **fields})
    return reranker_pb2_grpc.RerankerServiceStub(server.channel()).Rerank(request, timeout=timeout)


def test_rerank_orders_and_limits(reranker_server):
    docs = fixture_documents()
    reply = rerank(reranker_server)
    assert sorted(r.index for r in reply.results) == list(range(len(docs)))
    assert all(r.id == docs[r.index].id for r in reply.results)
    scores = [r.score for r in reply.results]
    assert scores == sorted(scores, reverse=True)
    assert reply.timings.model_ms > 0 and reply.timings.total_ms >= reply.timings.model_ms
    assert ".gguf" in reply.model
    assert not reply.fused, "no first-stage scores were sent, so nothing to fuse"
    assert [r.score for r in reply.results] == [r.model_score for r in reply.results]
    top = rerank(reranker_server, top_n=3)
    assert [r.index for r in top.results] == [r.index for r in reply.results[:3]]

    invalid = grpc.StatusCode.INVALID_ARGUMENT
    too_long = document_pb2.Document(id="long", text="many words " * 400)
    for fields, code in [({"query": ""}, invalid), ({"documents": []}, invalid),
                         ({"documents": fixture_documents() * 2}, invalid),  # 16 > --max-documents 10
                         ({"documents": [too_long]}, invalid),  # > --max-document-tokens 200
                         ({"documents": [document_pb2.Document(id="e")]}, invalid),
                         ({"top_n": -1}, invalid),
                         ({"first_stage_scores": [1.0, 2.0]}, invalid),  # not one per document
                         ({"tenant": "nobody"}, grpc.StatusCode.NOT_FOUND)]:
        with pytest.raises(grpc.RpcError) as info:
            rerank(reranker_server, **fields)
        assert info.value.code() == code, fields
    assert rerank(reranker_server, top_n=1).results, "still serving after bad input"

    health = health_pb2_grpc.HealthStub(reranker_server.channel())
    assert health.Check(health_pb2.HealthCheckRequest(service="retrieval.v1.RerankerService"),
                        timeout=5).status == health_pb2.HealthCheckResponse.SERVING
    assert "retrieval.v1.RerankerService" in ProtoReflectionDescriptorDatabase(
        reranker_server.channel()).get_services()


def test_concurrent_requests_are_batched_and_agree(reranker_server):
    """Eight concurrent requests: same answers as one at a time, whatever batch they landed in."""
    queries = ["insulin and blood sugar", "roman emperors", "volcanic lava", "stock prices crash"] * 2
    alone = {q: [r.index for r in rerank(reranker_server, query=q).results] for q in set(queries)}

    async def burst():
        async with grpc.aio.insecure_channel(reranker_server.target) as ch:
            stub = reranker_pb2_grpc.RerankerServiceStub(ch)
            calls = [stub.Rerank(reranker_pb2.RerankRequest(query=q, documents=fixture_documents()), timeout=120)
                     for q in queries]
            return await asyncio.gather(*calls)

    for query, reply in zip(queries, asyncio.run(burst()), strict=True):
        assert [r.index for r in reply.results] == alone[query]


def test_full_queue_is_resource_exhausted(server_factory):
    server = server_factory("services.reranker", ["--block-tokens", "64", "--max-queue", "1"]).start()

    async def flood():
        async with grpc.aio.insecure_channel(server.target) as ch:
            stub = reranker_pb2_grpc.RerankerServiceStub(ch)
            calls = [stub.Rerank(reranker_pb2.RerankRequest(query=f"q{i}", documents=fixture_documents() * 4),
                                 timeout=300) for i in range(12)]
            return await asyncio.gather(*calls, return_exceptions=True)

    outcomes = asyncio.run(flood())
    codes = [o.code() for o in outcomes if isinstance(o, grpc.RpcError)]
    assert codes and set(codes) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert any(isinstance(o, reranker_pb2.RerankResponse) for o in outcomes)


def test_gateway_reranks_through_the_reranker(server_factory, fixture_retriever, reranker_server):
    gateway = server_factory("services.gateway", ["--retriever-target", fixture_retriever.target,
                                                  "--reranker-target", reranker_server.target]).start()
    stub = search_pb2_grpc.SearchServiceStub(gateway.channel())
    first = stub.Search(search_pb2.SearchRequest(collection="c", query="insulin", top_k=8), timeout=60)
    reranked = stub.Search(search_pb2.SearchRequest(collection="c", query="insulin", top_k=8, rerank_depth=5),
                           timeout=120)
    assert reranked.reranked and reranked.timings.rerank_ms > 0
    head = {h.document.id for h in first.results[:5]}
    assert {h.document.id for h in reranked.results[:5]} == head, "reranking reorders the top-5 only"
    assert [h.document.id for h in reranked.results[5:]] == [h.document.id for h in first.results[5:]]
    rerank_scores = [h.rerank_score for h in reranked.results[:5]]
    assert rerank_scores == sorted(rerank_scores, reverse=True)
    assert all(h.rerank_model_score > 0 for h in reranked.results[:5]), "attention masses are positive"
    with pytest.raises(grpc.RpcError) as info:
        stub.Search(search_pb2.SearchRequest(collection="c", query="q", top_k=3, rerank_depth=3, tenant="nobody"),
                    timeout=60)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
