"""RerankerService (BlockRank reranking, dynamic batching across tenants) and
AdapterService (per-tenant LoRA rerankers as shared blocks) in one process.

    python -m services.reranker --port 50052 [--model PATH] [--device auto] \
        [--adapters-root DIR] [--tenant-budget-mb 512] [--admin-token TOKEN]
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import os
import time
from dataclasses import dataclass

import grpc

from reranker.batcher import BatcherConfig, RerankBatcher
from reranker.engine import Reranker, RerankerConfig, TenantHandle
from reranker.errors import RerankInputError
from reranker.prompt import Prompt
from reranker.zoo import TenantUsage, list_adapter_names
from services.errors import NotReady, ServiceError
from services.gen.retrieval.v1 import (
    adapter_pb2,
    adapter_pb2_grpc,
    document_pb2,
    reranker_pb2,
    reranker_pb2_grpc,
)
from services.server import Hosted, ServiceSpec, Worker, elapsed_ms, run_service, setup_logging


@dataclass(frozen=True)
class RerankerServiceConfig:
    host: str = "127.0.0.1"
    port: int = 50052
    model_path: str = ""
    adapter: str = "default"
    device: str = "auto"
    dtype: str = "auto"
    block_tokens: int = 0
    scoring_layer: int = -1
    max_documents: int = 500
    max_document_tokens: int = 8192
    max_queue: int = 64
    max_batch_tokens: int = 65_536
    max_wait_ms: float = 2.0
    grace_s: float = 20.0
    adapters_root: str = ""  # LoadAdapter names resolve here; empty: reranker/adapters
    tenant_budget_mb: int = 512
    equivalence: str = "background"
    admin_token: str = ""  # when set, AdapterService calls need "authorization: Bearer <token>"


class RerankerServicer(reranker_pb2_grpc.RerankerServiceServicer):
    def __init__(self, config: RerankerServiceConfig) -> None:
        self.config = config
        self.prepare = Worker(threads=2)  # tokenising, off the event loop
        self._reranker: Reranker | None = None
        self._batcher: RerankBatcher | None = None

    def load(self) -> None:
        from retriever.embedder import set_cpu_threads

        set_cpu_threads()
        cfg = self.config
        self._reranker = Reranker(RerankerConfig(
            model_path=cfg.model_path, adapter=cfg.adapter, device=cfg.device, dtype=cfg.dtype, block_tokens=cfg.block_tokens,
            scoring_layer=cfg.scoring_layer, max_documents=cfg.max_documents,
            max_document_tokens=cfg.max_document_tokens, adapters_root=cfg.adapters_root,
            tenant_budget_bytes=cfg.tenant_budget_mb << 20, equivalence=cfg.equivalence))

    async def start_batcher(self) -> None:
        cfg = self.config
        self._batcher = RerankBatcher(self.reranker.score_prompts, BatcherConfig(
            max_queue=cfg.max_queue, max_batch_tokens=cfg.max_batch_tokens, max_wait_ms=cfg.max_wait_ms))
        self._batcher.start()

    @property
    def reranker(self) -> Reranker:
        if self._reranker is None:
            raise NotReady("the reranker model is still loading")
        return self._reranker

    async def Rerank(self, request, context):
        start = time.perf_counter()
        reranker = self.reranker
        if self._batcher is None:
            raise NotReady("the reranker model is still loading")
        if request.top_n < 0:
            raise RerankInputError("top_n must be >= 0 (0 = all)")
        if request.first_stage_scores and len(request.first_stage_scores) != len(request.documents):
            raise RerankInputError("first_stage_scores must be empty or one per document")
        docs = [(d.title, d.text) for d in request.documents]
        # The tenant is resolved now (NOT_FOUND if unknown): the handle keeps its chain alive even if
        # the tenant is unloaded while the request waits in the queue.
        handle, prompt = await self.prepare.run(context, self._prepare, request.tenant, request.query, docs)
        remaining = context.time_remaining()
        try:
            scored = await asyncio.wait_for(self._batcher.submit(prompt, handle), timeout=remaining)
        except TimeoutError:
            raise ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded waiting for the reranker") \
                from None
        first_stage = list(request.first_stage_scores) or None
        ranked = reranker.ranked(scored.scores, first_stage, request.top_n or None, handle)
        results = [reranker_pb2.RankedDocument(index=r.index, id=request.documents[r.index].id, score=r.score,
                                               model_score=r.model_score) for r in ranked]
        timings = document_pb2.Timings(total_ms=elapsed_ms(start), queue_ms=scored.queue_ms,
                                       model_ms=scored.model_ms)
        return reranker_pb2.RerankResponse(results=results, timings=timings, model=handle.model_name,
                                           fused=bool(first_stage) and handle.fuses)

    def _prepare(self, tenant: str, query: str, docs: list[tuple[str, str]]) -> tuple[TenantHandle, Prompt]:
        handle = self.reranker.handle(tenant)
        return handle, self.reranker.build_prompt(query, docs, handle)


class AdapterServicer(adapter_pb2_grpc.AdapterServiceServicer):
    """Tenant adapters on the reranker's shared base model (reranker.zoo)."""

    def __init__(self, reranker: RerankerServicer, admin_token: str) -> None:
        self.rerank = reranker
        self.admin_token = admin_token
        self.work = Worker(threads=1)  # adapter loads read files and hash tensors: off the event loop

    async def LoadAdapter(self, request, context):
        self._authorize(context)
        if not request.tenant:
            raise RerankInputError("tenant must not be empty (the empty tenant is the server's default)")
        if not request.adapter:
            raise RerankInputError("adapter must name an adapter under the server's adapters root")
        usage = await self.work.run(context, self.rerank.reranker.load_adapter, request.tenant, request.adapter)
        return adapter_pb2.LoadAdapterResponse(adapter=self._info(usage), load_ms=usage.load_ms)

    async def UnloadAdapter(self, request, context):
        self._authorize(context)
        freed = await self.work.run(context, self.rerank.reranker.unload_adapter, request.tenant)
        return adapter_pb2.UnloadAdapterResponse(freed_bytes=freed)

    async def ListAdapters(self, request, context):
        self._authorize(context)
        reranker = self.rerank.reranker
        usage = reranker.zoo.usage()
        memory = adapter_pb2.MemoryUsage(
            base_bytes=usage.base_bytes, tenant_bytes=usage.tenant_bytes, budget_bytes=usage.budget_bytes,
            prefix_cache_bytes=reranker.prefix_cache.nbytes, resident_tenant_blocks=usage.resident_tenant_blocks,
            known_tenant_blocks=usage.known_tenant_blocks, evictions=usage.evictions, reloads=usage.reloads)
        decisions = [adapter_pb2.SubstitutionDecision(
            tenant=d.tenant, layer=d.layer, block=d.block, replacement=d.replacement,
            replacement_kind=d.replacement_kind, max_relative_error=d.max_relative_error,
            ranking_agreement=d.ranking_agreement, accepted=d.accepted, reason=d.reason,
            max_score_change=d.max_score_change)
            for d in reranker.checker.decisions]
        # A tenant unloaded between the snapshot and here is left out rather than failing the listing.
        live = [t for t in usage.tenants if t.tenant in reranker.zoo.tenants]
        return adapter_pb2.ListAdaptersResponse(adapters=[self._info(t) for t in live], memory=memory,
                                                decisions=decisions,
                                                available=list_adapter_names(reranker.adapters_root))

    def _info(self, usage: TenantUsage) -> adapter_pb2.AdapterInfo:
        settings = self.rerank.reranker.settings(usage.tenant)  # listing must not read evicted blocks back
        return adapter_pb2.AdapterInfo(
            tenant=usage.tenant, adapter=usage.adapter, own_blocks=usage.own_blocks,
            shared_blocks=usage.shared_blocks, own_bytes=usage.own_bytes, shared_bytes=usage.shared_bytes,
            resident=usage.resident, scoring_layer=settings.spec.layer,
            fusion_weight=settings.fusion_weight or 0.0, fuses=settings.fusion_weight is not None)

    def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        if not self.admin_token:
            return
        metadata = dict(context.invocation_metadata() or ())
        header = metadata.get("authorization", "")
        if not header:
            raise ServiceError(grpc.StatusCode.UNAUTHENTICATED, "AdapterService needs 'authorization: Bearer <token>'")
        if not hmac.compare_digest(header.encode(), f"Bearer {self.admin_token}".encode()):
            raise ServiceError(grpc.StatusCode.PERMISSION_DENIED, "the admin token does not match")


