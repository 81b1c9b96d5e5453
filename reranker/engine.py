"""The reranker a notebook or a service uses: query + documents -> ranked indices.

    from reranker.engine import Reranker
    ranked = Reranker().rank("query", ["doc one", ("title", "doc two")], top_n=10)
    # [RankedResult(index=1, score=0.61, model_score=0.61), RankedResult(index=0, ...)]

`Reranker` owns the model and the ranking path (validation, prompts, the block-sparse forward, fusion);
tenants (settings, handles, adapter load/unload, equivalence scheduling) live in its `tenants`
registry (reranker.tenants). A service calls `start()` after loading and `stop()` on shutdown.

Locking: `Reranker.forward_lock` lets one forward pass run on the model at a time, whether a serving
batch or an equivalence evaluation (the batcher merges requests instead of running them in parallel).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from types import TracebackType

from common.device import Dtype
from reranker.adapters import base_scoring, resolve_startup_adapter
from reranker.batcher import LARGE_BATCH_TOKENS
from reranker.blockrank import BlockRankForward
from reranker.calibration import CALIBRATION, CALIBRATION_BLOCK_TOKENS
from reranker.equivalence import EquivalenceChecker
from reranker.errors import RerankInputError
from reranker.model import LoadedModel, load_model
from reranker.packed import ForwardPath
from reranker.prompt import Prompt, PromptBuilders
from reranker.ranking import RankedResult, fuse, rank_scores
from reranker.routing import SharedPrefixCache
from reranker.rowops import CompileSetting, row_ops_for
from reranker.tenants import (
    DEFAULT_TENANT,
    EquivalenceMode,
    ScoringOverrides,
    TenantHandle,
    TenantRegistry,
    settings_from_meta,
)
from reranker.zoo import BlockZoo

log = logging.getLogger(__name__)

DocumentInput = str | tuple[str, str]  # text, or (title, text)
# Chosen by `python -m deploy.evidence choose` (docs/quality.md, "The reranker: never worse by default"): no weight
# gains over the hybrid first stage beyond noise on every tuning collection held out in turn, so by default the
# reranker does not run; a fitted collection weight, a tenant's adapter or a request's weight turns it on.
DEFAULT_FUSION_WEIGHT = 0.0


@dataclass(frozen=True)
class RerankerConfig:
    model: str = ""  # local HF Llama/Mistral/Qwen2 directory or .gguf; empty: bundled SmolLM2-135M-Instruct
    # Where a .gguf model is converted once to load fast (reranker.model.model_cache): empty: ~/.cache/...; "off"
    model_cache: str = ""
    # The default tenant's reranker (requests with an empty tenant): "default": the shipped fine-tuned
    # LoRA when it exists for this base model; "none": the base model; or a PEFT adapter directory.
    adapter: str = "default"
    device: str = "auto"  # auto, cpu, cuda, cuda:1 ...
    dtype: Dtype = Dtype.AUTO  # auto: bf16 on CUDA (else fp16) and on CPUs with native bf16 (else fp32)
    block_tokens: int = 0  # tokens per document block; 0: the adapter's training length, else 160
    max_query_tokens: int = 128
    scoring_layer: int = -1  # -1: the adapter's (or the model's scoring file), else the middle layer
    scoring_heads: tuple[int, ...] = ()  # empty: from the adapter or scoring file, else all heads
    # For callers without an adapter of their own on collections without a fitted weight:
    default_fusion_weight: float = DEFAULT_FUSION_WEIGHT  # 0 skips reranking; below 0: the adapter's own weight
    max_documents: int = 500
    max_document_tokens: int = 8192  # longer documents are refused, not silently cut
    max_query_chars: int = 8192
    # Multi-tenant serving (reranker.zoo): LoadAdapter names resolve under adapters_root (empty: the
    # shipped reranker/adapters); tenant blocks are LRU-evicted beyond the budget.
    adapters_root: str = ""
    tenant_budget_mb: int = 512
    prefix_cache_mb: int = 32  # the shared instruction prefix's K/V per chain
    # On a CPU, copies of the weights with a tenant's adapter merged in, for batches of that tenant alone (one
    # matmul per projection instead of three); least recently used out. 0: off.
    merged_weights_mb: int = 128
    cuda_graphs: int = 32  # on a GPU, batch shapes kept as CUDA graphs (reranker.graphs); 0: always eager
    # The forward's norms, RoPE and SiLU·up compiled into fused CPU kernels at start-up (reranker.rowops).
    cpu_compile: CompileSetting = CompileSetting.AUTO  # auto: bf16 with AMX and a C++ compiler; on: any CPU; off
    equivalence: EquivalenceMode = EquivalenceMode.BACKGROUND  # when loaded blocks are checked for substitution
    equivalence_max_error: float = 1e-3


class WeightSource(StrEnum):
    """Where a request's fusion weight comes from."""

    REQUEST = "request"  # the caller named one (e.g. the weight fitted for its collection)
    ADAPTER = "adapter"  # the tenant's own adapter (its calibration or its binding)
    DEFAULT = "default"  # the default model's, for callers without an adapter of their own


