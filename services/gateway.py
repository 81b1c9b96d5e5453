"""SearchService: first-stage retrieval, then (optionally) BlockRank reranking.

    python -m services.gateway --port 50050 --retriever-target 127.0.0.1:50051 \
        [--reranker-target 127.0.0.1:50052[,127.0.0.1:50053...] | dns:///reranker:50052] [--tenant-spread 1]

Each downstream may be several replicas. The retriever's calls go round-robin over those up (services.downstream);
a tenant's reranks go to its own replicas, by rendezvous hashing of the tenant over the reranker's replicas, and to
the next one when one is down or full (services.affinity). The gateway's health is SERVING only while the
retriever and (unless reranking fails open) a reranker replica serve. The gateway also serves AdapterService for
the whole deployment: loads and unloads go to a replica (each records the binding in the tenant registry every
replica reads), listings gather every replica.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import grpc
from prometheus_client import Histogram

from services.admission import Admission, AdmissionConfig
from services.affinity import REFRESH_S, Replica, ReplicaPool, Resolver
from services.auth import acting_tenant, authenticated, tenant_metadata
from services.config import ServerConfig, option, parse_config
from services.convert import optional
from services.downstream import downstream_error, replica_channel, serving
from services.errors import ServiceError
from services.gen.retrieval.v1 import (
    adapter_pb2,
    adapter_pb2_grpc,
    document_pb2,
    reranker_pb2,
    retriever_pb2,
    retriever_pb2_grpc,
    search_pb2,
    search_pb2_grpc,
)
from services.metrics import LATENCY_BUCKETS
from services.server import (
    Context,
    Hosted,
    ServiceSpec,
    elapsed_ms,
    run_service,
    time_budget,
)
from services.tls import ClientTls
from services.tracing import exemplar

RETRIEVER_SERVICE = retriever_pb2.DESCRIPTOR.services_by_name["RetrieverService"].full_name
LIST_TIMEOUT_S = 3.0  # a replica that has not answered a gateway's ListAdapters by then is listed with an error
STAGE_SECONDS = Histogram("gateway_stage_seconds", "Time of each stage of a Search: retrieve (first stage), "
                          "rerank.", ["stage"], buckets=LATENCY_BUCKETS)


@dataclass(frozen=True)
class GatewayConfig:
    server: ServerConfig = option(factory=lambda: ServerConfig(port=50050))
    retriever_target: str = option("127.0.0.1:50051", "the RetrieverService: HOST:PORT, replicas as a comma-separated "
                                   "list, or a gRPC name (dns:///retriever:50051)")
    reranker_target: str = option("", "the RerankerService, the same forms (empty: no reranking); host names are "
                                  "resolved again every --reranker-refresh-s and each address is a replica")
    tenant_spread: int = option(1, "reranker replicas per tenant: its reranks go to the first K replicas up in the "
                                   "tenant's rendezvous order (1: each replica holds ~1/n of the tenants)")
    reranker_refresh_s: float = option(REFRESH_S, "seconds between resolutions of the reranker target's names")
    rerank_weight_ttl_s: float = option(30.0, "seconds a tenant's own reranker weight (its adapter's or the default "
                                              "model's), as the reranker last reported it, is trusted: while it is "
                                              "0, Search skips the reranker without calling it")
    rerank_fail_open: bool = option(False, "when the reranker fails, serve first-stage results (reranked=false) "
                                           "instead of an error")
    admission: AdmissionConfig = option(factory=AdmissionConfig)
    downstream_ca: str = option("", "PEM CA of the downstreams' certificates: reach them over TLS")
    downstream_cert: str = option("", "PEM client certificate the gateway shows its downstreams (mutual TLS)")
    downstream_key: str = option("", "PEM key of --downstream-cert")
    downstream_server_name: str = option("", "name to check in the downstreams' certificates (default: the "
                                              "target's host)")

    @property
    def downstream_tls(self) -> ClientTls:
        return ClientTls(self.downstream_ca, self.downstream_cert, self.downstream_key, self.downstream_server_name)


@dataclass(frozen=True)
class Caller:
    """How a search names its tenant to the downstreams."""

    metadata: tuple[tuple[str, str], ...]  # the forwarded tenant header (authentication on)
    tenant_field: str  # RerankRequest.tenant (authentication off)
    tenant: str  # the tenant whose reranker serves the search: the key of its replicas


class SearchServicer(search_pb2_grpc.SearchServiceServicer):
    def __init__(self, config: GatewayConfig, resolver: Resolver | None = None) -> None:
        self.config = config
        tls = config.downstream_tls
        self.retriever_channel = replica_channel(config.retriever_target, RETRIEVER_SERVICE, tls)
        self.retriever: retriever_pb2_grpc.RetrieverServiceAsyncStub = \
            retriever_pb2_grpc.RetrieverServiceStub(self.retriever_channel)
        self.rerankers: ReplicaPool | None = None
        if config.reranker_target:
            self.rerankers = ReplicaPool(config.reranker_target, tls, config.tenant_spread, config.reranker_refresh_s,
                                         resolver).start()
        self.admission = Admission(config.admission, "gateway")
        self.learned_weights = LearnedWeights(config.rerank_weight_ttl_s)

    async def downstreams_serving(self) -> bool:
        """The retriever, and the reranker unless reranking fails open, have a replica that serves."""
        if not await serving(self.retriever_channel):
            return False
        return self.rerankers is None or self.config.rerank_fail_open or await self.rerankers.serving()

    async def stop(self) -> None:
        await self.retriever_channel.close()
        if self.rerankers is not None:
            await self.rerankers.stop()

    async def Search(self, request: search_pb2.SearchRequest, context: Context) -> search_pb2.SearchResponse:
        async with self.admission.admit(context):
            return await self._search(request, context)

    async def _search(self, request: search_pb2.SearchRequest, context: Context) -> search_pb2.SearchResponse:
        start = time.perf_counter()
        depth = request.rerank_depth
        # With authentication the caller's tenant travels as a header (the downstreams trust this gateway's
        # certificate for it); without, the request's tenant field picks the reranker's adapter, as before.
        tenant = acting_tenant(request.tenant)
        caller = Caller(tenant_metadata(tenant), "", tenant) if authenticated() else \
            Caller((), request.tenant, request.tenant)
        first_stage = await self._retrieve(request, max(request.top_k, depth), context, caller)
        retrieve_ms = elapsed_ms(start)
        STAGE_SECONDS.labels("retrieve").observe(retrieve_ms / 1000, exemplar())
        hits = [search_pb2.SearchHit(document=r.document, retrieval_score=r.score, dense_score=optional(r, "dense_score"),
                                     lexical_score=optional(r, "lexical_score")) for r in first_stage.results]
        response = search_pb2.SearchResponse(mode=first_stage.mode)
        if depth > 0 and self.rerankers is None:
            response.rerank_skipped_reason = "no reranker configured on this gateway"
        elif depth > 0 and hits:
            weight, source = self._rerank_weight(request, first_stage, caller.tenant)
            if weight == 0.0:
                response.rerank_weight, response.rerank_weight_source = weight, source
                response.rerank_skipped_reason = skipped_at_zero(source)
            else:
                hits = await self._rerank_stage(request, hits, depth, weight, source, context, caller, response)
        response.results.extend(hits[: request.top_k])
        response.timings.retrieve_ms = retrieve_ms
        response.timings.total_ms = elapsed_ms(start)
        return response

    async def _retrieve(self, request: search_pb2.SearchRequest, k: int, context: Context, caller: Caller
                        ) -> retriever_pb2.RetrieveResponse:
        call = retriever_pb2.RetrieveRequest(collection=request.collection, query=request.query, top_k=k,
                                             mode=request.mode)
        try:
            response: retriever_pb2.RetrieveResponse = await self.retriever.Retrieve(call, timeout=time_budget(context),
                                                                                     metadata=caller.metadata)
        except grpc.aio.AioRpcError as err:
            raise downstream_error("retriever", err) from None
        return response

    def _rerank_weight(self, request: search_pb2.SearchRequest, first_stage: retriever_pb2.RetrieveResponse,
                       tenant: str) -> tuple[float | None, document_pb2.RerankWeightSource]:
        """The request's weight, else the collection's fitted one, else the tenant's own as last learned (None:
        not known here; the reranker applies its adapter's or its default model's)."""
        requested, fitted = optional(request, "rerank_weight"), optional(first_stage, "rerank_weight")
        if requested is not None:
            return requested, document_pb2.RERANK_WEIGHT_SOURCE_REQUEST
        if fitted is not None:
            return fitted, document_pb2.RERANK_WEIGHT_SOURCE_COLLECTION
        return self.learned_weights.get(tenant) or (None, document_pb2.RERANK_WEIGHT_SOURCE_UNSPECIFIED)

    async def _rerank_stage(self, request: search_pb2.SearchRequest, hits: list[search_pb2.SearchHit], depth: int,
                            weight: float | None, source: document_pb2.RerankWeightSource, context: Context,
                            caller: Caller, response: search_pb2.SearchResponse) -> list[search_pb2.SearchHit]:
        """The reranked hits, with the weight used, its source and the stage's time recorded in `response`; the
        hits as they were when the reranker fails and reranking fails open."""
        start = time.perf_counter()
        sent = weight if source in SENT_WEIGHTS else None  # a learned weight is the reranker's to apply
        try:
            answer = await self._rerank(request, hits[:depth], sent, context, caller)
        except ServiceError as err:
            if not self.config.rerank_fail_open:
                raise
            response.rerank_skipped_reason = str(err)
        else:
            if sent is None:
                source = answer.fusion_weight_source  # UNSPECIFIED from a reranker that does not say
                if source in LEARNED_WEIGHTS:
                    self.learned_weights.put(caller.tenant, answer.fusion_weight, source)
            if source != document_pb2.RERANK_WEIGHT_SOURCE_UNSPECIFIED:
                response.rerank_weight, response.rerank_weight_source = answer.fusion_weight, source
            if source in LEARNED_WEIGHTS and answer.fused and answer.fusion_weight == 0.0:  # first stage's order kept
                response.rerank_skipped_reason = skipped_at_zero(source)
            else:
                hits = reranked_hits(hits, depth, answer)
                response.reranked = True
        response.timings.rerank_ms = elapsed_ms(start)
        STAGE_SECONDS.labels("rerank").observe(response.timings.rerank_ms / 1000, exemplar())
        return hits

    async def _rerank(self, request: search_pb2.SearchRequest, head: list[search_pb2.SearchHit], weight: float | None,
                      context: Context, caller: Caller) -> reranker_pb2.RerankResponse:
        """The reranker's answer for the head (fused with the first stage by `weight`, else by the reranker's
        own), from the tenant's replicas."""
        assert self.rerankers is not None
        call = reranker_pb2.RerankRequest(query=request.query, documents=[h.document for h in head],
                                          tenant=caller.tenant_field, fusion_weight=weight,
                                          first_stage_scores=[h.retrieval_score for h in head])
        response: reranker_pb2.RerankResponse = await self.rerankers.call(
            caller.tenant, lambda replica, timeout: replica.reranker.Rerank(call, timeout=timeout,
                                                                            metadata=caller.metadata),
            context, "Rerank")
        return response


