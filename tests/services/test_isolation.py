"""Tenants as principals, end to end with TLS on: three tenants and an admin with API keys (services.keys), a
retriever and a reranker that accept only the gateway's certificate as a forwarder (and a client certificate for
direct calls), a gateway that authenticates callers and forwards their tenant over mutual TLS.

The isolation matrix: every tenant × every RPC × its own / another tenant's / a nonexistent resource. Another
tenant's resource must answer exactly as a nonexistent one (NOT_FOUND, the same message shape), never its data;
a tenant key on an admin RPC PERMISSION_DENIED; no key, a revoked key or a forged tenant header refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from services import keys
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
from services.tls import ClientTls, channel
from tests.conftest import Server
from tests.services.pki import Authority

pytestmark = pytest.mark.integration
TENANTS = ("acme", "beta", "gamma")
OK, NOT_FOUND, DENIED = grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


@dataclass
class Stack:
    retriever: Server
    reranker: Server
    gateway: Server
    client_tls: ClientTls  # a client certificate for direct calls to the downstreams (not a forwarder)
    front_tls: ClientTls  # the gateway's port: server certificate only
    keys: dict[str, str]  # tenant (or "admin") -> API key
    keys_file: Path

    def retriever_stub(self) -> retriever_pb2_grpc.RetrieverServiceStub:
        return retriever_pb2_grpc.RetrieverServiceStub(channel(self.retriever.target, self.client_tls))

    def reranker_stub(self) -> reranker_pb2_grpc.RerankerServiceStub:
        return reranker_pb2_grpc.RerankerServiceStub(channel(self.reranker.target, self.client_tls))

    def adapters_stub(self) -> adapter_pb2_grpc.AdapterServiceStub:
        return adapter_pb2_grpc.AdapterServiceStub(channel(self.reranker.target, self.client_tls))

    def gateway_stub(self) -> search_pb2_grpc.SearchServiceStub:
        return search_pb2_grpc.SearchServiceStub(channel(self.gateway.target, self.front_tls))


def doc(i: str, text: str) -> document_pb2.Document:
    return document_pb2.Document(id=i, title=text, text=text)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("isolation")
    ca = Authority(tmp / "pki", "service")
    server, gateway_cert, client = (ca.issue("server", server=True), ca.issue("gateway", server=False),
                                    ca.issue("client", server=False))
    keys_file = tmp / "keys.json"
    issued = {t: keys.create(keys_file, t, admin=False) for t in TENANTS}
    issued["admin"] = keys.create(keys_file, "ops", admin=True)
    tls = ["--tls-cert", str(server.cert), "--tls-key", str(server.key)]
    downstream = [*tls, "--tls-client-ca", str(ca.pem), "--keys-file", str(keys_file),
                  "--trusted-forwarders", "gateway"]
    client_tls = ClientTls(str(ca.pem), str(client.cert), str(client.key))
    admin = (("authorization", f"Bearer {issued['admin']}"),)
    started: list[Server] = []
    try:
        retriever = Server("services.retriever", ["--data-dir", str(tmp / "data"), *downstream],
                           log_path=tmp / "retriever.log", tls=client_tls)
        reranker = Server("services.reranker", ["--adapter", "none", *downstream], log_path=tmp / "reranker.log",
                          tls=client_tls)
        for s in (retriever, reranker):
            started.append(s.start(wait=False))
        for s in (retriever, reranker):
            s.wait_serving()
        gateway = Server("services.gateway", [*tls, "--keys-file", str(keys_file), "--downstream-ca", str(ca.pem),
                                              "--downstream-cert", str(gateway_cert.cert), "--downstream-key",
                                              str(gateway_cert.key), "--retriever-target", retriever.target,
                                              "--reranker-target", reranker.target],
                         log_path=tmp / "gateway.log", tls=ClientTls(str(ca.pem)))
        started.append(gateway.start())
        stack = Stack(retriever, reranker, gateway, client_tls, ClientTls(str(ca.pem)), issued, keys_file)
        for tenant in TENANTS:  # every tenant: "docs" (the same name for all) and "<tenant>-only"
            r = stack.retriever_stub()
            for name in ("docs", f"{tenant}-only"):
                r.CreateCollection(retriever_pb2.CreateCollectionRequest(collection=name), metadata=auth(stack, tenant),
                                   timeout=30)
                r.UpsertDocuments(retriever_pb2.UpsertDocumentsRequest(collection=name, documents=[
                    doc(f"{tenant}-1", f"{tenant} kittens purr"), doc(f"{tenant}-2", f"{tenant} volcanoes erupt")]),
                    metadata=auth(stack, tenant), timeout=60)
        stack.adapters_stub().LoadAdapter(adapter_pb2.LoadAdapterRequest(tenant="acme", adapter="scifact-lora"),
                                           metadata=admin, timeout=120)
        yield stack
    finally:
        for s in started:
            s.stop()


def auth(stack: Stack, who: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {stack.keys[who]}"),)


def code(call: Callable[..., object], *args: object) -> grpc.StatusCode:
    """The status code of call(*args)."""
    try:
        call(*args)
    except grpc.RpcError as err:
        return err.code()
    return OK


def other(tenant: str) -> str:
    return TENANTS[(TENANTS.index(tenant) + 1) % len(TENANTS)]


# Per RPC: what a tenant gets on its own resource, on another tenant's, on one that does not exist.
def retriever_calls(stack: Stack, tenant: str) -> dict[str, Callable[[str], object]]:
    r, md = stack.retriever_stub(), auth(stack, tenant)
    return {
        "UpdateCollection": lambda c: r.UpdateCollection(retriever_pb2.UpdateCollectionRequest(collection=c),
                                                         metadata=md, timeout=30),
        "UpsertDocuments": lambda c: r.UpsertDocuments(retriever_pb2.UpsertDocumentsRequest(
            collection=c, documents=[doc(f"{tenant}-3", f"{tenant} lava")]), metadata=md, timeout=60),
        "DeleteDocuments": lambda c: r.DeleteDocuments(retriever_pb2.DeleteDocumentsRequest(
            collection=c, ids=[f"{tenant}-3"]), metadata=md, timeout=30),
        "GetDocuments": lambda c: r.GetDocuments(retriever_pb2.GetDocumentsRequest(collection=c, ids=[f"{tenant}-1"]),
                                                 metadata=md, timeout=30),
        "Retrieve": lambda c: r.Retrieve(retriever_pb2.RetrieveRequest(collection=c, query="kittens", top_k=5),
                                         metadata=md, timeout=30),
        "Search": lambda c: stack.gateway_stub().Search(search_pb2.SearchRequest(
            collection=c, query="kittens", top_k=5, rerank_depth=2), metadata=md, timeout=60),
    }


@pytest.mark.parametrize("tenant", TENANTS)
def test_isolation_matrix(stack: Stack, tenant: str) -> None:
    stranger = other(tenant)
    for rpc, call in retriever_calls(stack, tenant).items():
        assert code(call, f"{tenant}-only") == OK, rpc
        # Another tenant's collection and a nonexistent one: the same code, and the message names only the
        # caller's own words.
        for name in (f"{stranger}-only", "nonexistent"):
            with pytest.raises(grpc.RpcError) as err:
                call(name)
            assert err.value.code() == NOT_FOUND, (rpc, name)
            assert (err.value.details() or "").endswith(f"collection {name!r} not found"), err.value.details()
    # The same name, each tenant its own documents: searching "docs" returns only the caller's.
    r, md = stack.retriever_stub(), auth(stack, tenant)
    hits = r.Retrieve(retriever_pb2.RetrieveRequest(collection="docs", query="kittens purr", top_k=10), metadata=md,
                      timeout=30).results
    assert hits and {h.document.id.split("-")[0] for h in hits} == {tenant}
    # A weight in the request: the server's default model (--adapter none) has weight 0 and would be skipped.
    reply = stack.gateway_stub().Search(search_pb2.SearchRequest(collection="docs", query="kittens", top_k=5,
                                                                  rerank_depth=2, rerank_weight=0.5),
                                        metadata=md, timeout=60)
    assert reply.reranked and {h.document.id.split("-")[0] for h in reply.results} == {tenant}
    listed = r.ListCollections(retriever_pb2.ListCollectionsRequest(), metadata=md, timeout=30).collections
    assert sorted(c.name for c in listed) == sorted(["docs", f"{tenant}-only"])
    # Create and delete in its own namespace; another tenant's name is just a free name here.
    for name in (f"{tenant}-tmp", f"{stranger}-only"):
        r.CreateCollection(retriever_pb2.CreateCollectionRequest(collection=name), metadata=md, timeout=30)
        r.DeleteCollection(retriever_pb2.DeleteCollectionRequest(collection=name), metadata=md, timeout=30)
    for name in (f"{stranger}-tmp-never", "nonexistent"):
        request = retriever_pb2.DeleteCollectionRequest(collection=name)
        assert code(r.DeleteCollection, request, None, md) == NOT_FOUND
    # The stranger's collection survived every call above, with its documents.
    theirs = r.Retrieve(retriever_pb2.RetrieveRequest(collection=f"{stranger}-only", query="kittens", top_k=10),
                        metadata=auth(stack, stranger), timeout=30).results
    assert {h.document.id for h in theirs} == {f"{stranger}-1", f"{stranger}-2"}


@pytest.mark.parametrize("tenant", TENANTS)
def test_reranker_uses_only_the_callers_adapter(stack: Stack, tenant: str) -> None:
    rr, md = stack.reranker_stub(), auth(stack, tenant)
    docs = [doc("a", "Cats purr."), doc("b", "Lava flows.")]

    def rerank(field: str) -> reranker_pb2.RerankResponse:
        return rr.Rerank(reranker_pb2.RerankRequest(query="kittens", documents=docs, tenant=field), metadata=md,
                         timeout=60)

    own = rerank("")
    assert ("scifact-lora" in own.model) == (tenant == "acme")  # acme's adapter; the others the server's default
    assert rerank(tenant).model == own.model
    for field in (other(tenant), "nonexistent"):  # a tenant field is never a way to another tenant's adapter
        assert code(rerank, field) == DENIED
    for call in (lambda: stack.adapters_stub().ListAdapters(adapter_pb2.ListAdaptersRequest(), metadata=md),
                 lambda: stack.adapters_stub().LoadAdapter(adapter_pb2.LoadAdapterRequest(
                     tenant=tenant, adapter="scifact-lora"), metadata=md),
                 lambda: stack.adapters_stub().UnloadAdapter(adapter_pb2.UnloadAdapterRequest(tenant="acme"),
                                                              metadata=md)):
        assert code(call) == DENIED
    assert code(lambda: stack.gateway_stub().Search(search_pb2.SearchRequest(
        collection="docs", query="kittens", top_k=3, tenant=other(tenant)), metadata=md, timeout=30)) == DENIED


def test_credentials_are_checked_on_every_rpc(stack: Stack) -> None:
    r = stack.retriever_stub()
    calls = {
        "retriever": lambda md: r.ListCollections(retriever_pb2.ListCollectionsRequest(), metadata=md, timeout=30),
        "reranker": lambda md: stack.reranker_stub().Rerank(reranker_pb2.RerankRequest(
            query="q", documents=[doc("a", "x")]), metadata=md, timeout=30),
        "adapters": lambda md: stack.adapters_stub().ListAdapters(adapter_pb2.ListAdaptersRequest(), metadata=md,
                                                                   timeout=30),
        "gateway": lambda md: stack.gateway_stub().Search(search_pb2.SearchRequest(
            collection="docs", query="q", top_k=1), metadata=md, timeout=30),
    }
    unknown = "Bearer rk_000000000000_" + "x" * 43
    for name, call in calls.items():
        for metadata in ((), (("authorization", unknown),), (("authorization", "Basic abc"),)):
            assert code(call, metadata) == UNAUTHENTICATED, (name, metadata)
    # A tenant key cannot forge a tenant header; only the gateway's certificate (or an admin key) may send one.
    forged = (*auth(stack, "beta"), ("x-retrieval-tenant", "acme"))
    assert code(lambda: r.ListCollections(retriever_pb2.ListCollectionsRequest(), metadata=forged)) == DENIED
    # Without a key, even a malformed header is answered UNAUTHENTICATED (nothing learnt before authentication).
    assert code(lambda: r.ListCollections(retriever_pb2.ListCollectionsRequest(),
                                          metadata=(("x-retrieval-tenant", "../x"),))) == UNAUTHENTICATED
    bad_header = (*auth(stack, "admin"), ("x-retrieval-tenant", "../x"))
    assert code(lambda: r.ListCollections(retriever_pb2.ListCollectionsRequest(), metadata=bad_header)) == \
        grpc.StatusCode.INVALID_ARGUMENT
    # The admin addresses a tenant explicitly, and manages adapters.
    as_beta = (*auth(stack, "admin"), ("x-retrieval-tenant", "beta"))
    listed = r.ListCollections(retriever_pb2.ListCollectionsRequest(), metadata=as_beta, timeout=30).collections
    assert sorted(c.name for c in listed) == ["beta-only", "docs"]
    assert code(lambda: calls["adapters"](auth(stack, "admin"))) == OK
    # Revoked and rotated keys (the servers re-read the keys file within a second).
    ids = {str(r["tenant"]): str(r["id"]) for r in keys.listing(stack.keys_file)}
    new_key = keys.rotate(stack.keys_file, ids["gamma"], grace_s=0)
    keys.revoke(stack.keys_file, ids["beta"])
    time.sleep(1.5)
    assert code(lambda: calls["retriever"](auth(stack, "gamma"))) == UNAUTHENTICATED  # grace 0: the old key ended
    assert code(lambda: calls["retriever"]((("authorization", f"Bearer {new_key}"),))) == OK
    assert code(lambda: calls["gateway"](auth(stack, "beta"))) == UNAUTHENTICATED
    # The command-line client over TLS with a key from the environment: a tenant gets its own document.
    env = {**os.environ, "RETRIEVAL_API_KEY": new_key, "RETRIEVAL_CA": stack.client_tls.ca,
           "RETRIEVAL_CERT": stack.client_tls.cert, "RETRIEVAL_KEY": stack.client_tls.key}
    cli = subprocess.run([sys.executable, "-m", "services.client", "--json", "get", "--target", stack.retriever.target,
                          "--collection", "docs", "--ids", "gamma-1", "acme-1"], env=env, capture_output=True,
                         text=True, timeout=60, cwd=Path(__file__).resolve().parents[2])
    got = json.loads(cli.stdout)
    assert [d["id"] for d in got["documents"]] == ["gamma-1"] and got["missing_ids"] == ["acme-1"], cli.stderr
    # No key, nor any part of its secret, reaches a log.
    logs = "".join(s.log_path.read_text() for s in (stack.retriever, stack.reranker, stack.gateway) if s.log_path)
    assert "Bearer" not in logs
    for key in [*stack.keys.values(), new_key]:
        assert key.split("_", 2)[2] not in logs
