"""Tenant-affine routing over reranker replicas (services.affinity) and AdapterService on the gateway: the order
as pure functions, then a real gateway (SearchServicer and its AdapterService on a grpc.aio server, in this
process) in front of tiny reranker replicas and a tiny retriever, all real gRPC servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from services.affinity import RERANKER_SERVICE, ReplicaPool, parse_targets, rendezvous_order, route
from services.auth import AuthInterceptor
from services.client import main as client_main
from services.errors import ErrorMappingInterceptor, ServiceError
from services.gateway import AdapterForwarder, GatewayConfig, SearchServicer, hosted
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
from services.health import HealthServicer
from services.keys import KeysFile, create
from services.limits import ValidationInterceptor
from tests.conftest import free_port

SERVING = health_pb2.HealthCheckResponse.SERVING
ADDRESSES = [f"10.0.0.{i}:50052" for i in range(1, 5)]
TENANTS = [f"t{i}" for i in range(1000)]


async def until(condition: Callable[[], bool], timeout: float = 10, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"no {what} within {timeout}s"
        await asyncio.sleep(0.05)


# ---- the order ----------------------------------------------------------------------------------------------
def test_the_order_is_stable_even_and_moves_little() -> None:
    three = ADDRESSES[:3]
    # blake2b, not Python's salted hash: the same in every gateway process, run after run.
    assert rendezvous_order("beta", three) == ["10.0.0.3:50052", "10.0.0.1:50052", "10.0.0.2:50052"]
    assert rendezvous_order("beta", list(reversed(three))) == rendezvous_order("beta", three)
    assert rendezvous_order("", three) == ["10.0.0.1:50052", "10.0.0.3:50052", "10.0.0.2:50052"]
    firsts = Counter(rendezvous_order(t, ADDRESSES)[0] for t in TENANTS)
    assert set(firsts) == set(ADDRESSES) and all(200 <= n <= 300 for n in firsts.values()), firsts
    # Adding a replica moves only its share of the tenants.
    before = {t: route(t, ADDRESSES)[0] for t in TENANTS}
    new = "10.0.0.9:50052"
    after = {t: route(t, [*ADDRESSES, new])[0] for t in TENANTS}
    moved = [t for t in TENANTS if before[t] != after[t]]
    assert all(after[t] == new for t in moved), "a tenant moves only to the new replica"
    assert 0.15 <= len(moved) / len(TENANTS) <= 0.25, len(moved)  # ~1/5
    # and removing it puts exactly those back
    assert {t: route(t, ADDRESSES)[0] for t in TENANTS} == before
    # Resident tenants per replica fall with the replicas: 64 tenants, spread 1.
    one = Counter(route(f"tenant-{i}", ADDRESSES[:1])[0] for i in range(64))
    four = Counter(route(f"tenant-{i}", ADDRESSES)[0] for i in range(64))
    assert max(one.values()) == 64 and max(four.values()) <= 64 / 3


def test_spread_and_failover_order() -> None:
    order = rendezvous_order("acme", ADDRESSES)
    assert route("acme", ADDRESSES) == order
    # spread 2: the first two share the calls (in turn when equally loaded, else the less loaded)
    assert {route("acme", ADDRESSES, spread=2, turn=k)[0] for k in range(4)} == set(order[:2])
    assert route("acme", ADDRESSES, spread=2, in_flight={order[0]: 3})[0] == order[1]
    assert route("acme", ADDRESSES, spread=2, turn=1) == [order[1], order[0], *order[2:]]
    # a replica known down is skipped (the next one joins the set) and tried last
    assert route("acme", ADDRESSES, down={order[0]}) == [*order[1:], order[0]]
    assert route("acme", ADDRESSES, down={order[1]}, spread=2, turn=1)[0] == order[2]
    assert route("acme", ADDRESSES, down=set(ADDRESSES)) == order
    assert route("acme", []) == []


def test_target_forms() -> None:
    addresses = [(t.address, t.literal) for t in parse_targets("10.0.0.1:1, [::1]:2,localhost:3,reranker:4")]
    assert addresses == [("10.0.0.1:1", True), ("[::1]:2", True), ("127.0.0.1:3", True), ("reranker:4", False)]
    assert [(t.host, t.port, t.literal) for t in parse_targets("dns:///reranker:50052")] == [("reranker", 50052, False)]
    assert parse_targets("dns://10.0.0.53/reranker:50052")[0].host == "reranker"
    assert [t.address for t in parse_targets("ipv4:10.0.0.1:1,10.0.0.2:2")] == ["10.0.0.1:1", "10.0.0.2:2"]
    for bad in ("", "reranker", "dns:///reranker", "a:b"):
        with pytest.raises(ValueError):
            parse_targets(bad)


# ---- a small deployment on 127.0.0.1 ------------------------------------------------------------------------
class FakeReplica(reranker_pb2_grpc.RerankerServiceServicer, adapter_pb2_grpc.AdapterServiceServicer):
    """A reranker replica: reranks (recording the tenant), lists what it holds, and can be told to refuse."""

    def __init__(self, name: str) -> None:
        self.name, self.token, self.port, self.address = name, "Bearer admin-token", 0, ""
        self.refuse: grpc.StatusCode | None = None
        self.reranked: list[str] = []  # tenant of each rerank it answered
        self.loads: list[tuple[str, str]] = []  # (tenant, authorization) of each LoadAdapter
        self.server: grpc.aio.Server | None = None

    async def start(self) -> FakeReplica:
        self.server = grpc.aio.server()
        reranker_pb2_grpc.add_RerankerServiceServicer_to_server(self, self.server)
        adapter_pb2_grpc.add_AdapterServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port(f"127.0.0.1:{self.port}")
        self.address = f"127.0.0.1:{self.port}"
        await serve_health(self.server, "", RERANKER_SERVICE)
        await self.server.start()
        return self

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(0)
            self.server = None

    async def Rerank(self, request: reranker_pb2.RerankRequest, context: Any) -> reranker_pb2.RerankResponse:
        if self.refuse is not None:
            await context.abort(self.refuse, f"{self.name} says {self.refuse.name}")
        self.reranked.append(request.tenant)
        results = [reranker_pb2.RankedDocument(index=i, id=d.id, score=-i) for i, d in enumerate(request.documents)]
        return reranker_pb2.RerankResponse(results=results, model=self.name)

    async def _check(self, context: Any) -> str:
        header = dict(context.invocation_metadata()).get("authorization", "")
        if header != self.token:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "the admin token does not match")
        return str(header)

    async def LoadAdapter(self, request: Any, context: Any) -> adapter_pb2.LoadAdapterResponse:
        self.loads.append((request.tenant, await self._check(context)))
        binding = adapter_pb2.TenantBinding(tenant=request.tenant, adapter=request.adapter)
        return adapter_pb2.LoadAdapterResponse(binding=binding)

    async def UnloadAdapter(self, request: Any, context: Any) -> adapter_pb2.UnloadAdapterResponse:
        await self._check(context)
        return adapter_pb2.UnloadAdapterResponse(was_bound=True, freed_bytes=7)

    async def ListAdapters(self, request: Any, context: Any) -> adapter_pb2.ListAdaptersResponse:
        await self._check(context)
        held = sorted(set(self.reranked))
        return adapter_pb2.ListAdaptersResponse(
            adapters=[adapter_pb2.AdapterInfo(tenant=t, own_bytes=100) for t in held],
            memory=adapter_pb2.MemoryUsage(tenant_bytes=100 * len(held)),
            bindings=[adapter_pb2.TenantBinding(tenant="acme", adapter="lora-a")])


class FakeRetriever(retriever_pb2_grpc.RetrieverServiceServicer):
    async def Retrieve(self, request: retriever_pb2.RetrieveRequest, context: Any) -> retriever_pb2.RetrieveResponse:
        docs = [document_pb2.Document(id=f"d{i}", text=f"document {i}") for i in range(4)]
        return retriever_pb2.RetrieveResponse(results=[retriever_pb2.ScoredDocument(document=d, score=1 - i / 10)
                                                       for i, d in enumerate(docs)])


async def serve_health(server: grpc.aio.Server, *services: str) -> None:
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    for service in services:
        await health.set(service, SERVING)


class Deployment:
    """A retriever, reranker replicas, and a gateway in front of them; `search` and `adapters` call the gateway."""

    def __init__(self, replicas: int = 3) -> None:
        self.replicas = [FakeReplica(f"r{i}") for i in range(replicas)]
        self.servicer: SearchServicer | None = None

    async def start(self, reranker_target: str | None = None, keys_file: str = "",
                    resolver: Callable[[str, int], Awaitable[list[str]]] | None = None, **config: Any) -> Deployment:
        for replica in (r for r in self.replicas if r.server is None):
            await replica.start()
        self.target = f"127.0.0.1:{free_port()}"  # the gateway's server hosts the (fake) retriever too
        self.servicer = SearchServicer(GatewayConfig(retriever_target=self.target, reranker_target=reranker_target
                                                     or ",".join(r.address for r in self.replicas), **config), resolver)
        spec = hosted(self.servicer)
        auth = [AuthInterceptor(KeysFile(keys_file), spec.admin_methods)] if keys_file else []
        self.server = grpc.aio.server(interceptors=[ErrorMappingInterceptor(), *auth, ValidationInterceptor()])
        for service in spec.services:
            service.register(self.server)
        retriever_pb2_grpc.add_RetrieverServiceServicer_to_server(FakeRetriever(), self.server)  # type: ignore[abstract]
        await serve_health(self.server, "")
        self.server.add_insecure_port(self.target)
        await self.server.start()
        self.channel = grpc.aio.insecure_channel(self.target)
        self.adapters = adapter_pb2_grpc.AdapterServiceStub(self.channel)
        return self

    @property
    def pool(self) -> ReplicaPool:
        assert self.servicer is not None and self.servicer.rerankers is not None
        return self.servicer.rerankers

    async def search(self, tenant: str, timeout: float = 5) -> search_pb2.SearchResponse:
        reply: search_pb2.SearchResponse = await search_pb2_grpc.SearchServiceStub(self.channel).Search(
            search_pb2.SearchRequest(collection="c", query="q", top_k=3, rerank_depth=3, tenant=tenant),
            timeout=timeout)
        assert reply.reranked, reply.rerank_skipped_reason
        return reply

    def order(self, tenant: str) -> list[FakeReplica]:
        """The replicas in the tenant's order (the first takes its reranks while all are up)."""
        by_address = {r.address: r for r in self.replicas}
        return [by_address[a] for a in rendezvous_order(tenant, by_address)]

    def owner(self, tenant: str) -> FakeReplica:
        return self.order(tenant)[0]

    def served(self, tenant: str) -> set[str]:
        return {r.name for r in self.replicas if tenant in r.reranked}

    async def stop(self) -> None:
        await self.channel.close()
        await self.server.stop(0)
        await self.servicer.stop()  # type: ignore[union-attr]
        await asyncio.gather(*(r.stop() for r in self.replicas))


