"""The reranker a notebook or a service uses: query + documents -> ranked indices.

    from reranker.engine import Reranker
    ranked = Reranker().rank("query", ["doc one", ("title", "doc two")], top_n=10)
    # [RankedResult(index=1, score=0.61), RankedResult(index=0, score=0.39)]
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from reranker.blockrank import BlockRankForward, ScoringSpec
from reranker.calibration import CALIBRATION, CALIBRATION_BLOCK_TOKENS
from reranker.equivalence import EquivalenceChecker
from reranker.errors import AdapterInvalid, RerankInputError, UnknownTenant
from reranker.model import LoadedModel, load_model
from reranker.prompt import Prompt, PromptBuilder, PromptLimits, PromptTemplate
from reranker.routing import Route, SharedPrefixCache
from reranker.zoo import BlockZoo, TenantUsage, resolve_adapter_name

log = logging.getLogger(__name__)
SCORING_DIR = Path(__file__).resolve().parent / "scoring"
ADAPTERS_ROOT = Path(__file__).resolve().parent / "adapters"
DEFAULT_ADAPTER = ADAPTERS_ROOT / "scifact-lora"
DEFAULT_TENANT = ""
ADAPTER_META = "blockrank.json"  # scoring layer/heads, fusion weight and training record of an adapter

DocumentInput = str | tuple[str, str]  # text, or (title, text)


@dataclass(frozen=True)
class RerankerConfig:
    model_path: str = ""  # empty: bundled SmolLM2-135M-Instruct (GGUF)
    # The default tenant's reranker (requests with an empty tenant): "default": the shipped
    # fine-tuned LoRA when it exists for this base model; "none": the base model; or a PEFT adapter
    # directory (with blockrank.json beside the weights).
    adapter: str = "default"
    device: str = "auto"
    dtype: str = "auto"  # fp32 on CPU, bf16/fp16 on CUDA
    block_tokens: int = 0  # 0: the adapter's training block length, else 160
    max_query_tokens: int = 128
    scoring_layer: int = -1  # -1: from the model's scoring file, else the middle layer
    scoring_heads: tuple[int, ...] = ()  # empty: from the scoring file, else all heads
    max_documents: int = 500
    max_document_tokens: int = 8192  # longer inputs are refused, not silently cut
    max_query_chars: int = 8192
    # Multi-tenant serving (reranker.zoo): where LoadAdapter names are resolved, the memory budget of
    # tenant blocks (LRU-evicted beyond it), the shared-prefix K/V cache size, and when blocks are
    # checked for substitution (reranker.equivalence): "background", "sync" or "off".
    adapters_root: str = ""  # empty: reranker/adapters
    tenant_budget_bytes: int = 512 << 20
    prefix_cache_bytes: int = 32 << 20
    equivalence: str = "background"
    equivalence_max_error: float = 1e-3


@dataclass(frozen=True)
class RankedResult:
    index: int
    score: float  # what the ranking is sorted by (fused when fusion applied)
    model_score: float = 0.0  # the reranker's own score


@dataclass
class ScoringChoice:
    layer: int
    heads: tuple[int, ...] = ()
    source: str = "default"
    notes: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TenantHandle:
    """Everything one request of a tenant needs, resolved once when it arrives: its chain (holding
    its own references, so unloading the tenant meanwhile cannot break it), scoring and fusion."""

    tenant: str
    route: Route
    spec: ScoringSpec
    fusion_weight: float | None
    model_name: str
    builder: PromptBuilder

    @property
    def fuses(self) -> bool:
        return self.fusion_weight is not None


@dataclass(frozen=True)
class TenantSettings:
    spec: ScoringSpec
    fusion_weight: float | None
    model_name: str


def resolve_adapter(adapter: str, model_name: str) -> Path | None:
    if adapter in ("", "none"):
        return None
    if adapter == "default":
        if not (DEFAULT_ADAPTER / ADAPTER_META).exists():
            return None
        meta = json.loads((DEFAULT_ADAPTER / ADAPTER_META).read_text())
        return DEFAULT_ADAPTER if meta.get("base_model") == model_name else None
    path = Path(adapter)
    if not (path / "adapter_config.json").exists():
        raise FileNotFoundError(f"{path} is not a PEFT adapter directory (no adapter_config.json)")
    return path


def merge_adapter(model: torch.nn.Module, adapter_dir: Path) -> torch.nn.Module:
    """Fold the LoRA deltas into a model's weights (a standalone copy of one tenant's reranker)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()


