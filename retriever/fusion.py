"""Hybrid retrieval: fusing a dense and a lexical candidate list into one ranking (pure functions).

Convex combination of min-max normalised scores is the default: Bruch, Gai and Ingber ("An Analysis of
Fusion Functions for Hybrid Retrieval", TOIS 2023) find it better than reciprocal rank fusion in and out of
domain, and it needs a single weight, which `deploy.fit_fusion` fits on a collection's train queries. RRF
(Cormack et al., SIGIR 2009; k = 60) is the option that needs no scores at all.

Each side retrieves `candidate_depth` documents (at least top_k). A document only one side retrieved counts
0 on the other side after normalisation: below everything that side did retrieve.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from common.scores import minmax

# A collection without fitted weights (deploy.fit_fusion) is fused at this dense weight, chosen by
# deploy.hybrid_default on tuning splits only (SciFact train, NFCorpus dev): the weight whose worse collection's
# margin over its better single stage is largest (0.55; 0.50 is within 0.0034 of it on both). Stored with each
# collection when it is created, so changing it does not move existing collections.
DEFAULT_DENSE_WEIGHT = 0.55
DEFAULT_CANDIDATE_DEPTH = 100
DEFAULT_RRF_K = 60

Ranked = Sequence[tuple[str, float]]  # (document id, score), best first


class RetrievalMode(StrEnum):
    DENSE = "dense"
    LEXICAL = "lexical"
    HYBRID = "hybrid"


class FusionMethod(StrEnum):
    CONVEX = "convex"
    RRF = "rrf"


@dataclass(frozen=True)
class FusionSettings:
    method: FusionMethod = FusionMethod.CONVEX
    dense_weight: float = DEFAULT_DENSE_WEIGHT  # convex: the dense side's weight, 0..1
    candidate_depth: int = DEFAULT_CANDIDATE_DEPTH  # candidates each side retrieves (at least top_k)
    rrf_k: int = DEFAULT_RRF_K
    rerank_weight: float | None = None  # the reranker's weight against this first stage, when fitted

    def __post_init__(self) -> None:
        if not 0.0 <= self.dense_weight <= 1.0:
            raise ValueError(f"dense_weight must be in 0..1, got {self.dense_weight}")
        if self.rerank_weight is not None and not 0.0 <= self.rerank_weight <= 1.0:
            raise ValueError(f"rerank_weight must be in 0..1, got {self.rerank_weight}")
        if self.candidate_depth < 1 or self.rrf_k < 1:
            raise ValueError("candidate_depth and rrf_k must be >= 1")


@dataclass(frozen=True)
class FusedHit:
    id: str
    score: float  # what the fused list is ordered by
    dense: float | None  # the side's own score, when it retrieved the document
    lexical: float | None


def fuse(dense: Ranked, lexical: Ranked, settings: FusionSettings, top_k: int) -> list[FusedHit]:
    """The union of both lists, ordered by the fused score (ties: dense order, then lexical order)."""
    dense_scores, lexical_scores = dict(dense), dict(lexical)
    if settings.method is FusionMethod.RRF:
        fused = _rrf(dense, lexical, settings.rrf_k)
    else:
        fused = _convex(dense, lexical, settings.dense_weight)
    order = list(dict.fromkeys([doc_id for doc_id, _ in dense] + [doc_id for doc_id, _ in lexical]))
    position = {doc_id: i for i, doc_id in enumerate(order)}
    ranked = sorted(order, key=lambda doc_id: (-fused[doc_id], position[doc_id]))[:top_k]
    return [FusedHit(i, fused[i], dense_scores.get(i), lexical_scores.get(i)) for i in ranked]


def _convex(dense: Ranked, lexical: Ranked, weight: float) -> dict[str, float]:
    fused: dict[str, float] = {}
    for side, side_weight in ((dense, weight), (lexical, 1.0 - weight)):
        for doc_id, value in _minmax(side).items():
            fused[doc_id] = fused.get(doc_id, 0.0) + side_weight * value
    for doc_id, _ in [*dense, *lexical]:
        fused.setdefault(doc_id, 0.0)
    return fused


def _rrf(dense: Ranked, lexical: Ranked, k: int) -> dict[str, float]:
    fused: dict[str, float] = {}
    for side in (dense, lexical):
        for rank, (doc_id, _) in enumerate(side, start=1):
            fused[doc_id] = fused.get(doc_id, 0.0) + 1.0 / (k + rank)
    return fused


def _minmax(side: Ranked) -> dict[str, float]:
    """One candidate, or all tied: all at the top of their side."""
    return dict(zip((doc_id for doc_id, _ in side), minmax([score for _, score in side], flat=1.0), strict=True))
