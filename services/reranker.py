"""RerankerService (BlockRank reranking, dynamic batching across tenants) and
AdapterService (per-tenant LoRA rerankers as shared blocks) in one process.

    python -m services.reranker --port 50052 [--model PATH] [--device auto] [--dtype auto] \
        [--adapters-root DIR] [--tenants-store file:PATH|etcd://HOST:PORT] [--tenant-budget-mb 512] \
        [--admin-token TOKEN]

Tenants' bindings (tenant -> adapter and settings) live in the tenant registry that every replica reads
(reranker.registry); this process loads a registered tenant's blocks on its first request (reranker.bindings).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from dataclasses import dataclass

import grpc
from prometheus_client import Counter, Histogram

from common.allocator import RERANKER_ARENAS, RERANKER_KEEP_MB
from common.device import set_cpu_threads
from common.tracing import record_stage, stage
from reranker.batcher import BatcherConfig, RerankBatcher, Scored, prompt_tokens
from reranker.bindings import RegisteredTenants
from reranker.engine import Reranker, RerankerConfig, WeightSource
from reranker.errors import ExpectedLate, QueueFull, TenantQueueFull, UnknownTenant
from reranker.prompt import Prompt
from reranker.registry import Binding, TenantLimits, open_store
from reranker.registry.model import check_tenant
from reranker.tenants import DEFAULT_TENANT, Listing, TenantHandle, TenantSettings
from reranker.zoo import TenantUsage
from services.admission import Overloaded
from services.auth import acting_tenant, authenticated
from services.config import Secret, ServerConfig, option, parse_config
from services.convert import optional
from services.errors import NotReady, ServiceError
from services.gen.retrieval.v1 import (
    adapter_pb2,
    adapter_pb2_grpc,
    document_pb2,
    reranker_pb2,
    reranker_pb2_grpc,
)
from services.metrics import (
    COUNT_BUCKETS,
    LATENCY_BUCKETS,
    TOKEN_BUCKETS,
    Families,
    counter,
    gauge,
    register_engine,
)
from services.server import (
    Context,
    Hosted,
    ServiceSpec,
    Worker,
    elapsed_ms,
    run_service,
    time_budget,
    within_deadline,
)
from services.tracing import exemplar

log = logging.getLogger(__name__)
QUEUE_SECONDS = Histogram("reranker_queue_wait_seconds", "Time a rerank request waited for its forward pass.",
                          buckets=LATENCY_BUCKETS)
MODEL_SECONDS = Histogram("reranker_model_seconds", "Forward-pass time of the batch a rerank request ran in.",
                          buckets=LATENCY_BUCKETS)
DOCUMENTS = Counter("reranker_documents_total", "Documents reranked.")
REQUEST_DOCUMENTS = Histogram("reranker_request_documents", "Documents per rerank request.", buckets=COUNT_BUCKETS)
BATCH_REQUESTS = Histogram("reranker_batch_requests", "Requests per forward pass.", buckets=COUNT_BUCKETS)
WEIGHT_SOURCES = {WeightSource.REQUEST: document_pb2.RERANK_WEIGHT_SOURCE_REQUEST,
                  WeightSource.ADAPTER: document_pb2.RERANK_WEIGHT_SOURCE_ADAPTER,
                  WeightSource.DEFAULT: document_pb2.RERANK_WEIGHT_SOURCE_DEFAULT}
BATCH_TOKENS = Histogram("reranker_batch_tokens", "Prompt tokens per forward pass.", buckets=TOKEN_BUCKETS)
REJECTED = Counter("reranker_rejected_total", "Rerank requests refused at once: the shared queue full (queue_full), "
                   "the tenant's (tenant_queue_full), or the expected finish past the call's share of its deadline "
                   "(expected_late).", ["reason"])
REJECTION_REASONS = {ExpectedLate: "expected_late", TenantQueueFull: "tenant_queue_full", QueueFull: "queue_full"}
for _reason in REJECTION_REASONS.values():  # every series exists, at 0, before the first refusal
    REJECTED.labels(_reason)


def rejection_reason(refusal: QueueFull) -> str:
    """The most specific reason of the refusal's class (a subclass the table does not name counts as its base's)."""
    return next(reason for kind, reason in REJECTION_REASONS.items() if isinstance(refusal, kind))


@dataclass(frozen=True)
class RerankerServiceConfig:
    # A CPU forward frees and retakes tens of MiB per layer: keep them, in one arena (common.allocator).
    server: ServerConfig = option(factory=lambda: ServerConfig(
        port=50052, grace_s=20.0, malloc_arenas=RERANKER_ARENAS, malloc_keep_mb=RERANKER_KEEP_MB))
    engine: RerankerConfig = option(factory=RerankerConfig)
    batcher: BatcherConfig = option(factory=BatcherConfig)
    admin_token: Secret = option(factory=Secret, help="when set, AdapterService calls need "
                                                      "'authorization: Bearer <token>'")
    retry_after_ms: int = option(100, "the retry hint (grpc-retry-pushback-ms) sent when a rerank is refused (its "
                                      "queue full, or expected to finish too late)")
    tenants_store: str = option("file:var/tenants.json", "the tenant registry every replica shares: file:PATH "
                                "(one host; a shared volume) or etcd://HOST:PORT[/PREFIX]; empty: tenants live "
                                "in this process only and a restart loses them")


class RerankerServicer(reranker_pb2_grpc.RerankerServiceServicer):
    def __init__(self, config: RerankerServiceConfig) -> None:
        self.config = config
        self.prepare = Worker(config.server.worker_threads, "prepare")  # tokenising, off the event loop
        self._reranker: Reranker | None = None
        self._registered: RegisteredTenants | None = None
        self._batcher: RerankBatcher[TenantHandle] | None = None

    def load(self) -> None:
        log.info("torch CPU threads: %d", set_cpu_threads(self.config.server.cpu_threads))
        store = open_store(self.config.tenants_store) if self.config.tenants_store else None
        self._reranker = Reranker(self.config.engine).start()
        self._registered = RegisteredTenants(self._reranker.tenants, store)
        log.info("tenant registry: %s (%d tenants bound)", store.url if store else "off (this process only)",
                 len(store.snapshot()) if store else 0)

    async def start_batcher(self) -> None:
        self._batcher = RerankBatcher(self.reranker.score_prompts, self.config.batcher, on_batch=_observe_batch,
                                      batch_tokens=self.reranker.batch_tokens)
        log.info("rerank batches: up to %d prompt tokens per forward pass", self._batcher.max_batch_tokens)
        self._batcher.start()

    def metrics(self) -> Families:
        """Read at scrape time: queue, tenants and their memory, the shared-prefix cache."""
        if self._reranker is None or self._batcher is None:
            return
        usage = self._reranker.tenants.zoo.usage()
        cache = self._reranker.prefix_cache
        yield gauge("reranker_queue_depth", "Rerank requests waiting for a forward pass.", self._batcher.depth)
        # Not per tenant: metric labels never name a tenant (bounded cardinality, services/metrics.py).
        yield gauge("reranker_tenants_queued", "Tenants with rerank requests waiting.",
                    len(self._batcher.tenant_depths()))
        if self._registered is not None:
            yield counter("reranker_tenant_cold_loads_total", "Tenants loaded by their first request on this replica.",
                          self._registered.cold_loads)
            yield gauge("reranker_tenants_registered", "Tenants bound in the tenant registry.",
                        len(self._registered.bindings()))
        yield gauge("reranker_tenants_loaded", "Tenants with an adapter loaded.", len(usage.tenants))
        yield gauge("reranker_tenant_blocks_resident", "Tenant blocks (LoRA layers) in memory.",
                    usage.resident_tenant_blocks)
        yield gauge("reranker_tenant_block_bytes", "Bytes of the tenant blocks in memory.", usage.tenant_bytes)
        yield gauge("reranker_tenant_budget_bytes", "Budget for tenant blocks; beyond it they are evicted.",
                    usage.budget_bytes)
        yield gauge("reranker_base_model_bytes", "Bytes of the shared base model.", usage.base_bytes)
        yield counter("reranker_tenant_block_evictions_total", "Tenant blocks evicted.", usage.evictions)
        yield gauge("reranker_prefix_cache_bytes", "Bytes of the shared-prefix K/V cache.", cache.nbytes)
        yield counter("reranker_prefix_cache_hits_total", "Shared-prefix K/V found in the cache.", cache.hits)
        yield counter("reranker_prefix_cache_misses_total", "Shared-prefix K/V computed.", cache.misses)
        merged = self._reranker.forward.weights.merged
        if merged is not None:  # a CPU's: a tenant's adapter merged into weight copies for batches of it alone
            yield gauge("reranker_merged_weights_bytes", "Bytes of weight copies with a tenant's adapter merged in.",
                        merged.nbytes)
            yield counter("reranker_merged_weights_hits_total", "Projections through merged weights kept.",
                          merged.hits)
            yield counter("reranker_merged_weights_misses_total", "Merged weights made (or remade after eviction).",
                          merged.misses)

    async def stop(self) -> None:
        """After the server drained: the batcher, then the equivalence worker, the registry, the thread pool."""
        if self._batcher is not None:
            await self._batcher.stop()
        if self._reranker is not None:
            await asyncio.to_thread(self._reranker.stop)
        if self._registered is not None and self._registered.store is not None:
            await asyncio.to_thread(self._registered.store.close)
        self.prepare.stop()

    @property
    def reranker(self) -> Reranker:
        if self._reranker is None:
            raise NotReady("the reranker model is still loading")
        return self._reranker

    @property
    def registered(self) -> RegisteredTenants:
        if self._registered is None:
            raise NotReady("the reranker model is still loading")
        return self._registered

    @property
    def batcher(self) -> RerankBatcher[TenantHandle]:
        if self._batcher is None:
            raise NotReady("the reranker model is still loading")
        return self._batcher

    async def Rerank(self, request: reranker_pb2.RerankRequest, context: Context) -> reranker_pb2.RerankResponse:
        start = time.perf_counter()
        reranker = self.reranker
        docs = [(d.title, d.text) for d in request.documents]
        # The tenant is resolved now (NOT_FOUND if unknown): the handle keeps its chain alive even if
        # the tenant is unloaded while the request waits in the queue.
        tenant = acting_tenant(request.tenant)  # on the loop: the caller is a context variable
        handle, prompt = await self.prepare.run(context, self._prepare, tenant, authenticated(), request.query, docs)
        weight, source = reranker.fusion_weight(handle, optional(request, "fusion_weight"))
        first_stage = list(request.first_stage_scores) or None
        timings = document_pb2.Timings()
        model_scores = [0.0] * len(docs)
        if weight != 0.0 or not first_stage:  # at 0 the model's scores could not move anything: it does not run
            scored = await self._score(context, prompt, handle)
            timings.queue_ms, timings.model_ms = scored.queue_ms, scored.model_ms
            DOCUMENTS.inc(len(docs))
            REQUEST_DOCUMENTS.observe(len(docs))
            model_scores = scored.scores
        with stage("ranking", documents=len(docs), fused=first_stage is not None):
            ranking = reranker.ranked(model_scores, first_stage, request.top_n or None, handle, weight)
        results = [reranker_pb2.RankedDocument(index=r.index, id=request.documents[r.index].id, score=r.score,
                                               model_score=r.model_score) for r in ranking.results]
        timings.total_ms = elapsed_ms(start)
        return reranker_pb2.RerankResponse(
            results=results, timings=timings, model=handle.settings.model_name, fused=ranking.fused,
            fusion_weight=weight if ranking.fused and weight is not None else 1.0,
            fusion_weight_source=WEIGHT_SOURCES[source])

    async def _score(self, context: Context, prompt: Prompt, handle: TenantHandle) -> Scored:
        """The model's scores of one prompt, through the tenant-fair batcher (RESOURCE_EXHAUSTED when full)."""
        limits = self.registered.limits(handle.tenant)
        submitted_ns = time.time_ns()
        try:
            scored = await within_deadline(
                context, self.batcher.submit(prompt, handle, handle.tenant, limits, time_budget(context)),
                "waiting for the reranker")
        except QueueFull as full:
            REJECTED.labels(rejection_reason(full)).inc()
            raise Overloaded(str(full), self.config.retry_after_ms) from None
        QUEUE_SECONDS.observe(scored.queue_ms / 1000, exemplar())
        MODEL_SECONDS.observe(scored.model_ms / 1000, exemplar())
        record_batch_stages(submitted_ns, scored, prompt.n_docs, prompt_tokens(prompt))
        return scored

    def _prepare(self, tenant: str, default_when_none: bool, query: str, docs: list[tuple[str, str]]
                 ) -> tuple[TenantHandle, Prompt]:
        """A registered tenant's blocks are loaded here on its first request; with authentication, a tenant with no
        adapter of its own reranks with the server's default."""
        try:
            handle = self.registered.handle(tenant)
        except UnknownTenant:
            if not default_when_none:
                raise
            handle = self.reranker.handle(DEFAULT_TENANT)
        with stage("build_prompt", documents=len(docs)):
            return handle, self.reranker.build_prompt(query, docs, handle)