def parse_args(argv: list[str] | None = None) -> RerankerServiceConfig:
    d = RerankerServiceConfig
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default=env("RERANKER_HOST", d.host))
    parser.add_argument("--port", type=int, default=int(env("RERANKER_PORT", d.port)))
    parser.add_argument("--model", dest="model_path", default=env("RERANKER_MODEL", ""),
                        help="local Hugging Face Llama/Mistral/Qwen2 directory or .gguf (default: SmolLM2-135M)")
    parser.add_argument("--adapter", default=env("RERANKER_ADAPTER", d.adapter),
                        help="'default' (shipped fine-tuned LoRA), 'none' (base model) or a PEFT adapter directory")
    parser.add_argument("--device", default=env("RERANKER_DEVICE", d.device), help="auto, cpu, cuda, cuda:1 ...")
    parser.add_argument("--dtype", default=d.dtype, choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--block-tokens", type=int, default=d.block_tokens,
                        help="tokens per document block (0: the adapter's training length, else 160)")
    parser.add_argument("--scoring-layer", type=int, default=d.scoring_layer)
    parser.add_argument("--max-documents", type=int, default=d.max_documents)
    parser.add_argument("--max-document-tokens", type=int, default=d.max_document_tokens)
    parser.add_argument("--max-queue", type=int, default=d.max_queue)
    parser.add_argument("--max-batch-tokens", type=int, default=d.max_batch_tokens)
    parser.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms)
    parser.add_argument("--grace-s", type=float, default=d.grace_s)
    parser.add_argument("--adapters-root", default=env("RERANKER_ADAPTERS_ROOT", d.adapters_root),
                        help="directory whose subdirectories LoadAdapter may name (default: reranker/adapters)")
    parser.add_argument("--tenant-budget-mb", type=int, default=int(env("RERANKER_TENANT_BUDGET_MB", d.tenant_budget_mb)),
                        help="memory for tenant blocks; least recently used ones are evicted beyond it")
    parser.add_argument("--equivalence", default=d.equivalence, choices=["background", "sync", "off"],
                        help="when loaded blocks are checked for substitution by equivalent ones")
    parser.add_argument("--admin-token", default=env("RERANKER_ADMIN_TOKEN", d.admin_token),
                        help="require this bearer token on AdapterService calls (env RERANKER_ADMIN_TOKEN)")
    return RerankerServiceConfig(**vars(parser.parse_args(argv)))


def build(config: RerankerServiceConfig) -> Hosted:
    servicer = RerankerServicer(config)
    adapters = AdapterServicer(servicer, config.admin_token)
    specs = [ServiceSpec.of(reranker_pb2, "RerankerService", reranker_pb2_grpc.add_RerankerServiceServicer_to_server,
                            servicer),
             ServiceSpec.of(adapter_pb2, "AdapterService", adapter_pb2_grpc.add_AdapterServiceServicer_to_server,
                            adapters)]
    return Hosted(specs, load=servicer.load, after_load=servicer.start_batcher)


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    run_service("reranker", parse_args(argv), build)


if __name__ == "__main__":
    main()
