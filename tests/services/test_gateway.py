"""SearchService (gateway) against real retriever/gateway processes on 127.0.0.1."""

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from services.gen.retrieval.v1 import search_pb2, search_pb2_grpc
from services.gen.retrieval.v1.document_pb2 import (
    RETRIEVAL_MODE_DENSE,
    RETRIEVAL_MODE_HYBRID,
    RETRIEVAL_MODE_LEXICAL,
)
from tests.conftest import free_port

pytestmark = pytest.mark.integration


def search(server, timeout: float = 60, **fields) -> search_pb2.SearchResponse:
    request = search_pb2.SearchRequest(**{"collection": "c", "top_k": 3, **fields})
    return search_pb2_grpc.SearchServiceStub(server.channel()).Search(request, timeout=timeout)


def search_code(server, **fields) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        search(server, **fields)
    return info.value.code()


def test_first_stage_search_and_errors(server_factory, fixture_retriever):
    gateway = server_factory("services.gateway", ["--retriever-target", fixture_retriever.target]).start()
    reply = search(gateway, query="blood sugar and the pancreas")
    assert reply.results[0].document.id == "insulin"
    assert not reply.reranked and reply.results[0].rerank_score == 0
    assert reply.results[0].retrieval_score >= reply.results[1].retrieval_score
    assert reply.timings.total_ms > 0 and reply.timings.retrieve_ms > 0

    asked = search(gateway, query="blood sugar", rerank_depth=5)
    assert not asked.reranked and "no reranker" in asked.rerank_skipped_reason

    invalid = grpc.StatusCode.INVALID_ARGUMENT
    assert search_code(gateway, query="") == invalid
    assert search_code(gateway, query="q", top_k=0) == invalid
    assert search_code(gateway, query="q", top_k=1001) == invalid
    assert search_code(gateway, query="q", rerank_depth=-1) == invalid
    assert search_code(gateway, query="q", collection="") == invalid
    assert search_code(gateway, query="q", collection="missing") == grpc.StatusCode.NOT_FOUND
    assert search(gateway, query="volcanic ash").results[0].document.id == "volcano"

    health = health_pb2_grpc.HealthStub(gateway.channel())
    assert health.Check(health_pb2.HealthCheckRequest(service="retrieval.v1.SearchService"),
                        timeout=5).status == health_pb2.HealthCheckResponse.SERVING
    assert "retrieval.v1.SearchService" in ProtoReflectionDescriptorDatabase(gateway.channel()).get_services()
    assert gateway.stop() == 0, "SIGTERM shuts down gracefully"


def wait_health(server, status: str, timeout: float = 60) -> None:
    from services.client import health_status

    deadline = time.monotonic() + timeout
    while health_status(server.target) != status:
        assert time.monotonic() < deadline, f"{server.module} not {status} in {timeout}s: {server.log_tail()}"
        time.sleep(0.3)


def test_unavailable_downstreams(server_factory, fixture_retriever):
    # A gateway whose downstreams cannot serve is up, answers, and says NOT_SERVING.
    dead = f"127.0.0.1:{free_port()}"
    no_retriever = server_factory("services.gateway", ["--retriever-target", dead]).start(wait=False)
    wait_health(no_retriever, "NOT_SERVING")
    assert search_code(no_retriever, query="q") == grpc.StatusCode.UNAVAILABLE

    no_reranker = server_factory("services.gateway", ["--retriever-target", fixture_retriever.target,
                                                      "--reranker-target", dead]).start(wait=False)
    wait_health(no_reranker, "NOT_SERVING")
    assert search_code(no_reranker, query="q", rerank_depth=3) == grpc.StatusCode.UNAVAILABLE
    assert not search(no_reranker, query="q").reranked  # depth 0 never touches the reranker

    fail_open = server_factory("services.gateway", ["--retriever-target", fixture_retriever.target,
                                                    "--reranker-target", dead, "--rerank-fail-open"]).start()
    reply = search(fail_open, query="baking a loaf", rerank_depth=3)
    assert not reply.reranked and "reranker" in reply.rerank_skipped_reason
    assert reply.results[0].document.id == "bread"


def test_modes_pass_through_the_gateway_with_each_sides_scores(server_factory, fixture_retriever):
    gateway = server_factory("services.gateway", ["--retriever-target", fixture_retriever.target]).start()
    for mode in (RETRIEVAL_MODE_LEXICAL, RETRIEVAL_MODE_DENSE, RETRIEVAL_MODE_HYBRID):
        assert search(gateway, query="kittens purr", mode=mode).mode == mode
    lexical = search(gateway, query="kittens purr", mode=RETRIEVAL_MODE_LEXICAL, top_k=8)
    assert [h.document.id for h in lexical.results] == ["cats"]
    assert lexical.results[0].HasField("lexical_score") and not lexical.results[0].HasField("dense_score")
    hybrid = search(gateway, query="kittens purr", top_k=8)
    assert hybrid.mode == RETRIEVAL_MODE_HYBRID, "the collection's default"
    top = hybrid.results[0]
    assert top.document.id == "cats" and top.HasField("dense_score") and top.HasField("lexical_score")
    assert all(h.HasField("dense_score") for h in hybrid.results)
