"""Prometheus metrics scraped from live retriever, reranker and gateway processes after real traffic."""

from __future__ import annotations

import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.gen.retrieval.v1 import search_pb2, search_pb2_grpc
from tests.conftest import FIXTURE_DOCS, free_port, ingest_fixture

pytestmark = pytest.mark.integration
SEARCHES = 4
DEPTH = 3


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics page: (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_every_service_exposes_its_metrics_after_traffic(server_factory, tmp_path):
    ports = {name: free_port() for name in ("retriever", "reranker", "gateway")}
    retriever = server_factory("services.retriever", ["--data-dir", str(tmp_path / "data"),
                                                      "--metrics-port", str(ports["retriever"])]).start()
    ingest_fixture(retriever.target)
    reranker = server_factory("services.reranker", ["--block-tokens", "64",
                                                    "--metrics-port", str(ports["reranker"])]).start()
    gateway = server_factory("services.gateway", ["--retriever-target", retriever.target, "--reranker-target",
                                                  reranker.target, "--metrics-port", str(ports["gateway"])]).start()
    search = search_pb2_grpc.SearchServiceStub(gateway.channel()).Search
    for query in ("blood sugar", "volcanic ash", "kittens purr", "baking bread")[:SEARCHES]:
        assert search(search_pb2.SearchRequest(collection="c", query=query, top_k=3, rerank_depth=DEPTH),
                      timeout=120).reranked
    for bad, code in ((search_pb2.SearchRequest(collection="c", query="", top_k=3), "INVALID_ARGUMENT"),
                      (search_pb2.SearchRequest(collection="nope", query="q", top_k=3), "NOT_FOUND")):
        with pytest.raises(grpc.RpcError) as info:
            search(bad, timeout=30)
        assert info.value.code().name == code

    g = scrape(ports["gateway"])
    rpc = {"grpc_service": "retrieval.v1.SearchService", "grpc_method": "Search"}
    assert value(g, "grpc_server_handled_total", **rpc, grpc_code="OK") == SEARCHES
    assert value(g, "grpc_server_handled_total", **rpc, grpc_code="INVALID_ARGUMENT") == 1
    assert value(g, "grpc_server_handled_total", **rpc, grpc_code="NOT_FOUND") == 1
    assert value(g, "grpc_server_started_total", **rpc) == SEARCHES + 2
    assert value(g, "grpc_server_handling_seconds_count", **rpc) == SEARCHES + 2
    assert value(g, "gateway_stage_seconds_count", stage="rerank") == SEARCHES
    assert value(g, "gateway_stage_seconds_count", stage="retrieve") == SEARCHES  # failed ones never got there
    assert value(g, "gateway_stage_seconds_sum", stage="rerank") > 0

    r = scrape(ports["reranker"])
    rerank = {"grpc_service": "retrieval.v1.RerankerService", "grpc_method": "Rerank"}
    assert value(r, "grpc_server_handled_total", **rerank, grpc_code="OK") == SEARCHES
    assert value(r, "reranker_documents_total") == SEARCHES * DEPTH
    assert value(r, "reranker_request_documents_count") == SEARCHES
    assert 1 <= value(r, "reranker_batch_requests_count") <= SEARCHES
    assert value(r, "reranker_batch_requests_sum") == SEARCHES
    assert value(r, "reranker_batch_tokens_sum") > SEARCHES * DEPTH
    assert value(r, "reranker_model_seconds_count") == SEARCHES and value(r, "reranker_model_seconds_sum") > 0
    assert value(r, "reranker_queue_wait_seconds_count") == SEARCHES
    assert value(r, "reranker_queue_depth") == 0
    assert value(r, "reranker_tenants_loaded") >= 1  # the shipped adapter, as the default tenant
    assert value(r, "reranker_tenant_block_bytes") > 0 and value(r, "reranker_base_model_bytes") > 0
    assert value(r, "reranker_prefix_cache_hits_total") + value(r, "reranker_prefix_cache_misses_total") > 0

    q = scrape(ports["retriever"])
    retrieve = {"grpc_service": "retrieval.v1.RetrieverService", "grpc_method": "Retrieve"}
    assert value(q, "grpc_server_handled_total", **retrieve, grpc_code="OK") == SEARCHES
    assert value(q, "grpc_server_handled_total", **retrieve, grpc_code="NOT_FOUND") == 1
    assert value(q, "retriever_collection_documents", collection="c") == len(FIXTURE_DOCS)
    assert value(q, "retriever_embedded_texts_total") >= len(FIXTURE_DOCS) + SEARCHES
    assert value(q, "retriever_embedding_seconds_total") > 0
    # Bounded cardinality: only these labels (RPC, code, stage, collection; the client library's own process
    # and Python metrics' labels; histogram buckets), never a query, a document or a tenant.
    allowed = {"grpc_service", "grpc_method", "grpc_code", "stage", "collection", "le",
               "generation", "implementation", "major", "minor", "patchlevel", "version"}
    assert {name for samples in (g, r, q) for _, labels in samples for name, _ in labels} <= allowed