class AdapterServicer(adapter_pb2_grpc.AdapterServiceServicer):
    """Tenant adapters on the reranker's shared base model (reranker.tenants, reranker.zoo)."""

    def __init__(self, reranker: RerankerServicer, admin_token: Secret) -> None:
        self.rerank = reranker
        self.admin_token = admin_token
        self.work = Worker(threads=1, name="adapters")  # loads read files and hash tensors: off the event loop

    async def stop(self) -> None:
        self.work.stop()

    async def LoadAdapter(self, request: adapter_pb2.LoadAdapterRequest, context: Context
                          ) -> adapter_pb2.LoadAdapterResponse:
        self._authorize(context)
        binding = binding_from_request(request)
        usage = await self.work.run(context, self.rerank.registered.bind, binding)
        settings = self.rerank.reranker.tenants.settings(request.tenant)
        return adapter_pb2.LoadAdapterResponse(adapter=adapter_info(usage, settings), load_ms=usage.load_ms,
                                               binding=binding_to_pb(binding))

    async def UnloadAdapter(self, request: adapter_pb2.UnloadAdapterRequest, context: Context
                            ) -> adapter_pb2.UnloadAdapterResponse:
        self._authorize(context)
        freed, was_bound = await self.work.run(context, self.rerank.registered.unbind, request.tenant)
        return adapter_pb2.UnloadAdapterResponse(freed_bytes=freed, was_bound=was_bound)

    async def ListAdapters(self, request: adapter_pb2.ListAdaptersRequest, context: Context
                           ) -> adapter_pb2.ListAdaptersResponse:
        self._authorize(context)
        reranker = self.rerank.reranker
        listing = await self.work.run(context, reranker.tenants.listing)
        response = listing_to_pb(listing, reranker.prefix_cache.nbytes)
        response.bindings.extend(binding_to_pb(b) for _, b in sorted(self.rerank.registered.bindings().items()))
        return response

    def _authorize(self, context: Context) -> None:
        """With a keys file the interceptor has let only admin keys through (services.auth); else the admin
        token, when one is set."""
        if authenticated() or not self.admin_token:
            return
        metadata = dict(context.invocation_metadata() or ())
        header = metadata.get("authorization", "")
        if not header:
            raise ServiceError(grpc.StatusCode.UNAUTHENTICATED, "AdapterService needs 'authorization: Bearer <token>'")
        expected = f"Bearer {self.admin_token.reveal()}"
        if not hmac.compare_digest(str(header).encode(), expected.encode()):
            raise ServiceError(grpc.StatusCode.PERMISSION_DENIED, "the admin token does not match")


