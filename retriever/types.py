"""Plain data types of the retrieval engine (protobuf lives only in services/)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from common.types import Document
from retriever.fusion import FusionMethod, FusionSettings, RetrievalMode


class IndexKind(StrEnum):
    FLAT = "flat"  # exact inner product
    HNSW = "hnsw"  # approximate graph search


@dataclass(frozen=True)
class HnswSettings:
    m: int = 32
    ef_construction: int = 200
    ef_search: int = 128


@dataclass(frozen=True)
class CollectionSpec:
    name: str
    dimension: int
    index: IndexKind = IndexKind.FLAT
    hnsw: HnswSettings = field(default_factory=HnswSettings)
    default_mode: RetrievalMode = RetrievalMode.HYBRID
    fusion: FusionSettings = field(default_factory=FusionSettings)


def spec_to_json(spec: CollectionSpec) -> dict[str, Any]:
    fusion = asdict(spec.fusion)
    return {"name": spec.name, "dimension": spec.dimension, "index": spec.index.value, "hnsw": asdict(spec.hnsw),
            "default_mode": spec.default_mode.value, "fusion": fusion | {"method": spec.fusion.method.value}}


def spec_from_json(data: dict[str, Any]) -> CollectionSpec:
    """Snapshots written before hybrid search have no mode or fusion: hybrid with the defaults."""
    fusion = dict(data.get("fusion") or {})
    if "method" in fusion:
        fusion["method"] = FusionMethod(fusion["method"])
    return CollectionSpec(name=data["name"], dimension=data["dimension"], index=IndexKind(data["index"]),
                          hnsw=HnswSettings(**data["hnsw"]),
                          default_mode=RetrievalMode(data.get("default_mode", RetrievalMode.HYBRID.value)),
                          fusion=FusionSettings(**fusion))


@dataclass(frozen=True)
class Hit:
    document: Document
    score: float  # what hits are ordered by: dense, lexical or fused
    dense_score: float | None = None  # cosine, when the dense side retrieved the document
    lexical_score: float | None = None  # BM25, when the lexical side retrieved it


@dataclass(frozen=True)
class Retrieved:
    hits: list[Hit]
    mode: RetrievalMode  # the mode that answered
    fusion: FusionSettings  # the collection's settings (rerank_weight travels on to the reranker)


@dataclass(frozen=True)
class UpsertResult:
    upserted: int
    skipped: list[str]  # ids of documents with neither title nor text (not stored)


@dataclass(frozen=True)
class CollectionStats:
    spec: CollectionSpec
    document_count: int


class RetrieverError(Exception):
    """Base of the engine's errors; services map each subclass to a status code."""


class InvalidArgument(RetrieverError):
    pass


class CollectionNotFound(RetrieverError):
    pass


class CollectionExists(RetrieverError):
    pass