def reranked_hits(hits: list[search_pb2.SearchHit], depth: int, answer: reranker_pb2.RerankResponse
                  ) -> list[search_pb2.SearchHit]:
    """The head in the reranker's order with its scores, then the candidates beyond the rerank depth in their
    first-stage order."""
    head, tail = hits[:depth], hits[depth:]
    reordered = []
    for ranked in answer.results:
        hit = head[ranked.index]
        hit.rerank_score = ranked.score
        hit.rerank_model_score = ranked.model_score
        reordered.append(hit)
    return reordered + tail


SENT_WEIGHTS = (document_pb2.RERANK_WEIGHT_SOURCE_REQUEST, document_pb2.RERANK_WEIGHT_SOURCE_COLLECTION)
LEARNED_WEIGHTS = (document_pb2.RERANK_WEIGHT_SOURCE_ADAPTER, document_pb2.RERANK_WEIGHT_SOURCE_DEFAULT)
WEIGHT_SOURCE_NAMES = {document_pb2.RERANK_WEIGHT_SOURCE_REQUEST: "asked for in the request",
                       document_pb2.RERANK_WEIGHT_SOURCE_COLLECTION: "fitted for the collection",
                       document_pb2.RERANK_WEIGHT_SOURCE_ADAPTER: "the tenant's adapter",
                       document_pb2.RERANK_WEIGHT_SOURCE_DEFAULT: "the default model's"}


