"""RerankerService, AdapterService (and the gateway using them) against real processes on 127.0.0.1."""

import asyncio
import itertools
import json
import shutil
import threading
import time
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from reranker.adapters import DEFAULT_ADAPTER
from reranker.training.derive import derive_adapter
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
from services.server import DEADLINE_SLACK_S
from tests.conftest import Server, fixture_documents
from tests.reranker.numerics import bundled_model_config, longest_inner_product, scores_bound

pytestmark = pytest.mark.integration
ADMIN_TOKEN = "s3cret"
ADMIN = (("authorization", f"Bearer {ADMIN_TOKEN}"),)


@pytest.fixture(scope="module")
def reranker_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reranker")
    root = tmp / "adapters"
    shutil.copytree(DEFAULT_ADAPTER, root / "scifact", ignore=shutil.ignore_patterns("*.png", "*.jsonl", "*.md"))
    derive_adapter(DEFAULT_ADAPTER, root / "noisy", seed=1, noise=0.5)
    # fp32, not the default dtype: a prompt's scores must then agree whatever batch it lands in, within fp32's
    # rounding bound (test_concurrent_requests_are_batched_and_agree). bf16's rounding depends on the batch's
    # forward path, each path held to bf16's own bound by tests/reranker/test_bf16.py. The row ops compiled, as
    # a bf16 reranker on a CPU with AMX serves them (the suite's other services run them eager: conftest.py).
    server = Server("services.reranker", ["--dtype", "fp32", "--cpu-compile", "on", "--block-tokens", "64",
                                          "--max-documents", "10", "--max-document-tokens", "200", "--adapters-root",
                                          str(root), "--admin-token", ADMIN_TOKEN], log_path=tmp / "reranker.log").start()
    assert "CPU row ops compiled" in (tmp / "reranker.log").read_text()
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
    cases: list[tuple[dict[str, Any], grpc.StatusCode]] = [({"query": ""}, invalid), ({"documents": []}, invalid),
                         ({"documents": fixture_documents() * 2}, invalid),  # 16 > --max-documents 10
                         ({"documents": [too_long]}, invalid),  # > --max-document-tokens 200
                         ({"documents": [document_pb2.Document(id="e")]}, invalid),
                         ({"top_n": -1}, invalid),
                         ({"first_stage_scores": [1.0, 2.0]}, invalid),  # not one per document
                         ({"tenant": "nobody"}, grpc.StatusCode.NOT_FOUND)]
    for fields, code in cases:
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
    """Eight concurrent requests: same answers as one at a time, whatever batch they landed in: scores within the
    bound of two fp32 forwards (tests/reranker/numerics.py), the order wherever neighbours lie further apart."""
    queries = ["insulin and blood sugar", "roman emperors", "volcanic lava", "stock prices crash"] * 2
    alone = {q: {r.index: r.score for r in rerank(reranker_server, query=q).results} for q in set(queries)}

    async def burst():
        async with grpc.aio.insecure_channel(reranker_server.target) as ch:
            stub = reranker_pb2_grpc.RerankerServiceStub(ch)
            calls = [stub.Rerank(reranker_pb2.RerankRequest(query=q, documents=fixture_documents()), timeout=120)
                     for q in queries]
            return await asyncio.gather(*calls)

    layer = json.loads((DEFAULT_ADAPTER / "blockrank.json").read_text())["layer"]  # the default tenant's
    tolerance = scores_bound(layer, longest_inner_product(bundled_model_config()), fp32_sides=2)
    for query, reply in zip(queries, asyncio.run(burst()), strict=True):
        expected = alone[query]
        assert {r.index for r in reply.results} == set(expected)
        assert all(abs(r.score - expected[r.index]) <= tolerance for r in reply.results), (query, reply, expected)
        for a, b in itertools.pairwise(sorted(expected, key=lambda i: -expected[i])):
            if expected[a] - expected[b] > 2 * tolerance:  # clearly apart when alone: the same order in a batch
                assert [r.index for r in reply.results].index(a) < [r.index for r in reply.results].index(b)


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
    refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert all(("grpc-retry-pushback-ms", "100") in tuple(o.trailing_metadata() or ()) for o in refused)


