"""Where collections live: the storage backends behind `retriever.engine.RetrieverEngine`.

Two implement these protocols: the default, local one (`retriever.collection`: SQLite as the source of
truth, FAISS and tantivy as derived indexes) and Milvus (`retriever.milvus`: Milvus Lite in a file, or a
Milvus standalone/cluster); `retriever.backends` opens the one a service is configured with. The engine embeds, validates and fuses; a backend stores documents with their
vectors and answers the two first-stage searches, so modes and fusion behave the same on both.

Every method may block (disk, network, index work): async callers run them in a worker thread. Searches
may run while a write is applied; a document a search found but a concurrent delete removed is simply
absent from `get`, and callers drop such hits.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

import numpy as np

from common.types import Document
from retriever.fusion import FusionSettings, RetrievalMode
from retriever.types import CollectionSpec, CollectionStats

Ranked = list[tuple[str, float]]  # (document id, score), best first


class StoredCollection(Protocol):
    spec: CollectionSpec

    def stats(self) -> CollectionStats: ...

    def upsert(self, documents: Sequence[Document], vectors: np.ndarray) -> None:
        """Add or replace documents (row i of `vectors` is documents[i]'s unit-norm embedding); durable when
        it returns."""

    def delete(self, ids: Sequence[str]) -> list[str]:
        """Remove ids; returns those that were present (each once, in the order given). Durable on return."""

    def get(self, ids: Sequence[str]) -> list[Document]:
        """The documents held under `ids`, in the order asked, each once; ids not held are left out."""

    def search_dense(self, query_vectors: np.ndarray, k: int) -> list[Ranked]:
        """Top-k by inner product per query row."""

    def search_lexical(self, query: str, k: int) -> Ranked:
        """Top-k by BM25; empty when no query term is in the collection's vocabulary."""

    def update_settings(self, default_mode: RetrievalMode | None, fusion: FusionSettings | None) -> None:
        """Change the default mode and/or fusion settings (None keeps them); durable."""

    def export(self, batch_size: int) -> Iterator[tuple[list[Document], np.ndarray]]:
        """Every document with its stored vector, in batches (moving a collection between backends)."""

    def close(self) -> None: ...


class Backend(Protocol):
    name: str  # "faiss" or "milvus"

    def load_all(self) -> Sequence[StoredCollection]:
        """Every collection this backend holds, opened (and repaired, where a crash left work undone)."""

    def create(self, spec: CollectionSpec) -> StoredCollection: ...

    def drop(self, collection: StoredCollection) -> None:
        """Delete the collection and its data (closed first)."""

    def close(self) -> None: ...
