"""A FAISS index keyed by string ids.

FAISS stores int64 labels; we hand out a fresh label per stored vector and keep
the string<->label maps here. Flat indexes delete in place (`remove_ids`).
HNSW graphs cannot delete, so a deleted or replaced label becomes a tombstone:
searches ask for extra neighbours and drop tombstones, and the graph is rebuilt
from its own stored vectors once tombstones pass a fraction of the index.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import faiss
import numpy as np

from retriever.types import HnswSettings, IndexKind

REBUILD_TOMBSTONE_FRACTION = 0.2


class StringIdIndex:
    def __init__(self, dimension: int, kind: IndexKind, hnsw: HnswSettings) -> None:
        self.dimension = dimension
        self.kind = kind
        self.hnsw = hnsw
        # faiss's stubs miss the Python conveniences used here (remove_ids(ndarray), IndexIDMap2.index).
        self.faiss_index: Any = self._empty_index()
        self.label_of: dict[str, int] = {}
        self.id_of: dict[int, str] = {}
        self.tombstones: set[int] = set()
        self.next_label = 0

    def __len__(self) -> int:
        return len(self.label_of)

    def _empty_index(self) -> faiss.Index:
        inner: faiss.Index
        if self.kind is IndexKind.HNSW:
            graph = faiss.IndexHNSWFlat(self.dimension, self.hnsw.m, faiss.METRIC_INNER_PRODUCT)
            graph.hnsw.efConstruction = self.hnsw.ef_construction
            graph.hnsw.efSearch = self.hnsw.ef_search
            inner = graph
        else:
            inner = faiss.IndexFlatIP(self.dimension)
        return faiss.IndexIDMap2(inner)

    def upsert(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        """Add vectors; an id already present is replaced."""
        self.remove([i for i in ids if i in self.label_of])
        labels = np.arange(self.next_label, self.next_label + len(ids), dtype=np.int64)
        self.next_label += len(ids)
        self.faiss_index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), labels)
        for doc_id, label in zip(ids, labels.tolist(), strict=True):
            self.label_of[doc_id] = label
            self.id_of[label] = doc_id

    def remove(self, ids: Sequence[str]) -> list[str]:
        """Remove ids; returns those that were present."""
        present = [i for i in dict.fromkeys(ids) if i in self.label_of]
        labels = [self.label_of.pop(i) for i in present]
        for label in labels:
            del self.id_of[label]
        if labels and self.kind is IndexKind.HNSW:
            self.tombstones.update(labels)
            if len(self.tombstones) > REBUILD_TOMBSTONE_FRACTION * max(len(self.label_of), 1):
                self._rebuild()
        elif labels:
            self.faiss_index.remove_ids(np.asarray(labels, dtype=np.int64))
        return present

    def search(self, queries: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        """Top-k (id, score) per query row, best first."""
        if not self.label_of:
            return [[] for _ in range(len(queries))]
        fetch = min(k + len(self.tombstones), self.faiss_index.ntotal)
        scores, labels = self.faiss_index.search(np.ascontiguousarray(queries, dtype=np.float32), fetch)
        results = []
        for row_scores, row_labels in zip(scores, labels, strict=True):
            hits = [(self.id_of[label], float(score)) for score, label in zip(row_scores, row_labels, strict=True)
                    if label >= 0 and label not in self.tombstones]
            results.append(hits[:k])
        return results

    def _rebuild(self) -> None:
        live = sorted(self.id_of)
        vectors = self.faiss_index.reconstruct_batch(np.asarray(live, dtype=np.int64)) if live else None
        self.faiss_index = self._empty_index()
        self.tombstones.clear()
        if vectors is not None:
            self.faiss_index.add_with_ids(vectors, np.asarray(live, dtype=np.int64))

    def set_ef_search(self, ef: int) -> None:
        """HNSW only: candidates kept per search (recall against speed)."""
        graph: Any = faiss.downcast_index(self.faiss_index.index)
        graph.hnsw.efSearch = ef

    # Persistence: the faiss index plus the label map, restored exactly.
    def write(self, path: str) -> None:
        faiss.write_index(self.faiss_index, path)

    def restore(self, path: str, label_of: dict[str, int], tombstones: set[int], next_label: int) -> None:
        self.faiss_index = faiss.read_index(path)
        if self.kind is IndexKind.HNSW:
            self.set_ef_search(self.hnsw.ef_search)
        self.label_of = dict(label_of)
        self.id_of = {label: doc_id for doc_id, label in label_of.items()}
        self.tombstones = set(tombstones)
        self.next_label = next_label