def test_gateway_reranks_through_the_reranker(server_factory, fixture_retriever, reranker_server):
    gateway = server_factory("services.gateway", ["--retriever-target", fixture_retriever.target,
                                                  "--reranker-target", reranker_server.target]).start()
    stub = search_pb2_grpc.SearchServiceStub(gateway.channel())
    first = stub.Search(search_pb2.SearchRequest(collection="c", query="insulin", top_k=8), timeout=60)
    # A weight in the request (the server's default model has the shipped default, 0, and would be skipped).
    reranked = stub.Search(search_pb2.SearchRequest(collection="c", query="insulin", top_k=8, rerank_depth=5,
                                                    rerank_weight=0.5), timeout=120)
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
    adapters(reranker_server).LoadAdapter(adapter_pb2.LoadAdapterRequest(tenant="acme", adapter="noisy"), timeout=60,
                                          metadata=ADMIN)
    try:
        tenant = stub.Search(search_pb2.SearchRequest(collection="c", query="insulin", top_k=8, rerank_depth=5,
                                                      tenant="acme"), timeout=120)
        assert tenant.reranked and {h.document.id for h in tenant.results[:5]} == head
        assert [h.rerank_model_score for h in tenant.results[:5]] != [h.rerank_model_score for h in reranked.results[:5]]
    finally:
        adapters(reranker_server).UnloadAdapter(adapter_pb2.UnloadAdapterRequest(tenant="acme"), timeout=60,
                                                metadata=ADMIN)


def test_gateway_deadline_trips_on_the_server(server_factory, fixture_retriever, reranker_server):
    """A deadline that runs out while the reranker is working: the servers give up before the caller's
    own timer fires, so the status carries the servers' reason (the client library's own timeout would
    only say "Deadline Exceeded"), and both keep serving."""
    gateway = server_factory("services.gateway", ["--retriever-target", fixture_retriever.target,
                                                  "--reranker-target", reranker_server.target]).start()
    stub = search_pb2_grpc.SearchServiceStub(gateway.channel())
    request = search_pb2.SearchRequest(collection="c", query="insulin and blood sugar", top_k=8, rerank_depth=8,
                                       rerank_weight=0.5)
    reasons = []
    # The deadline is placed from the previous call's timings; a machine whose speed varies (a cold first
    # call, a busy neighbour) can move a stage past it, so a few attempts are allowed.
    for _ in range(5):
        started = time.perf_counter()
        timed = stub.Search(request, timeout=120)
        elapsed_s = time.perf_counter() - started
        assert timed.reranked
        # A deadline that leaves the reranker half of its last rerank: the whole call's time less half the
        # rerank's, plus the slack the gateway and the reranker each keep before a deadline (DEADLINE_SLACK_S).
        # A fixed margin for the hops instead (0.15 s) outlasts half a rerank on a CPU where it takes ~0.2 s.
        timeout_s = elapsed_s - timed.timings.rerank_ms / 2000 + 2 * DEADLINE_SLACK_S
        try:
            stub.Search(request, timeout=timeout_s)
            reasons.append("finished within the deadline")
            continue
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err
            reasons.append(str(err.details()))
        if reasons[-1].startswith("reranker: deadline exceeded"):
            break
        assert reasons[-1].startswith("retriever: deadline exceeded"), reasons  # the only other server's reason
    assert reasons[-1].startswith("reranker: deadline exceeded"), reasons
    assert stub.Search(request, timeout=120).reranked, "still serving after the deadline"


