"""A FAISS index keyed by string ids.

FAISS stores int64 labels; we hand out a fresh label per stored vector and keep
the string<->label maps here. A deleted or replaced label becomes a tombstone, for
both kinds: removing from a flat index in place is a pass over all its vectors (and
IndexIDMap2 rebuilds its reverse map), so a write would cost what the collection
holds; HNSW graphs cannot delete at all. Searches skip tombstones through an ID
selector (a bitmap over the labels; no over-fetching), and once tombstones pass a fraction of the index it is
compacted: flat in one removal pass, HNSW rebuilt from its own stored vectors
(amortised over the deletes that led to it).

Not thread-safe: the collection serialises writers and keeps searches out while one
mutates (retriever.collection).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import faiss
import numpy as np

from retriever.types import HnswSettings, IndexKind

REBUILD_TOMBSTONE_FRACTION = 0.2
# faiss's stubs miss SearchParametersHNSW, the parameters' keyword arguments and the selectors' array constructors
_faiss: Any = faiss

# A few queries search faster on one OpenMP thread: a team of threads for one query costs more to wake and
# join than it saves (measured on the 2-core CI machine, one query, top-100: 5K vectors 0.13 ms on one
# thread, 8 ms on two when woken from the main thread; 1M vectors 60 ms on one, 141 ms on two). Searches
# run in parallel across requests instead. The setting is per calling thread, so it is made per search.
_SMALL_BATCH = 64
_CORES = faiss.omp_get_max_threads()


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
        self._skip_tombstones: Any = None  # the ID selector searches use (None: no tombstones)
        self._tombstone_bits: np.ndarray | None = None  # what it reads: bit `label` set for each tombstone

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
        if labels:
            self.tombstones.update(labels)
            if len(self.tombstones) > REBUILD_TOMBSTONE_FRACTION * max(len(self.label_of), 1):
                self._compact()
                self._refresh_tombstone_selector()
            else:
                self._refresh_tombstone_selector(added=labels)
        return present

    def search(self, queries: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        """Top-k (id, score) per query row, best first."""
        if not self.label_of:
            return [[] for _ in range(len(queries))]
        fetch = min(k, len(self.label_of))
        faiss.omp_set_num_threads(1 if len(queries) < _SMALL_BATCH else _CORES)
        scores, labels = self.faiss_index.search(np.ascontiguousarray(queries, dtype=np.float32), fetch,
                                                 params=self._search_parameters())
        return [[(self.id_of[label], float(score)) for score, label in zip(row_scores, row_labels, strict=True)
                 if label >= 0] for row_scores, row_labels in zip(scores, labels, strict=True)]

    def _refresh_tombstone_selector(self, added: list[int] | None = None) -> None:
        """Built where tombstones change (under the collection's write lock), so searches only read it:
        one changed during a search could be replaced, and freed, under another search still using it.
        A bitmap over the labels (bit set: tombstone), copied and extended by each write rather than set in
        place, so a search keeps the one it started with (the selector holds its array). A write costs a copy
        of next_label / 8 bytes plus its own labels: 0.03 ms at 1M labels with 200K tombstones (the most that
        build up before compaction), where rebuilding a hash set of every tombstone (IDSelectorBatch) took
        37 ms per write."""
        if not self.tombstones:
            self._tombstone_bits = self._skip_tombstones = None
            return
        bits = np.zeros((self.next_label + 7) // 8, dtype=np.uint8)
        previous = self._tombstone_bits
        if added is not None and previous is not None:
            bits[: len(previous)] = previous
            marked = np.asarray(added, dtype=np.int64)
        else:
            marked = self._tombstone_labels()
        np.bitwise_or.at(bits, marked >> 3, np.left_shift(1, marked & 7).astype(np.uint8))
        self._tombstone_bits = bits
        self._skip_tombstones = faiss.IDSelectorNot(_faiss.IDSelectorBitmap(bits))

    def _tombstone_labels(self) -> np.ndarray:
        return np.fromiter(self.tombstones, dtype=np.int64, count=len(self.tombstones))

    def _search_parameters(self) -> Any:
        """A fresh object per search: IndexIDMap swaps its selector in place for the duration of a search,
        so concurrent searches cannot share one (the selector itself is read-only and shared)."""
        selector = self._skip_tombstones
        if self.kind is IndexKind.HNSW:
            graph: Any = faiss.downcast_index(self.faiss_index.index)
            return _faiss.SearchParametersHNSW(sel=selector, efSearch=graph.hnsw.efSearch)
        return _faiss.SearchParameters(sel=selector)

    def _compact(self) -> None:
        if self.kind is IndexKind.FLAT:
            self.faiss_index.remove_ids(self._tombstone_labels())
            self.tombstones.clear()
            return
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
    def snapshot(self) -> tuple[Any, dict[str, Any]]:
        """(a copy of the faiss index, the label state), taken while no writer mutates the index; the copy is
        then written with `faiss.write_index` at leisure. A clone is a memory copy (0.8 s for 1M vectors
        here), where `serialize_index` takes 8.9 s: a checkpoint makes writers wait only for the clone."""
        state = {"labels": dict(self.label_of), "tombstones": sorted(self.tombstones), "next_label": self.next_label}
        return faiss.clone_index(self.faiss_index), state

    def restore(self, path: str, state: dict[str, Any]) -> None:
        """Load what `snapshot` gave (its index written to `path`, the state as given)."""
        self.faiss_index = faiss.read_index(path)
        if self.kind is IndexKind.HNSW:
            self.set_ef_search(self.hnsw.ef_search)
        self.label_of = {doc_id: int(label) for doc_id, label in state["labels"].items()}
        self.id_of = {label: doc_id for doc_id, label in self.label_of.items()}
        self.tombstones = set(state["tombstones"])
        self.next_label = int(state["next_label"])
        self._refresh_tombstone_selector()