def skipped_at_zero(source: document_pb2.RerankWeightSource) -> str:
    return (f"reranker weight 0 ({WEIGHT_SOURCE_NAMES.get(source, 'unknown')}): the first stage's order stands; "
            "set rerank_weight in the request to rerank anyway")


class LearnedWeights:
    """Each tenant's own reranker weight as the reranker last reported it, trusted for `ttl_s` (an operator's change
    of an adapter or binding reaches the gateway within that). Bounded: past MAX_TENANTS entries it starts over."""

    MAX_TENANTS = 10_000

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._known: dict[str, tuple[float, document_pb2.RerankWeightSource, float]] = {}

    def get(self, tenant: str) -> tuple[float, document_pb2.RerankWeightSource] | None:
        known = self._known.get(tenant)
        if known is None or known[2] < time.monotonic():
            return None
        return known[0], known[1]

    def put(self, tenant: str, weight: float, source: document_pb2.RerankWeightSource) -> None:
        if len(self._known) >= self.MAX_TENANTS and tenant not in self._known:
            self._known.clear()
        self._known[tenant] = (weight, source, time.monotonic() + self.ttl_s)


class AdapterForwarder(adapter_pb2_grpc.AdapterServiceServicer):
    """AdapterService for the whole deployment. A load goes to the tenant's first replica up (it validates the
    adapter, records the binding in the registry every replica reads, and is warm for the tenant's first rerank),
    an unload to any replica up; a listing gathers every replica. The caller's `authorization` travels on: each
    replica checks its admin token or admin key as when called directly."""

    def __init__(self, rerankers: ReplicaPool | None) -> None:
        self.rerankers = rerankers

    def _pool(self) -> ReplicaPool:
        if self.rerankers is None:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, "this gateway has no reranker "
                               "(--reranker-target): there are no adapters to manage")
        return self.rerankers

    async def LoadAdapter(self, request: adapter_pb2.LoadAdapterRequest, context: Context
                          ) -> adapter_pb2.LoadAdapterResponse:
        response: adapter_pb2.LoadAdapterResponse = await self._forward("LoadAdapter", request, context)
        return response

    async def UnloadAdapter(self, request: adapter_pb2.UnloadAdapterRequest, context: Context
                            ) -> adapter_pb2.UnloadAdapterResponse:
        response: adapter_pb2.UnloadAdapterResponse = await self._forward("UnloadAdapter", request, context)
        return response

    async def _forward(self, method: str, request: Any, context: Context) -> Any:
        """A write on the tenant's first replica (the next when it is down or full: both writes are idempotent),
        with the caller's authorization passed on for the replica to check."""
        metadata = _authorization(context)
        return await self._pool().call(
            request.tenant, lambda r, timeout: getattr(r.adapters, method)(request, timeout=timeout, metadata=metadata),
            context, method, spread=1)

    async def ListAdapters(self, request: adapter_pb2.ListAdaptersRequest, context: Context
                           ) -> adapter_pb2.ListAdaptersResponse:
        """The registry and the full listing of the first replica that answered, and every replica's row."""
        pool, metadata = self._pool(), _authorization(context)
        budget = time_budget(context)
        timeout = LIST_TIMEOUT_S if budget is None else min(budget, LIST_TIMEOUT_S)
        answers = await pool.each(lambda r, t: r.adapters.ListAdapters(request, timeout=t, metadata=metadata),
                                  timeout, context)
        listings = [a for _, a in answers if isinstance(a, adapter_pb2.ListAdaptersResponse)]
        if not listings:
            errors = [a for _, a in answers if isinstance(a, grpc.aio.AioRpcError)]
            if not errors:
                raise ServiceError(grpc.StatusCode.UNAVAILABLE, f"reranker: no replica of {pool.target} is known")
            raise downstream_error("reranker", errors[0])
        response = adapter_pb2.ListAdaptersResponse()
        response.CopyFrom(listings[0])
        del response.replicas[:]
        response.replicas.extend(replica_row(replica, answer) for replica, answer in answers)
        return response