def test_collection_rerank_weight_reaches_the_reranker(server_factory, fixture_retriever, reranker_server):
    """A collection's fitted reranker weight travels from the retriever through the gateway to the reranker:
    weight 1 serves the reranker's own order, and the reply says which weight ranked it and where it came from
    (weight 0, which skips the reranker: tests/services/test_rerank_path.py)."""
    gateway = server_factory("services.gateway", ["--retriever-target", fixture_retriever.target,
                                                  "--reranker-target", reranker_server.target]).start()
    stub = search_pb2_grpc.SearchServiceStub(gateway.channel())
    settings = retriever_pb2_grpc.RetrieverServiceStub(fixture_retriever.channel())
    settings.UpdateCollection(retriever_pb2.UpdateCollectionRequest(
        collection="c", fusion=retriever_pb2.FusionParams(rerank_weight=1.0)), timeout=30)
    try:
        reranked = stub.Search(search_pb2.SearchRequest(collection="c", query="insulin", top_k=8, rerank_depth=5),
                               timeout=120)
        assert reranked.reranked and reranked.rerank_weight == 1.0
        assert reranked.rerank_weight_source == document_pb2.RERANK_WEIGHT_SOURCE_COLLECTION
        model = [h.rerank_model_score for h in reranked.results[:5]]
        assert model == sorted(model, reverse=True) and len(set(model)) > 1
    finally:
        settings.UpdateCollection(retriever_pb2.UpdateCollectionRequest(
            collection="c", fusion=retriever_pb2.FusionParams()), timeout=30)
    # At weight 0 the model could not move anything: it does not run, and the first stage's order stands.
    first_stage = [float(len(fixture_documents()) - i) for i in range(len(fixture_documents()))]
    kept = rerank(reranker_server, fusion_weight=0.0, first_stage_scores=first_stage)
    assert [r.index for r in kept.results] == list(range(len(first_stage)))
    assert kept.fused and kept.fusion_weight == 0.0 and kept.timings.model_ms == 0
    assert kept.fusion_weight_source == document_pb2.RERANK_WEIGHT_SOURCE_REQUEST
    assert {r.model_score for r in kept.results} == {0.0}
    own = rerank(reranker_server, first_stage_scores=first_stage)  # the default model's weight: 0 as shipped
    assert own.fusion_weight_source == document_pb2.RERANK_WEIGHT_SOURCE_DEFAULT and own.fusion_weight == 0.0
    assert own.timings.model_ms == 0
    with pytest.raises(grpc.RpcError) as info:
        rerank(reranker_server, fusion_weight=1.5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def adapters(server) -> adapter_pb2_grpc.AdapterServiceStub:
    return adapter_pb2_grpc.AdapterServiceStub(server.channel())


def test_adapter_service_guards_and_errors(reranker_server):
    stub = adapters(reranker_server)
    for metadata, code in [((), grpc.StatusCode.UNAUTHENTICATED),
                           ((("authorization", "Bearer wrong"),), grpc.StatusCode.PERMISSION_DENIED)]:
        with pytest.raises(grpc.RpcError) as info:
            stub.ListAdapters(adapter_pb2.ListAdaptersRequest(), timeout=10, metadata=metadata)
        assert info.value.code() == code
    invalid, missing = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
    for tenant, name, code in [("t", "../scifact", invalid), ("t", "/etc", invalid), ("", "scifact", invalid),
                               ("t", "", invalid), ("t", "nope", missing)]:
        with pytest.raises(grpc.RpcError) as info:
            stub.LoadAdapter(adapter_pb2.LoadAdapterRequest(tenant=tenant, adapter=name), timeout=30, metadata=ADMIN)
        assert info.value.code() == code, (tenant, name)
    never = stub.UnloadAdapter(adapter_pb2.UnloadAdapterRequest(tenant="never"), timeout=30, metadata=ADMIN)
    assert not never.was_bound and never.freed_bytes == 0, "unloading is idempotent"
    for request in [adapter_pb2.LoadAdapterRequest(tenant="t", adapter="scifact", fusion_weight=1.5),
                    adapter_pb2.LoadAdapterRequest(tenant="t", adapter="scifact", scoring_layer=99),
                    adapter_pb2.LoadAdapterRequest(tenant="t", adapter="scifact",
                                                   limits=adapter_pb2.TenantLimits(max_queued=0)),
                    adapter_pb2.LoadAdapterRequest(tenant="Not A Name", adapter="scifact")]:
        with pytest.raises(grpc.RpcError) as info:
            stub.LoadAdapter(request, timeout=30, metadata=ADMIN)
        assert info.value.code() == invalid, request
    assert not stub.ListAdapters(adapter_pb2.ListAdaptersRequest(), timeout=10, metadata=ADMIN).bindings, \
        "nothing half-registered"
    listed = stub.ListAdapters(adapter_pb2.ListAdaptersRequest(), timeout=10, metadata=ADMIN)
    assert {"scifact", "noisy"} <= set(listed.available)
    assert listed.memory.base_bytes > 100 << 20
    assert "retrieval.v1.AdapterService" in ProtoReflectionDescriptorDatabase(
        reranker_server.channel()).get_services()


def test_tenants_route_to_their_adapters(reranker_server):
    stub = adapters(reranker_server)
    loaded = {tenant: stub.LoadAdapter(adapter_pb2.LoadAdapterRequest(tenant=tenant, adapter=name), timeout=60,
                                       metadata=ADMIN) for tenant, name in [("acme", "scifact"), ("globex", "noisy")]}
    assert all(reply.adapter.tenant == tenant and reply.load_ms > 0 for tenant, reply in loaded.items())
    # The server's default tenant already serves the shipped adapter: acme's blocks are those same blocks.
    assert loaded["acme"].adapter.own_blocks == 0 and loaded["globex"].adapter.own_blocks > 0
    acme, globex, default = (rerank(reranker_server, tenant=t) for t in ("acme", "globex", ""))
    assert acme.model.endswith("+scifact") and globex.model.endswith("+noisy")
    assert {r.index: r.model_score for r in acme.results} != {r.index: r.model_score for r in globex.results}
    assert default.model != acme.model
    listed = stub.ListAdapters(adapter_pb2.ListAdaptersRequest(), timeout=10, metadata=ADMIN)
    by_tenant = {a.tenant: a for a in listed.adapters}
    assert {"acme", "globex"} <= set(by_tenant)
    assert by_tenant["acme"].shared_bytes >= listed.memory.base_bytes
    assert listed.memory.tenant_bytes < listed.memory.base_bytes / 10, "tenants add small blocks only"
    for tenant in ("acme", "globex"):
        stub.UnloadAdapter(adapter_pb2.UnloadAdapterRequest(tenant=tenant), timeout=30, metadata=ADMIN)
    with pytest.raises(grpc.RpcError) as info:
        rerank(reranker_server, tenant="acme")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_hot_load_and_unload_under_traffic(reranker_server):
    """Steady traffic for a resident tenant and the default keeps succeeding while another tenant is
    loaded and unloaded again and again; the hot tenant serves whenever it is loaded."""
    stub = adapters(reranker_server)
    stub.LoadAdapter(adapter_pb2.LoadAdapterRequest(tenant="steady", adapter="scifact"), timeout=60, metadata=ADMIN)
    stop, failures, served = threading.Event(), [], []

    def traffic(tenant: str) -> None:
        for _ in range(30):  # bounded
            if stop.is_set():
                return
            try:
                served.append(rerank(reranker_server, tenant=tenant, timeout=120).model)
            except grpc.RpcError as err:
                failures.append((tenant, err.code(), err.details()))

    workers = [threading.Thread(target=traffic, args=(t,)) for t in ("steady", "")]
    for w in workers:
        w.start()
    try:
        for _ in range(4):
            stub.LoadAdapter(adapter_pb2.LoadAdapterRequest(tenant="hot", adapter="noisy"), timeout=60,
                             metadata=ADMIN)
            assert rerank(reranker_server, tenant="hot").model.endswith("+noisy")
            stub.UnloadAdapter(adapter_pb2.UnloadAdapterRequest(tenant="hot"), timeout=60, metadata=ADMIN)
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=300)
    assert not failures, failures
    assert len(served) >= 2
    stub.UnloadAdapter(adapter_pb2.UnloadAdapterRequest(tenant="steady"), timeout=60, metadata=ADMIN)