def deployed(body: Callable[[Deployment], Awaitable[None]], deployment: Deployment | None = None,
             **start: Any) -> None:
    async def go(d: Deployment) -> None:
        try:
            await body(await d.start(**start))
        finally:
            await d.stop()

    asyncio.run(asyncio.wait_for(go(deployment or Deployment(3)), 30))


# ---- routing ------------------------------------------------------------------------------------------------
def test_a_tenant_sticks_to_its_replica_and_tenants_spread_over_all() -> None:
    async def body(d: Deployment) -> None:
        tenants = [f"t{i}" for i in range(24)]
        for _ in range(3):
            for tenant in tenants:
                await d.search(tenant)
        for tenant in tenants:
            assert d.served(tenant) == {d.owner(tenant).name}, tenant
        assert all(r.reranked for r in d.replicas), "every replica holds some tenants"
        await d.search("")  # the default reranker: routed the same way, "" as its key
        assert d.served("") == {d.owner("").name}
        serving = d.servicer.downstreams_serving  # type: ignore[union-attr]
        assert await serving()
        for replica in d.replicas[:2]:
            await replica.stop()
        assert await serving(), "one replica serving is enough"
        await d.replicas[2].stop()
        await until(lambda: all(r.healthy is False for r in d.pool.replicas.values()), what="all replicas down")
        assert not await serving()

    deployed(body)


