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
from dataclasses import dataclass, field
from pathlib import Path

import torch

from reranker.blockrank import BlockRankForward, ScoringSpec
from reranker.errors import RerankInputError
from reranker.model import LoadedModel, load_model
from reranker.prompt import Prompt, PromptBuilder, PromptLimits, PromptTemplate

log = logging.getLogger(__name__)
SCORING_DIR = Path(__file__).resolve().parent / "scoring"
DEFAULT_ADAPTER = Path(__file__).resolve().parent / "adapters" / "scifact-lora"
ADAPTER_META = "blockrank.json"  # scoring layer/heads, fusion weight and training record of an adapter

DocumentInput = str | tuple[str, str]  # text, or (title, text)


@dataclass(frozen=True)
class RerankerConfig:
    model_path: str = ""  # empty: bundled SmolLM2-135M-Instruct (GGUF)
    # "default": the shipped fine-tuned LoRA when it exists for this base model; "none": the base model;
    # or a PEFT adapter directory (with blockrank.json beside the weights).
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
    """Fold the LoRA deltas into the weights: one tenant per process costs nothing at inference."""
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
    def __init__(self, config: RerankerConfig = RerankerConfig(), loaded: LoadedModel | None = None) -> None:
        self.config = config
        self.lm = loaded or load_model(config.model_path, config.device, config.dtype)
        self.adapter = resolve_adapter(config.adapter, self.lm.name)
        meta: dict = {}
        if self.adapter is not None:
            self.lm.model = merge_adapter(self.lm.model, self.adapter)
            meta = json.loads((self.adapter / ADAPTER_META).read_text())
            choice = ScoringChoice(layer=int(meta["layer"]), heads=tuple(meta.get("heads", ())),
                                   source=str(self.adapter), notes=meta)
        else:
            choice = load_scoring_choice(self.lm.name, self.lm.model.config.num_hidden_layers)
        self.forward = BlockRankForward(self.lm.model)
        self.fusion_weight: float | None = choice.notes.get("fusion_weight")
        block_tokens = config.block_tokens or int(meta.get("block_tokens", 160))
        layer = config.scoring_layer if config.scoring_layer >= 0 else choice.layer
        heads = config.scoring_heads or choice.heads
        self.spec = ScoringSpec(layer=layer, heads=tuple(heads), block_tokens=block_tokens)
        self.prompts = PromptBuilder(self.lm.tokenizer, PromptTemplate(),
                                     PromptLimits(block_tokens=block_tokens,
                                                  max_query_tokens=config.max_query_tokens))
        self._lock = threading.Lock()  # one forward at a time; the batcher merges requests instead
        log.info("reranker %s%s: scoring layer %d/%d, heads %s (%s), block %d tokens, fusion weight %s",
                 self.lm.name, f" + {self.adapter.name}" if self.adapter else "", layer, self.forward.num_layers,
                 list(heads) or "all", choice.source if config.scoring_layer < 0 else "config", block_tokens,
                 self.fusion_weight)

    @property
    def model_name(self) -> str:
        return self.lm.name + (f"+{self.adapter.name}" if self.adapter else "")

    def build_prompt(self, query: str, documents: Sequence[DocumentInput]) -> Prompt:
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
        return self.prompts.build(query, pairs)

    def score_prompts(self, prompts: Sequence[Prompt]) -> list[list[float]]:
        """Scores for several prompts in one block-sparse pass (documents of all prompts batched)."""
        with self._lock:
            scores = self.forward.score(prompts, self.spec)
        return [s.float().cpu().tolist() for s in scores]

    def rank(self, query: str, documents: Sequence[DocumentInput], top_n: int | None = None,
             first_stage_scores: Sequence[float] | None = None) -> list[RankedResult]:
        scores = self.score_prompts([self.build_prompt(query, documents)])[0]
        return self.ranked(scores, first_stage_scores, top_n)

    def ranked(self, model_scores: Sequence[float], first_stage_scores: Sequence[float] | None,
               top_n: int | None = None) -> list[RankedResult]:
        """Rank by the fused score when first-stage scores and a fusion weight exist, else by the model's."""
        if first_stage_scores is not None and len(first_stage_scores) != len(model_scores):
            raise RerankInputError(f"{len(first_stage_scores)} first-stage scores for {len(model_scores)} documents")
        served = model_scores
        if first_stage_scores and self.fusion_weight is not None:
            served = fuse(model_scores, first_stage_scores, self.fusion_weight)
        return rank_scores(served, top_n, model_scores)

    @property
    def fuses(self) -> bool:
        return self.fusion_weight is not None


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




