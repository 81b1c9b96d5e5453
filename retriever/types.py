"""Plain data types of the retrieval engine (protobuf lives only in services/)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class IndexKind(str, Enum):
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


@dataclass
class Document:
    id: str
    title: str = ""
    text: str = ""
    metadata: dict[str, str] = field(default_factory=dict)

    def embedding_text(self) -> str:
        """What the embedder sees: title and body, as BEIR evaluates dense models."""
        return f"{self.title} {self.text}".strip()


@dataclass(frozen=True)
class Hit:
    document: Document
    score: float


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
