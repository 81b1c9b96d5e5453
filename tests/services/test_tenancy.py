"""Tenants across reranker replicas, with real processes on 127.0.0.1: two replicas and a gateway share a tenant
registry (a file, or a real etcd); tenants are registered once, through the gateway; a replica killed with
SIGKILL and restarted serves every tenant with the same scores and no admin call; a replica lost under a
mixed-tenant load fails no request; with etcd, the registry itself restarts underneath."""

from __future__ import annotations

import shutil
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from reranker.adapters import DEFAULT_ADAPTER
from reranker.training.derive import derive_adapter
from services.gen.retrieval.v1 import (
    adapter_pb2,
    adapter_pb2_grpc,
    reranker_pb2,
    reranker_pb2_grpc,
    search_pb2,
    search_pb2_grpc,
)
from tests.conftest import Server, fixture_documents, ingest_fixture
from tests.etcd import Etcd, etcd_member

pytestmark = [pytest.mark.integration, pytest.mark.slow]
TENANTS = [f"t{i:02d}" for i in range(16)]
# A replica reloading the same adapter file, asked the same request alone, runs the same forward on the same
# shapes in any dtype: the same scores, but for the last bits.
SCORE_TOLERANCE = 1e-6
QUERY = "insulin and blood sugar"


@dataclass
class Deployment:
    registry: str
    replicas: list[Server]
    gateway: Server
    etcd: Etcd | None = None
    servers: list[Server] = field(default_factory=list)


def derived_adapters(root: Path) -> None:
    """One adapter per tenant, each distinct (seeded noise on the shipped one's LoRA tensors)."""
    for i, tenant in enumerate(TENANTS):
        derive_adapter(DEFAULT_ADAPTER, root / f"{tenant}-lora", seed=i + 1, noise=0.3)


