"""SearchService: first-stage retrieval, then (optionally) BlockRank reranking.

    python -m services.gateway --port 50050 --retriever-target 127.0.0.1:50051 \
        [--reranker-target 127.0.0.1:50052[,127.0.0.1:50053...] | dns:///reranker:50052]

Each downstream may be several replicas (services.downstream): calls go round-robin over those up and move
to another when one is down. The gateway's health is SERVING only while its downstreams answer SERVING.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import grpc
from prometheus_client import Histogram

from services.admission import Admission, AdmissionConfig
from services.auth import acting_tenant, authenticated, tenant_metadata
from services.config import ServerConfig, option, parse_config
from services.downstream import replica_channel, serving
from services.errors import ServiceError
from services.gen.retrieval.v1 import (
    reranker_pb2,
    reranker_pb2_grpc,
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
    setup_logging,
    time_budget,
)
from services.tls import ClientTls

RETRIEVER_SERVICE = retriever_pb2.DESCRIPTOR.services_by_name["RetrieverService"].full_name
RERANKER_SERVICE = reranker_pb2.DESCRIPTOR.services_by_name["RerankerService"].full_name
STAGE_SECONDS = Histogram("gateway_stage_seconds", "Time of each stage of a Search: retrieve (first stage), "
                          "rerank.", ["stage"], buckets=LATENCY_BUCKETS)


@dataclass(frozen=True)
class GatewayConfig:
    server: ServerConfig = option(factory=lambda: ServerConfig(port=50050))
    retriever_target: str = option("127.0.0.1:50051", "the RetrieverService: HOST:PORT, replicas as a comma-separated "
                                   "list, or a gRPC name (dns:///retriever:50051)")
    reranker_target: str = option("", "the RerankerService, the same forms (empty: no reranking)")
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


def downstream_error(service: str, err: grpc.aio.AioRpcError) -> ServiceError:
    """Keep the downstream status code, but say which downstream produced it."""
    return ServiceError(err.code(), f"{service}: {err.details()}")


class SearchServicer(search_pb2_grpc.SearchServiceServicer):
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        tls = config.downstream_tls
        self.channels = [replica_channel(config.retriever_target, RETRIEVER_SERVICE, tls)]
        self.retriever: retriever_pb2_grpc.RetrieverServiceAsyncStub = \
            retriever_pb2_grpc.RetrieverServiceStub(self.channels[0])
        self.reranker: reranker_pb2_grpc.RerankerServiceAsyncStub | None = None
        if config.reranker_target:
            self.channels.append(replica_channel(config.reranker_target, RERANKER_SERVICE, tls))
            self.reranker = reranker_pb2_grpc.RerankerServiceStub(self.channels[1])
        self.admission = Admission(config.admission, "gateway")

    async def downstreams_serving(self) -> bool:
        """The retriever, and the reranker unless reranking fails open, have a replica that serves."""
        needed = self.channels if not self.config.rerank_fail_open else self.channels[:1]
        return all([await serving(channel) for channel in needed])

    async def stop(self) -> None:
        for channel in self.channels:
            await channel.close()

    async def Search(self, request: search_pb2.SearchRequest, context: Context) -> search_pb2.SearchResponse:
        async with self.admission.admit(context):
            return await self._search(request, context)

    async def _search(self, request: search_pb2.SearchRequest, context: Context) -> search_pb2.SearchResponse:
        start = time.perf_counter()
        depth = request.rerank_depth
        # With authentication the caller's tenant travels as a header (the downstreams trust this gateway's
        # certificate for it); without, the request's tenant field picks the reranker's adapter, as before.
        tenant = acting_tenant(request.tenant)
        caller = Caller(tenant_metadata(tenant), "") if authenticated() else Caller((), request.tenant)
        first_stage = await self._retrieve(request, max(request.top_k, depth), context, caller)
        retrieve_ms = elapsed_ms(start)
        STAGE_SECONDS.labels("retrieve").observe(retrieve_ms / 1000)
        hits = [search_pb2.SearchHit(document=r.document, retrieval_score=r.score, dense_score=_opt(r, "dense_score"),
                                     lexical_score=_opt(r, "lexical_score")) for r in first_stage.results]
        response = search_pb2.SearchResponse(mode=first_stage.mode)
        if depth > 0 and self.reranker is None:
            response.rerank_skipped_reason = "no reranker configured on this gateway"
        elif depth > 0 and hits:
            rerank_start = time.perf_counter()
            weight = first_stage.rerank_weight if first_stage.HasField("rerank_weight") else None
            try:
                hits = await self._rerank(request, hits, depth, weight, context, caller)
                response.reranked = True
            except ServiceError as err:
                if not self.config.rerank_fail_open:
                    raise
                response.rerank_skipped_reason = str(err)
            response.timings.rerank_ms = elapsed_ms(rerank_start)
            STAGE_SECONDS.labels("rerank").observe(response.timings.rerank_ms / 1000)
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

    async def _rerank(self, request: search_pb2.SearchRequest, hits: list[search_pb2.SearchHit], depth: int,
                      weight: float | None, context: Context, caller: Caller) -> list[search_pb2.SearchHit]:
        """The head reranked (fused with the first stage by the collection's fitted weight when it has one,
        else by the reranker's own), then the rest in first-stage order."""
        assert self.reranker is not None
        head, tail = hits[:depth], hits[depth:]
        call = reranker_pb2.RerankRequest(query=request.query, documents=[h.document for h in head],
                                          tenant=caller.tenant_field, fusion_weight=weight,
                                          first_stage_scores=[h.retrieval_score for h in head])
        try:
            response = await self.reranker.Rerank(call, timeout=time_budget(context), metadata=caller.metadata)
        except grpc.aio.AioRpcError as err:
            raise downstream_error("reranker", err) from None
        reordered = []
        for ranked in response.results:
            hit = head[ranked.index]
            hit.rerank_score = ranked.score
            hit.rerank_model_score = ranked.model_score
            reordered.append(hit)
        # Candidates beyond the rerank depth keep their first-stage order, after the reranked ones.
        return reordered + tail


def _opt(message: retriever_pb2.ScoredDocument, field: str) -> float | None:
    return float(getattr(message, field)) if message.HasField(field) else None


def parse_args(argv: list[str] | None = None) -> GatewayConfig:
    return parse_config(GatewayConfig(), "GATEWAY", argv, __doc__ or "")


def build(config: GatewayConfig) -> Hosted:
    servicer = SearchServicer(config)  # aio channels must be made inside the running loop
    return Hosted([ServiceSpec.of(search_pb2, "SearchService", search_pb2_grpc.add_SearchServiceServicer_to_server,
                                  servicer)], on_stop=[servicer.stop], health_probe=servicer.downstreams_serving)


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    run_service("gateway", parse_args(argv), build)


if __name__ == "__main__":
    main()
