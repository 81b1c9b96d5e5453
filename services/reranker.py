"""RerankerService: BlockRank reranking over gRPC, with dynamic batching.

    python -m services.reranker --port 50052 [--model PATH] [--device auto]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from dataclasses import dataclass

import grpc

from reranker.batcher import BatcherConfig, RerankBatcher
from reranker.engine import Reranker, RerankerConfig
from reranker.errors import RerankInputError, UnknownTenant
from services.errors import NotReady, ServiceError
from services.gen.retrieval.v1 import document_pb2, reranker_pb2, reranker_pb2_grpc
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
            max_document_tokens=cfg.max_document_tokens))

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
        if request.tenant:
            raise UnknownTenant(f"tenant {request.tenant!r} has no reranker loaded")
        if request.top_n < 0:
            raise RerankInputError("top_n must be >= 0 (0 = all)")
        if request.first_stage_scores and len(request.first_stage_scores) != len(request.documents):
            raise RerankInputError("first_stage_scores must be empty or one per document")
        docs = [(d.title, d.text) for d in request.documents]
        prompt = await self.prepare.run(context, reranker.build_prompt, request.query, docs)
        remaining = context.time_remaining()
        try:
            scored = await asyncio.wait_for(self._batcher.submit(prompt), timeout=remaining)
        except TimeoutError:
            raise ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded waiting for the reranker") \
                from None
        first_stage = list(request.first_stage_scores) or None
        ranked = reranker.ranked(scored.scores, first_stage, request.top_n or None)
        results = [reranker_pb2.RankedDocument(index=r.index, id=request.documents[r.index].id, score=r.score,
                                               model_score=r.model_score) for r in ranked]
        timings = document_pb2.Timings(total_ms=elapsed_ms(start), queue_ms=scored.queue_ms,
                                       model_ms=scored.model_ms)
        return reranker_pb2.RerankResponse(results=results, timings=timings, model=reranker.model_name,
                                           fused=bool(first_stage) and reranker.fuses)


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
    return RerankerServiceConfig(**vars(parser.parse_args(argv)))


def build(config: RerankerServiceConfig) -> Hosted:
    servicer = RerankerServicer(config)
    spec = ServiceSpec.of(reranker_pb2, "RerankerService", reranker_pb2_grpc.add_RerankerServiceServicer_to_server,
                          servicer)
    return Hosted([spec], load=servicer.load, after_load=servicer.start_batcher)


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    run_service("reranker", parse_args(argv), build)


if __name__ == "__main__":
    main()