def test_spread_two_shares_a_tenant_between_two_replicas() -> None:
    async def body(d: Deployment) -> None:
        for _ in range(6):
            await d.search("acme")
        assert [r.reranked.count("acme") for r in d.order("acme")] == [3, 3, 0]

    deployed(body, tenant_spread=2)


def test_a_full_or_stopped_replica_hands_the_call_to_the_next() -> None:
    async def body(d: Deployment) -> None:
        order = d.order("acme")
        routes = {"method": "Rerank", "outcome": "failover"}
        failovers = REGISTRY.get_sample_value("gateway_reranker_routes_total", routes) or 0.0
        order[0].refuse = grpc.StatusCode.RESOURCE_EXHAUSTED
        await d.search("acme")
        assert d.served("acme") == {order[1].name}
        assert REGISTRY.get_sample_value("gateway_reranker_routes_total", routes) == failovers + 1
        order[0].refuse = grpc.StatusCode.NOT_FOUND  # not a replica problem: the caller gets it
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await d.search("acme")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND and "reranker: r" in str(info.value.details())
        order[0].refuse = None
        await order[0].stop()  # the next call finds it down, or knows already: either way no failed call
        for _ in range(3):
            await d.search("acme")
        assert order[0].reranked == [] and order[1].reranked == ["acme"] * 4
        await until(lambda: d.pool.replicas[order[0].address].healthy is False, what="health watch seeing it down")
        for replica in order[1:]:
            replica.refuse = grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(grpc.aio.AioRpcError) as info:  # every replica full or down: the caller is told so
            await d.search("acme")
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        for replica in order[1:]:
            replica.refuse = None
        await order[0].start()  # back on its port: the watch sees it and the tenant comes home
        await until(lambda: d.pool.replicas[order[0].address].healthy is True, what="health watch seeing it back")
        await d.search("acme")
        assert order[0].reranked == ["acme"]

    deployed(body)