def load_scoring_choice(model_name: str, num_layers: int) -> ScoringChoice:
    """Layer and heads picked on training data (see reranker.select_layer), else the middle layer."""
    path = SCORING_DIR / f"{Path(model_name).stem}.json"
    if path.exists():
        data = json.loads(path.read_text())
        return ScoringChoice(layer=int(data["layer"]), heads=tuple(data.get("heads", ())), source=str(path),
                             notes=data)
    return ScoringChoice(layer=num_layers // 2)


class Reranker:
    """BlockRank reranking for any number of tenants over one resident base model.

    The default tenant ("") is the configured adapter (or the base model); `load_adapter` adds a
    tenant whose chain shares every base block and adds only its LoRA blocks. Prompts of different
    tenants are scored together in one pass."""

    def __init__(self, config: RerankerConfig = RerankerConfig(), loaded: LoadedModel | None = None) -> None:
        self.config = config
        self.lm = loaded or load_model(config.model_path, config.device, config.dtype)
        self.adapters_root = Path(config.adapters_root) if config.adapters_root else ADAPTERS_ROOT
        self.prefix_cache = SharedPrefixCache(config.prefix_cache_bytes)
        self.forward = BlockRankForward(self.lm.model, self.prefix_cache)
        self.zoo = BlockZoo(self.lm.model, self.lm.name, config.tenant_budget_bytes, ADAPTER_META)
        self._settings: dict[str, TenantSettings] = {}
        self._builders: dict[int, PromptBuilder] = {}
        self._lock = threading.Lock()  # one forward at a time; the batcher merges requests instead
        self._tenants_lock = threading.RLock()
        self.adapter = resolve_adapter(config.adapter, self.lm.name)
        if self.adapter is not None:
            self.zoo.add_tenant(DEFAULT_TENANT, self.adapter,
                                config.scoring_layer if config.scoring_layer >= 0 else None)
        self._settings[DEFAULT_TENANT] = self._default_settings()
        self.checker = EquivalenceChecker(self.forward, self.zoo, self._calibration(), self._spec_of,
                                          config.equivalence_max_error)
        self._checks = ThreadPoolExecutor(max_workers=1, thread_name_prefix="equivalence")
        self._pending: list[Future] = []
        if self.adapter is not None:
            self._schedule_check(DEFAULT_TENANT)
        spec = self.spec
        log.info("reranker %s: scoring layer %d/%d, heads %s, block %d tokens, fusion weight %s",
                 self.model_name, spec.layer, self.forward.num_layers, list(spec.heads) or "all", spec.block_tokens,
                 self.fusion_weight)

    # ---- tenants -------------------------------------------------------------
    def handle(self, tenant: str = DEFAULT_TENANT) -> TenantHandle:
        """Resolve a tenant's chain for one request (reads back evicted blocks); UnknownTenant if absent."""
        with self._tenants_lock:
            settings = self._settings.get(tenant)
            if settings is None:
                raise UnknownTenant(f"tenant {tenant!r} has no reranker loaded")
            route = self.zoo.route(tenant)[1] if tenant in self.zoo.tenants else self.zoo.base_route()
        return TenantHandle(tenant, route, settings.spec, settings.fusion_weight, settings.model_name,
                            self._builder(settings.spec.block_tokens))

    def load_adapter(self, tenant: str, adapter: str) -> TenantUsage:
        """Serve adapter `adapter` (a name under the adapters root) for `tenant`; replaces its old one."""
        if not tenant or tenant == DEFAULT_TENANT:
            raise AdapterInvalid("tenant must be a non-empty name (the default tenant is set at start-up)")
        directory = resolve_adapter_name(self.adapters_root, adapter)
        with self._tenants_lock:
            record = self.zoo.add_tenant(tenant, directory, adapter=adapter)
            self._settings[tenant] = self._settings_from(record.source.meta, f"{self.lm.name}+{adapter}")
        self._schedule_check(tenant)
        return self.tenant_usage(tenant)

    def unload_adapter(self, tenant: str) -> int:
        if tenant == DEFAULT_TENANT:
            raise AdapterInvalid("the default tenant cannot be unloaded")
        with self._tenants_lock:
            freed = self.zoo.remove_tenant(tenant)
            self._settings.pop(tenant, None)
        return freed

    def settings(self, tenant: str) -> TenantSettings:
        """A tenant's scoring spec, fusion weight and model name, without touching its blocks."""
        settings = self._settings.get(tenant)
        if settings is None:
            raise UnknownTenant(f"tenant {tenant!r} has no reranker loaded")
        return settings

    def tenant_usage(self, tenant: str) -> TenantUsage:
        for usage in self.zoo.usage().tenants:
            if usage.tenant == tenant:
                return usage
        raise UnknownTenant(f"tenant {tenant!r} has no adapter loaded")

    def wait_for_equivalence(self, timeout: float | None = None) -> None:
        """Block until every scheduled equivalence check has finished (tests, benchmarks)."""
        for future in list(self._pending):
            future.result(timeout=timeout)

    def close(self) -> None:
        self._checks.shutdown(wait=False, cancel_futures=True)

    # ---- requests ------------------------------------------------------------
    @property
    def default(self) -> TenantHandle:
        return self.handle(DEFAULT_TENANT)

    @property
    def spec(self) -> ScoringSpec:
        return self._settings[DEFAULT_TENANT].spec

    @property
    def fusion_weight(self) -> float | None:
        return self._settings[DEFAULT_TENANT].fusion_weight

    @property
    def fuses(self) -> bool:
        return self.fusion_weight is not None

    @property
    def model_name(self) -> str:
        return self._settings[DEFAULT_TENANT].model_name

    def build_prompt(self, query: str, documents: Sequence[DocumentInput], handle: TenantHandle | None = None) -> Prompt:
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
        tokenizer = self.lm.tokenizer
        for i, (title, text) in enumerate(pairs):
            if not (title.strip() or text.strip()):
                raise RerankInputError(f"documents[{i}] is empty")
            # Character count bounds the token count from above for these tokenizers: skip the work when short.
            if len(title) + len(text) > cfg.max_document_tokens:
                n = len(tokenizer(f"{title} {text}", add_special_tokens=False)["input_ids"])
                if n > cfg.max_document_tokens:
                    raise RerankInputError(f"documents[{i}] has {n} tokens, limit {cfg.max_document_tokens}")
        builder = handle.builder if handle is not None else self._builder(self.spec.block_tokens)
        return builder.build(query, pairs)

    def score_prompts(self, prompts: Sequence[Prompt],
                      handles: Sequence[TenantHandle | None] | None = None) -> list[list[float]]:
        """Scores for several prompts (of any tenants) in one block-sparse pass."""
        resolved = [h or self.default for h in (handles or [None] * len(prompts))]
        with self._lock:
            scores = self.forward.score_routed(prompts, [h.spec for h in resolved], [h.route for h in resolved])
        return [s.float().cpu().tolist() for s in scores]

    def rank(self, query: str, documents: Sequence[DocumentInput], top_n: int | None = None,
             first_stage_scores: Sequence[float] | None = None, tenant: str = DEFAULT_TENANT) -> list[RankedResult]:
        handle = self.handle(tenant)
        scores = self.score_prompts([self.build_prompt(query, documents, handle)], [handle])[0]
        return self.ranked(scores, first_stage_scores, top_n, handle)

    def ranked(self, model_scores: Sequence[float], first_stage_scores: Sequence[float] | None,
               top_n: int | None = None, handle: TenantHandle | None = None) -> list[RankedResult]:
        """Rank by the fused score when first-stage scores and a fusion weight exist, else by the model's."""
        if first_stage_scores is not None and len(first_stage_scores) != len(model_scores):
            raise RerankInputError(f"{len(first_stage_scores)} first-stage scores for {len(model_scores)} documents")
        weight = handle.fusion_weight if handle is not None else self.fusion_weight
        served = model_scores
        if first_stage_scores and weight is not None:
            served = fuse(model_scores, first_stage_scores, weight)
        return rank_scores(served, top_n, model_scores)

    # ---- internals -----------------------------------------------------------
    def _builder(self, block_tokens: int) -> PromptBuilder:
        builder = self._builders.get(block_tokens)
        if builder is None:
            builder = PromptBuilder(self.lm.tokenizer, PromptTemplate(),
                                    PromptLimits(block_tokens=block_tokens, max_query_tokens=self.config.max_query_tokens))
            self._builders[block_tokens] = builder
        return builder

    def _default_settings(self) -> TenantSettings:
        """The default tenant: its adapter's settings (or the base model's scoring file), then the
        service's own overrides."""
        cfg = self.config
        if self.adapter is not None:
            own = self._settings_from(self.zoo.tenants[DEFAULT_TENANT].source.meta,
                                      f"{self.lm.name}+{self.adapter.name}")
        else:
            choice = load_scoring_choice(self.lm.name, self.lm.model.config.num_hidden_layers)
            own = TenantSettings(ScoringSpec(choice.layer, tuple(choice.heads), 160),
                                  choice.notes.get("fusion_weight"), self.lm.name)
        spec = ScoringSpec(layer=cfg.scoring_layer if cfg.scoring_layer >= 0 else own.spec.layer,
                           heads=tuple(cfg.scoring_heads or own.spec.heads),
                           block_tokens=cfg.block_tokens or own.spec.block_tokens)
        return TenantSettings(spec, own.fusion_weight, own.model_name)

    def _settings_from(self, meta: dict, name: str) -> TenantSettings:
        layer = int(meta.get("layer", self.forward.num_layers // 2))
        spec = ScoringSpec(layer=layer, heads=tuple(meta.get("heads", ())),
                           block_tokens=int(meta.get("block_tokens", 160)))
        return TenantSettings(spec, meta.get("fusion_weight"), name)

    def _spec_of(self, tenant: str) -> ScoringSpec:
        return self._settings[tenant].spec

    def _calibration(self) -> list[Prompt]:
        builder = self._builder(CALIBRATION_BLOCK_TOKENS)
        return [builder.build(query, docs) for query, docs in CALIBRATION]

    def _schedule_check(self, tenant: str) -> None:
        mode = self.config.equivalence
        if mode == "off":
            return
        if mode == "sync":
            self._check(tenant)
            return
        self._pending = [f for f in self._pending if not f.done()]
        self._pending.append(self._checks.submit(self._check, tenant))

    def _check(self, tenant: str) -> None:
        try:
            self.checker.check_tenant(tenant)
        except UnknownTenant:
            pass  # unloaded before its check ran
        except Exception:  # noqa: BLE001 - a failed check only means no substitution
            log.exception("equivalence check of tenant %r failed", tenant)


def minmax(values: Sequence[float]) -> list[float]:
    low, high = min(values), max(values)
    return [0.0] * len(values) if high <= low else [(v - low) / (high - low) for v in values]


def fuse(model_scores: Sequence[float], first_stage: Sequence[float], weight: float) -> list[float]:
    """Convex mix of per-request min-max normalised scores; weight 1 = the reranker alone."""
    return [weight * m + (1 - weight) * f for m, f in zip(minmax(model_scores), minmax(first_stage), strict=True)]


def rank_scores(scores: Sequence[float], top_n: int | None = None,
                model_scores: Sequence[float] | None = None) -> list[RankedResult]:
    """Best first; ties keep the input order (stable), so equal scores never reshuffle."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    if top_n:
        order = order[:top_n]
    own = model_scores if model_scores is not None else scores
    return [RankedResult(i, float(scores[i]), float(own[i])) for i in order]


def _as_pair(document: DocumentInput) -> tuple[str, str]:
    if isinstance(document, tuple):
        return document[0] or "", document[1] or ""
    return "", document




