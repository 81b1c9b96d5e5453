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

from reranker.blockrank import BlockRankForward, ScoringSpec
from reranker.errors import RerankInputError
from reranker.model import LoadedModel, load_model
from reranker.prompt import Prompt, PromptBuilder, PromptLimits, PromptTemplate

log = logging.getLogger(__name__)
SCORING_DIR = Path(__file__).resolve().parent / "scoring"

DocumentInput = str | tuple[str, str]  # text, or (title, text)


@dataclass(frozen=True)
class RerankerConfig:
    model_path: str = ""  # empty: bundled SmolLM2-135M-Instruct (GGUF)
    device: str = "auto"
    dtype: str = "auto"  # fp32 on CPU, bf16/fp16 on CUDA
    block_tokens: int = 160
    max_query_tokens: int = 128
    scoring_layer: int = -1  # -1: from the model's scoring file, else the middle layer
    scoring_heads: tuple[int, ...] = ()  # empty: from the scoring file, else all heads
    max_documents: int = 500
    max_document_tokens: int = 8192  # longer inputs are refused, not silently cut
    max_query_chars: int = 8192


@dataclass(frozen=True)
class RankedResult:
    index: int
    score: float


@dataclass
class ScoringChoice:
    layer: int
    heads: tuple[int, ...] = ()
    source: str = "default"
    notes: dict = field(default_factory=dict)


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
        self.forward = BlockRankForward(self.lm.model)
        choice = load_scoring_choice(self.lm.name, self.forward.num_layers)
        layer = config.scoring_layer if config.scoring_layer >= 0 else choice.layer
        heads = config.scoring_heads or choice.heads
        self.spec = ScoringSpec(layer=layer, heads=tuple(heads), block_tokens=config.block_tokens)
        self.prompts = PromptBuilder(self.lm.tokenizer, PromptTemplate(),
                                     PromptLimits(block_tokens=config.block_tokens,
                                                  max_query_tokens=config.max_query_tokens))
        self._lock = threading.Lock()  # one forward at a time; the batcher merges requests instead
        log.info("reranker %s: scoring layer %d/%d, heads %s (%s)", self.lm.name, layer, self.forward.num_layers,
                 list(heads) or "all", choice.source if config.scoring_layer < 0 else "config")

    @property
    def model_name(self) -> str:
        return self.lm.name

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

    def rank(self, query: str, documents: Sequence[DocumentInput], top_n: int | None = None) -> list[RankedResult]:
        scores = self.score_prompts([self.build_prompt(query, documents)])[0]
        return rank_scores(scores, top_n)


def rank_scores(scores: Sequence[float], top_n: int | None = None) -> list[RankedResult]:
    """Best first; ties keep the input order (stable), so equal scores never reshuffle."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    if top_n:
        order = order[:top_n]
    return [RankedResult(i, float(scores[i])) for i in order]


def _as_pair(document: DocumentInput) -> tuple[str, str]:
    if isinstance(document, tuple):
        return document[0] or "", document[1] or ""
    return "", document