def test_a_dns_name_is_resolved_again_as_replicas_come_and_go() -> None:
    deployment, answer, asked = Deployment(3), [0], []

    async def resolver(host: str, port: int) -> list[str]:  # replicas by index: their ports come at start
        asked.append((host, port))
        if not answer:
            raise OSError("no such host")  # a failed resolution keeps the replicas known
        return [deployment.replicas[i].address for i in answer]

    async def body(d: Deployment) -> None:
        (a, b, c), pool = d.replicas, d.pool
        await until(lambda: len(pool.replicas) == 1, what="first resolution")
        assert asked[0] == ("reranker", 50052) and list(pool.replicas) == [a.address]
        for i in range(12):
            await d.search(f"t{i}")
        assert a.reranked and not b.reranked
        answer[:] = [0, 1]
        await until(lambda: set(pool.replicas) == {a.address, b.address}, what="b added")
        for i in range(12):
            await d.search(f"t{i}")
        moved = {f"t{i}" for i in range(12)} & set(b.reranked)
        assert moved and all(rendezvous_order(t, [a.address, b.address])[0] == b.address for t in moved)
        answer[:] = []  # the name stops resolving: both stay
        await asyncio.sleep(0.3)
        assert set(pool.replicas) == {a.address, b.address}
        gone, answer[:] = pool.replicas[a.address], [1, 2]
        await until(lambda: set(pool.replicas) == {b.address, c.address}, what="a removed, c added")
        await until(lambda: gone.closed, what="a's channel closing")
        a.reranked.clear()
        for i in range(12):
            await d.search(f"t{i}")
        assert not a.reranked and c.reranked

    deployed(body, deployment, reranker_target="dns:///reranker:50052", resolver=resolver, reranker_refresh_s=0.05)