def binding_from_request(request: adapter_pb2.LoadAdapterRequest) -> Binding:
    """RegistryInvalid (INVALID_ARGUMENT) for names or settings outside their limits."""
    limits = TenantLimits(optional(request.limits, "max_queued"), optional(request.limits, "max_inflight"))
    return Binding(check_tenant(request.tenant), request.adapter, optional(request, "scoring_layer"),
                   optional(request, "fusion_weight"), limits)


def binding_to_pb(binding: Binding) -> adapter_pb2.TenantBinding:
    limits = adapter_pb2.TenantLimits(max_queued=binding.limits.max_queued, max_inflight=binding.limits.max_inflight)
    return adapter_pb2.TenantBinding(tenant=binding.tenant, adapter=binding.adapter, scoring_layer=binding.layer,
                                     fusion_weight=binding.fusion_weight, limits=limits)


def record_batch_stages(submitted_ns: int, scored: Scored, documents: int, tokens: int) -> None:
    """The queue wait and the forward pass of one request as spans: the batcher measured both (the forward is shared
    by every request in its batch, so its span in each request's trace carries the batch's size)."""
    forward_start = submitted_ns + int(scored.queue_ms * 1e6)
    record_stage("reranker_queue_wait", submitted_ns, forward_start)
    record_stage("forward_pass", forward_start, forward_start + int(scored.model_ms * 1e6), documents=documents,
                 tokens=tokens, batch_requests=scored.batch_requests, batch_tokens=scored.batch_tokens)