def replica_row(replica: Replica, answer: adapter_pb2.ListAdaptersResponse | grpc.aio.AioRpcError
                ) -> adapter_pb2.ReplicaAdapters:
    if isinstance(answer, grpc.aio.AioRpcError):
        return adapter_pb2.ReplicaAdapters(address=replica.address, error=f"{answer.code().name}: {answer.details()}")
    return adapter_pb2.ReplicaAdapters(address=replica.address, resident_tenants=[a.tenant for a in answer.adapters],
                                       tenant_bytes=answer.memory.tenant_bytes)


def _authorization(context: Context) -> tuple[tuple[str, str], ...]:
    """The caller's credential, for the replica to check."""
    return tuple((str(k), str(v)) for k, v in context.invocation_metadata() or () if k == "authorization")


def parse_args(argv: list[str] | None = None) -> GatewayConfig:
    return parse_config(GatewayConfig(), "GATEWAY", argv, __doc__ or "")


def hosted(servicer: SearchServicer) -> Hosted:
    """SearchService, and AdapterService for the whole deployment (admin keys only, with a keys file)."""
    adapters = adapter_pb2.DESCRIPTOR.services_by_name["AdapterService"]
    specs = [ServiceSpec.of(search_pb2, "SearchService", search_pb2_grpc.add_SearchServiceServicer_to_server,
                            servicer),
             ServiceSpec.of(adapter_pb2, "AdapterService", adapter_pb2_grpc.add_AdapterServiceServicer_to_server,
                            AdapterForwarder(servicer.rerankers))]
    return Hosted(specs, on_stop=[servicer.stop], health_probe=servicer.downstreams_serving,
                  admin_methods=[f"/{adapters.full_name}/{m.name}" for m in adapters.methods])


def build(config: GatewayConfig) -> Hosted:
    try:
        servicer = SearchServicer(config)  # aio channels must be made inside the running loop
    except ValueError as exc:  # a reranker target or spread that cannot work
        raise SystemExit(f"gateway: {exc}") from None
    return hosted(servicer)


def main(argv: list[str] | None = None) -> None:
    run_service("gateway", parse_args(argv), build)


if __name__ == "__main__":
    main()