@pytest.fixture(scope="module", params=["file", "etcd"])
def deployment(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    tmp = tmp_path_factory.mktemp(f"tenancy-{request.param}")
    derived_adapters(tmp / "adapters")
    etcd_gen = etcd_member(tmp_path_factory) if request.param == "etcd" else None
    etcd = next(etcd_gen) if etcd_gen is not None else None
    registry = etcd.url("/tenancy/") if etcd is not None else f"file:{tmp / 'tenants.json'}"
    retriever = Server("services.retriever", ["--data-dir", str(tmp / "data")], log_path=tmp / "retriever.log").start()
    ingest_fixture(retriever.target)
    args = ["--block-tokens", "64", "--adapters-root", str(tmp / "adapters"), "--tenants-store", registry,
            "--equivalence", "off"]
    replicas = [Server("services.reranker", args, log_path=tmp / f"reranker-{i}.log").start() for i in range(2)]
    gateway = Server("services.gateway", ["--retriever-target", retriever.target, "--reranker-target",
                                          ",".join(r.target for r in replicas)], log_path=tmp / "gateway.log").start()
    yield Deployment(registry, replicas, gateway, etcd, [gateway, *replicas, retriever])
    for server in (gateway, *replicas, retriever):
        server.stop()
    if etcd_gen is not None:
        next(etcd_gen, None)  # stops etcd


def probe(replica: Server, tenant: str) -> list[float]:
    """The tenant's scores of three fixture documents, straight from one replica."""
    request = reranker_pb2.RerankRequest(query=QUERY, documents=fixture_documents()[:3], tenant=tenant)
    reply = reranker_pb2_grpc.RerankerServiceStub(replica.channel()).Rerank(request, timeout=120)
    return [r.model_score for r in sorted(reply.results, key=lambda r: r.index)]


def register_all(gateway: Server) -> None:
    admin = adapter_pb2_grpc.AdapterServiceStub(gateway.channel())
    for tenant in TENANTS:
        reply = admin.LoadAdapter(adapter_pb2.LoadAdapterRequest(tenant=tenant, adapter=f"{tenant}-lora"), timeout=120)
        assert reply.binding.tenant == tenant and reply.binding.adapter == f"{tenant}-lora"
    # Every replica's view of the registry catches up within a second, and the gateway's channel to a replica that
    # an earlier test restarted reconnects within its reconnect backoff (at most 2 s, +20% jitter): bounded at 6 s.
    for _ in range(60):
        listing = admin.ListAdapters(adapter_pb2.ListAdaptersRequest(), timeout=60)
        if {b.tenant for b in listing.bindings} >= set(TENANTS) and not any(r.error for r in listing.replicas):
            break
        threading.Event().wait(0.1)
    assert {b.tenant for b in listing.bindings} >= set(TENANTS)
    assert len(listing.replicas) == 2 and not any(r.error for r in listing.replicas)


def resident(replica: Server) -> set[str]:
    listing = adapter_pb2_grpc.AdapterServiceStub(replica.channel()).ListAdapters(adapter_pb2.ListAdaptersRequest(),
                                                                                   timeout=60)
    return {a.tenant for a in listing.adapters if a.tenant}


def test_a_killed_replica_serves_every_tenant_again_with_no_admin_call(deployment: Deployment) -> None:
    register_all(deployment.gateway)
    replica = deployment.replicas[1]
    before = {tenant: probe(replica, tenant) for tenant in TENANTS}
    assert len({tuple(round(s, 4) for s in scores) for scores in before.values()}) == len(TENANTS), \
        "each tenant's adapter gives its own scores"
    replica.stop(signal.SIGKILL)
    if deployment.etcd is not None:  # the registry restarts too, while the replica is down
        deployment.etcd.stop()
        deployment.etcd.start()
    replica.start()
    assert resident(replica) == set(), "a restarted replica holds nothing until asked"
    for tenant in TENANTS:
        after = probe(replica, tenant)
        assert max(abs(a - b) for a, b in zip(after, before[tenant], strict=True)) <= SCORE_TOLERANCE, tenant
    assert resident(replica) == set(TENANTS), "each tenant was loaded on its first request"


@pytest.mark.parametrize("deployment", ["file"], indirect=True)  # routing is the gateway's: one registry will do
def test_losing_a_replica_under_mixed_tenant_load_fails_no_request(deployment: Deployment) -> None:
    """Searches of all tenants through the gateway while one replica is killed: the gateway moves the calls of the
    lost replica to the other one, so no request fails; the replica then comes back."""
    register_all(deployment.gateway)  # idempotent
    search = search_pb2_grpc.SearchServiceStub(deployment.gateway.channel()).Search
    errors: list[grpc.StatusCode] = []
    done: list[str] = []

    def load(worker: int) -> None:
        for i in range(8):  # bounded: 8 searches per worker, 3 workers
            tenant = TENANTS[(worker * 5 + i) % len(TENANTS)]
            try:
                reply = search(search_pb2.SearchRequest(collection="c", query=QUERY, top_k=3, rerank_depth=3,
                                                        tenant=tenant), timeout=120)
                assert reply.reranked
                done.append(tenant)
            except grpc.RpcError as err:
                errors.append(err.code())

    workers = [threading.Thread(target=load, args=(w,)) for w in range(3)]
    for worker in workers:
        worker.start()
    for _ in range(1200):  # traffic under way first (bounded: 120 s)
        if len(done) >= 6 or errors:
            break
        threading.Event().wait(0.1)
    lost = deployment.replicas[0]
    lost.stop(signal.SIGKILL)
    for worker in workers:
        worker.join(timeout=600)
    assert not errors, errors
    assert len(done) == 24 and len(set(done)) > 8
    lost.start()
    assert probe(lost, TENANTS[0])


@pytest.mark.parametrize("deployment", ["file"], indirect=True)
def test_unregistered_missing_and_unbound_tenants(deployment: Deployment) -> None:
    register_all(deployment.gateway)
    replica = deployment.replicas[0]
    with pytest.raises(grpc.RpcError) as raised:
        probe(replica, "nobody")
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    admin = adapter_pb2_grpc.AdapterServiceStub(deployment.gateway.channel())
    # A registered adapter that vanishes from disk: that tenant fails with FAILED_PRECONDITION naming it, others serve.
    adapters = Path(deployment.replicas[0].args[deployment.replicas[0].args.index("--adapters-root") + 1])
    shutil.copytree(adapters / "t00-lora", adapters / "doomed-lora")
    admin.LoadAdapter(adapter_pb2.LoadAdapterRequest(tenant="doomed", adapter="doomed-lora"), timeout=120)
    shutil.rmtree(adapters / "doomed-lora")
    other = deployment.replicas[1]
    for server in deployment.replicas:
        if "doomed" in resident(server):  # the replica that validated it holds it: restart so it must reload
            server.stop(signal.SIGKILL)
            server.start()
    with pytest.raises(grpc.RpcError) as raised:
        probe(other, "doomed")
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "doomed-lora" in (raised.value.details() or "")
    assert probe(other, TENANTS[1])
    # Unbinding through the gateway: every replica drops the tenant; idempotent.
    assert admin.UnloadAdapter(adapter_pb2.UnloadAdapterRequest(tenant="doomed"), timeout=60).was_bound
    assert not admin.UnloadAdapter(adapter_pb2.UnloadAdapterRequest(tenant="doomed"), timeout=60).was_bound
    # The other replica hears of it within a second (bounded: 5 s); until then it still answers from the old
    # binding (FAILED_PRECONDITION: the adapter is gone), never anything else.
    for _ in range(50):
        with pytest.raises(grpc.RpcError) as raised:
            probe(other, "doomed")
        if raised.value.code() == grpc.StatusCode.NOT_FOUND:
            break
        assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION, raised.value
        threading.Event().wait(0.1)
    else:
        raise AssertionError("an unbound tenant was still bound on another replica after 5 s")