@dataclass(frozen=True)
class Ranking:
    results: list[RankedResult]
    fused: bool  # the order mixes in the first-stage scores


class Reranker:
    """BlockRank reranking for any number of tenants over one resident base model.

    The default tenant ("") is the configured adapter (or the base model); `tenants.load` adds a
    tenant whose chain shares every base block and adds only its LoRA blocks. Prompts of different
    tenants are scored together in one pass."""

    def __init__(self, config: RerankerConfig = RerankerConfig(), loaded: LoadedModel | None = None) -> None:
        self.config = config
        self.lm = loaded or load_model(config.model, config.device, config.dtype, cache=config.model_cache)
        self.prefix_cache = SharedPrefixCache(config.prefix_cache_mb << 20)
        self.forward = BlockRankForward(self.lm.model, self.prefix_cache, cuda_graphs=config.cuda_graphs,
                                        merged_weights_bytes=config.merged_weights_mb << 20)
        self.forward.ops = row_ops_for(config.cpu_compile, self.forward)
        self.forward_lock = threading.Lock()
        self.builders = PromptBuilders(self.lm.tokenizer, config.max_query_tokens)
        self.tenants = self._registry()
        self.adapter = resolve_startup_adapter(config.adapter, self.lm.name)
        base = settings_from_meta(base_scoring(self.lm.name), self.lm.name, self.forward.num_layers)
        overrides = ScoringOverrides(config.scoring_layer, config.scoring_heads, config.block_tokens,
                                     config.default_fusion_weight)
        self.tenants.set_default(self.adapter, base, overrides)
        settings = self.tenants.settings(DEFAULT_TENANT)
        log.info("reranker %s: scoring layer %d/%d, heads %s, block %d tokens, fusion weight %s",
                 settings.model_name, settings.spec.layer, self.forward.num_layers,
                 list(settings.spec.heads) or "all", settings.spec.block_tokens, settings.fusion_weight)

    def _registry(self) -> TenantRegistry:
        cfg = self.config
        zoo = BlockZoo(self.lm.model, self.lm.name, cfg.tenant_budget_mb << 20)
        calibration_builder = self.builders.get(CALIBRATION_BLOCK_TOKENS)
        calibration = [calibration_builder.build(query, docs) for query, docs in CALIBRATION]
        checker = EquivalenceChecker(self.forward, zoo, calibration, self.forward_lock, cfg.equivalence_max_error)
        root = Path(cfg.adapters_root) if cfg.adapters_root else None
        return TenantRegistry(zoo, self.builders, checker, cfg.equivalence, root)

    # ---- lifecycle -----------------------------------------------------------
    def start(self) -> Reranker:
        self.tenants.start()
        return self

    def stop(self) -> None:
        self.tenants.stop()

    def __enter__(self) -> Reranker:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    @property
    def batch_tokens(self) -> int:
        """Prompt tokens per forward pass this reranker runs best at: the batcher's default cap. On a CPU (automatic
        path) the packed limit: a larger batch would run as several packed forwards anyway
        (reranker.packed.cpu_packed_groups), a query costs the same in a batch of one as of four, and a smaller
        batch returns its requests as soon as their own forward is done. Elsewhere 65,536: a GPU gains from the
        largest batches."""
        forward = self.forward
        if forward.device.type == "cpu" and forward.path is ForwardPath.AUTO:
            return forward.cpu_packed_bytes // forward.element_size
        return LARGE_BATCH_TOKENS

    # ---- ranking -------------------------------------------------------------
    def handle(self, tenant: str = DEFAULT_TENANT) -> TenantHandle:
        return self.tenants.handle(tenant)

    def build_prompt(self, query: str, documents: Sequence[DocumentInput], handle: TenantHandle) -> Prompt:
        """Validate against the limits and tokenise; raises RerankInputError."""
        cfg = self.config
        if not query.strip():
            raise RerankInputError("query must not be empty")
        if len(query) > cfg.max_query_chars:
            raise RerankInputError(f"query longer than {cfg.max_query_chars} characters")
        if not documents:
            raise RerankInputError("documents must not be empty")
        if len(documents) > cfg.max_documents:
            raise RerankInputError(f"at most {cfg.max_documents} documents per request, got {len(documents)}")
        pairs = [_as_pair(d) for d in documents]
        for i, (title, text) in enumerate(pairs):
            if not (title.strip() or text.strip()):
                raise RerankInputError(f"documents[{i}] is empty")
            self._check_length(i, title, text)
        return handle.builder.build(query, pairs)

    def _check_length(self, i: int, title: str, text: str) -> None:
        limit = self.config.max_document_tokens
        # Character count bounds the token count from above for these tokenizers: skip the work when short.
        if len(title) + len(text) > limit:
            n = len(self.lm.tokenizer(f"{title} {text}", add_special_tokens=False)["input_ids"])
            if n > limit:
                raise RerankInputError(f"documents[{i}] has {n} tokens, limit {limit}")

    def score_prompts(self, prompts: Sequence[Prompt], handles: Sequence[TenantHandle]) -> list[list[float]]:
        """Scores for several prompts (of any tenants) in one block-sparse pass."""
        specs = [h.settings.spec for h in handles]
        with self.forward_lock:
            scores = self.forward.score_routed(prompts, specs, [h.route for h in handles])
        return [s.float().cpu().tolist() for s in scores]

    def rank(self, query: str, documents: Sequence[DocumentInput], top_n: int | None = None,
             first_stage_scores: Sequence[float] | None = None, tenant: str = DEFAULT_TENANT,
             fusion_weight: float | None = None) -> list[RankedResult]:
        handle = self.handle(tenant)
        scores = self.score_prompts([self.build_prompt(query, documents, handle)], [handle])[0]
        return self.ranked(scores, first_stage_scores, top_n, handle, fusion_weight).results

    @staticmethod
    def fusion_weight(handle: TenantHandle, requested: float | None = None) -> tuple[float | None, WeightSource]:
        """The weight a request ranks with and where it comes from: the request's (e.g. one fitted for the
        documents' collection), else the tenant adapter's, else the default model's (None: the model alone)."""
        if requested is not None:
            if not 0.0 <= requested <= 1.0:
                raise RerankInputError(f"fusion_weight must be in 0..1, got {requested}")
            return requested, WeightSource.REQUEST
        own = WeightSource.DEFAULT if handle.tenant == DEFAULT_TENANT else WeightSource.ADAPTER
        return handle.settings.fusion_weight, own

    def ranked(self, model_scores: Sequence[float], first_stage_scores: Sequence[float] | None,
               top_n: int | None, handle: TenantHandle, fusion_weight: float | None = None) -> Ranking:
        """Rank by the fused score when first-stage scores and a fusion weight exist (see `fusion_weight`), else
        by the model's."""
        if first_stage_scores is not None and len(first_stage_scores) != len(model_scores):
            raise RerankInputError(f"{len(first_stage_scores)} first-stage scores for {len(model_scores)} documents")
        weight, _ = self.fusion_weight(handle, fusion_weight)
        if first_stage_scores and weight is not None:
            return Ranking(rank_scores(fuse(model_scores, first_stage_scores, weight), top_n, model_scores), True)
        return Ranking(rank_scores(model_scores, top_n), False)


def _as_pair(document: DocumentInput) -> tuple[str, str]:
    if isinstance(document, tuple):
        return document[0] or "", document[1] or ""
    return "", document