# ---- AdapterService on the gateway --------------------------------------------------------------------------
def test_gateway_admin_reaches_the_affine_replica_with_the_callers_credential(capsys: Any) -> None:
    token = (("authorization", "Bearer admin-token"),)

    async def body(d: Deployment) -> None:
        load = adapter_pb2.LoadAdapterRequest(tenant="acme", adapter="lora-a")
        reply = await d.adapters.LoadAdapter(load, metadata=token, timeout=5)
        assert reply.binding.tenant == "acme" and reply.binding.adapter == "lora-a"
        assert [r.loads for r in d.replicas if r.loads] == [[("acme", "Bearer admin-token")]]
        assert d.owner("acme").loads, "the load warms the replica the tenant's reranks go to"
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await d.adapters.LoadAdapter(load, metadata=(("authorization", "Bearer wrong"),), timeout=5)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED  # the replica's answer, code kept
        unload = adapter_pb2.UnloadAdapterRequest(tenant="acme")
        assert (await d.adapters.UnloadAdapter(unload, metadata=token, timeout=5)).was_bound
        # Owners follow the ports, so pick four tenants not all on one replica and stop the first one's owner.
        tenants = ["t1", "t2", "t3", next(t for t in (f"t{i}" for i in range(4, 200))
                                          if len({d.owner(n).name for n in ("t1", "t2", "t3", t)}) > 1)]
        await asyncio.gather(*map(d.search, tenants))
        await (dead := d.owner(tenants[0])).stop()
        listing = await d.adapters.ListAdapters(adapter_pb2.ListAdaptersRequest(), metadata=token, timeout=5)
        assert [b.tenant for b in listing.bindings] == ["acme"]
        rows = {row.address: row for row in listing.replicas}
        assert list(rows) == sorted(r.address for r in d.replicas) and "UNAVAILABLE" in rows[dead.address].error
        for replica in (r for r in d.replicas if r is not dead):
            row = rows[replica.address]
            assert not row.error and list(row.resident_tenants) == sorted(set(replica.reranked))
            assert row.tenant_bytes == 100 * len(row.resident_tenants)
        listed = sorted([*(t for row in listing.replicas for t in row.resident_tenants), *dead.reranked])
        assert listed == sorted(tenants), "each tenant on exactly one replica"
        assert await asyncio.to_thread(client_main, ["adapters", "--target", d.target, "--admin-token", "admin-token"]) == 0

    deployed(body)
    out = capsys.readouterr().out  # the command line's table
    assert "registry: 1 tenants bound" in out and "replicas: 3" in out and "error: UNAVAILABLE" in out
    assert "tenants resident" in out and ": t" in out


def test_gateway_admin_needs_an_admin_key_and_a_reranker(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    tenant_key, admin_key = create(path, "acme", admin=False), create(path, "ops", admin=True)

    async def body(d: Deployment) -> None:
        request = adapter_pb2.LoadAdapterRequest(tenant="acme", adapter="lora-a")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await d.adapters.LoadAdapter(request, metadata=(("authorization", f"Bearer {tenant_key}"),), timeout=5)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert not any(r.loads for r in d.replicas), "refused at the gateway"
        for replica in d.replicas:
            replica.token = f"Bearer {admin_key}"  # the replicas share the keys file
        await d.adapters.LoadAdapter(request, metadata=(("authorization", f"Bearer {admin_key}"),), timeout=5)
        assert d.owner("acme").loads == [("acme", f"Bearer {admin_key}")]

    deployed(body, keys_file=str(path))

    with pytest.raises(ServiceError, match="--reranker-target") as info:  # a gateway with no reranker
        asyncio.run(AdapterForwarder(None).ListAdapters(adapter_pb2.ListAdaptersRequest(), None))  # type: ignore[arg-type]
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