def _observe_batch(requests: int, tokens: int) -> None:
    BATCH_REQUESTS.observe(requests)
    BATCH_TOKENS.observe(tokens)


def adapter_info(usage: TenantUsage, settings: TenantSettings) -> adapter_pb2.AdapterInfo:
    return adapter_pb2.AdapterInfo(
        tenant=usage.tenant, adapter=usage.adapter, own_blocks=usage.own_blocks,
        shared_blocks=usage.shared_blocks, own_bytes=usage.own_bytes, shared_bytes=usage.shared_bytes,
        resident=usage.resident, scoring_layer=settings.spec.layer,
        fusion_weight=settings.fusion_weight or 0.0, fuses=settings.fusion_weight is not None)


def listing_to_pb(listing: Listing, prefix_cache_bytes: int) -> adapter_pb2.ListAdaptersResponse:
    usage = listing.usage
    memory = adapter_pb2.MemoryUsage(
        base_bytes=usage.base_bytes, tenant_bytes=usage.tenant_bytes, budget_bytes=usage.budget_bytes,
        prefix_cache_bytes=prefix_cache_bytes, resident_tenant_blocks=usage.resident_tenant_blocks,
        known_tenant_blocks=usage.known_tenant_blocks, evictions=usage.evictions, reloads=usage.reloads)
    decisions = [adapter_pb2.SubstitutionDecision(
        tenant=d.tenant, layer=d.layer, block=d.block, replacement=d.replacement,
        replacement_kind=d.replacement_kind.value, max_relative_error=d.max_relative_error,
        ranking_agreement=d.ranking_agreement, accepted=d.accepted, reason=d.reason,
        max_score_change=d.max_score_change) for d in listing.decisions]
    adapters = [adapter_info(t, listing.settings[t.tenant]) for t in usage.tenants if t.tenant in listing.settings]
    return adapter_pb2.ListAdaptersResponse(adapters=adapters, memory=memory, decisions=decisions,
                                            available=listing.available)


def parse_args(argv: list[str] | None = None) -> RerankerServiceConfig:
    return parse_config(RerankerServiceConfig(), "RERANKER", argv, __doc__ or "")


def build(config: RerankerServiceConfig) -> Hosted:
    servicer = RerankerServicer(config)
    register_engine(servicer.metrics)
    adapters = AdapterServicer(servicer, config.admin_token)
    specs = [ServiceSpec.of(reranker_pb2, "RerankerService", reranker_pb2_grpc.add_RerankerServiceServicer_to_server,
                            servicer),
             ServiceSpec.of(adapter_pb2, "AdapterService", adapter_pb2_grpc.add_AdapterServiceServicer_to_server,
                            adapters)]
    service = adapter_pb2.DESCRIPTOR.services_by_name["AdapterService"]
    return Hosted(specs, load=servicer.load, after_load=servicer.start_batcher,
                  on_stop=[adapters.stop, servicer.stop],
                  admin_methods=[f"/{service.full_name}/{m.name}" for m in service.methods])


def main(argv: list[str] | None = None) -> None:
    run_service("reranker", parse_args(argv), build)


if __name__ == "__main__":
    main()
