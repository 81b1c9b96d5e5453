"""The retrieval engine: named collections, each searched densely (the embedder's vectors), lexically
(BM25) or both fused (retriever.fusion). Where the collections live is a backend (retriever.backend): the
local one (SQLite + FAISS + tantivy) or Milvus; the engine embeds, validates and fuses the same on both.

Thread-safe; every method may block (embedding, disk, index work, Milvus calls), so async callers run
them in a worker thread. Errors are `retriever.types.RetrieverError` subclasses.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from common.tracing import stage
from common.types import Document
from retriever.backend import Backend, Ranked, StoredCollection
from retriever.collection import Collection, LocalBackend
from retriever.embedder import Embedder
from retriever.fusion import FusedHit, FusionSettings, RetrievalMode, fuse
from retriever.types import (
    CollectionExists,
    CollectionNotFound,
    CollectionSpec,
    CollectionStats,
    Hit,
    HnswSettings,
    IndexKind,
    InvalidArgument,
    Retrieved,
    UpsertResult,
)

log = logging.getLogger(__name__)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


@dataclass(frozen=True)
class Limits:
    max_top_k: int = 1000  # largest top_k a Retrieve may ask for
    max_query_chars: int = 20_000  # longer queries are refused
    max_documents_per_upsert: int = 10_000  # documents in one UpsertDocuments
    max_document_chars: int = 1_000_000  # title + text of one document


class RetrieverEngine:
    def __init__(self, backend: Backend | Path | str, embedder: Embedder, limits: Limits = Limits()) -> None:
        """`backend`: where collections live; a directory means the local backend (SQLite + FAISS + tantivy)."""
        self.backend: Backend = LocalBackend(Path(backend)) if isinstance(backend, Path | str) else backend
        self.embedder = embedder
        self.limits = limits
        self._collections: dict[str, StoredCollection] = {}
        self._lock = threading.Lock()

    def load(self) -> None:
        """Open every collection the backend holds."""
        for collection in self.backend.load_all():
            self._collections[collection.spec.name] = collection
            log.info("loaded collection %s (%d docs, %s backend)", collection.spec.name,
                     collection.stats().document_count, self.backend.name)

    def __enter__(self) -> RetrieverEngine:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Checkpoint and release every collection (one process writes a data directory at a time)."""
        with self._lock:
            for collection in self._collections.values():
                collection.close()
            self.backend.close()

    # ---- collections ---------------------------------------------------------
    def create_collection(self, name: str, index: IndexKind = IndexKind.FLAT, hnsw: HnswSettings | None = None,
                          default_mode: RetrievalMode = RetrievalMode.HYBRID,
                          fusion: FusionSettings | None = None) -> CollectionStats:
        if not _NAME.match(name):
            raise InvalidArgument(f"collection name {name!r} must match {_NAME.pattern}")
        spec = CollectionSpec(name=name, dimension=self.embedder.dimension, index=index,
                              hnsw=hnsw or HnswSettings(), default_mode=default_mode, fusion=fusion or FusionSettings())
        with self._lock:
            if name in self._collections:
                raise CollectionExists(f"collection {name!r} already exists")
            collection = self.backend.create(spec)
            self._collections[name] = collection
        return collection.stats()

    def delete_collection(self, name: str) -> None:
        with self._lock:
            collection = self._collections.pop(name, None)
        if collection is None:
            raise CollectionNotFound(f"collection {name!r} not found")
        self.backend.drop(collection)

    def list_collections(self) -> list[CollectionStats]:
        with self._lock:
            collections = list(self._collections.values())
        return sorted((c.stats() for c in collections), key=lambda s: s.spec.name)

    def get_stats(self, name: str) -> CollectionStats:
        return self._get(name).stats()

    def lexical_write_seconds(self, name: str) -> float:
        """Time the collection's lexical index has spent on writes since it was opened (local backend)."""
        collection = self._get(name)
        if not isinstance(collection, Collection):
            raise InvalidArgument(f"the {self.backend.name} backend does not time its lexical writes")
        return collection.lexical_write_seconds

    def update_collection(self, name: str, default_mode: RetrievalMode | None = None,
                          fusion: FusionSettings | None = None) -> CollectionStats:
        """Change the default mode and/or the fusion settings (None keeps them); persisted."""
        collection = self._get(name)
        collection.update_settings(default_mode, fusion)
        return collection.stats()

    # ---- documents -----------------------------------------------------------
    def upsert(self, name: str, documents: Sequence[Document], progress: bool = False) -> UpsertResult:
        """Add or replace documents. One with neither title nor text could never match: it is not stored,
        and an earlier version under its id is removed; its id is reported in `skipped`."""
        collection = self._get(name)
        self._check_documents(documents)
        kept = [d for d in documents if d.embedding_text()]
        skipped = [d.id for d in documents if not d.embedding_text()]
        if kept:
            vectors = self.embedder.encode([d.embedding_text() for d in kept], progress=progress)
            collection.upsert(kept, vectors)
        if skipped:
            collection.delete(skipped)
        return UpsertResult(len(kept), skipped)

    def delete(self, name: str, ids: Sequence[str]) -> tuple[list[str], list[str]]:
        """Returns (deleted ids, ids that were not present)."""
        collection = self._get(name)
        if not ids:
            raise InvalidArgument("ids must not be empty")
        if any(not i for i in ids):
            raise InvalidArgument("ids must not contain an empty id")
        deleted = collection.delete(ids)
        gone = set(deleted)
        return deleted, [i for i in dict.fromkeys(ids) if i not in gone]

    def get(self, name: str, ids: Sequence[str]) -> tuple[list[Document], list[str]]:
        """(the documents held under these ids, in the order asked, each once; the ids not held)."""
        collection = self._get(name)
        if not ids:
            raise InvalidArgument("ids must not be empty")
        wanted = list(dict.fromkeys(ids))
        found = collection.get(wanted)
        held = {d.id for d in found}
        return found, [i for i in wanted if i not in held]

    def search(self, name: str, query: str, top_k: int, mode: RetrievalMode | None = None) -> Retrieved:
        """Top-k hits of one query; `mode` None = the collection's default."""
        collection = self._get(name)
        used = mode or collection.spec.default_mode
        return Retrieved(self.search_batch(name, [query], top_k, used)[0], used, collection.spec.fusion)

    def search_batch(self, name: str, queries: Sequence[str], top_k: int,
                     mode: RetrievalMode | None = None) -> list[list[Hit]]:
        collection = self._get(name)
        self._check_queries(queries, top_k)
        mode = mode or collection.spec.default_mode
        fusion = collection.spec.fusion
        depth = max(top_k, fusion.candidate_depth) if mode is RetrievalMode.HYBRID else top_k
        dense: list[Ranked] = [[] for _ in queries]
        if mode is not RetrievalMode.LEXICAL:
            with stage("embed", queries=len(queries)):
                vectors = self.embedder.encode(list(queries))
            with stage("dense_search", depth=depth, collection=name):
                dense = collection.search_dense(vectors, depth)
        lexical: list[Ranked] = [[] for _ in queries]
        if mode is not RetrievalMode.DENSE:
            with stage("lexical_search", depth=depth, collection=name):
                lexical = [collection.search_lexical(q, depth) for q in queries]
        with stage("fusion", mode=mode.name.lower()):
            ranked = [self._ranked(d, lx, mode, fusion, top_k) for d, lx in zip(dense, lexical, strict=True)]
        # Text comes from the store after the search: a document deleted in between is left out.
        with stage("fetch_texts", documents=sum(len(hits) for hits in ranked)):
            held = {d.id: d for d in collection.get([h.id for hits in ranked for h in hits])}
        return [[Hit(held[h.id], h.score, dense_score=h.dense, lexical_score=h.lexical) for h in hits
                 if h.id in held] for hits in ranked]

    @staticmethod
    def _ranked(dense: Sequence[tuple[str, float]], lexical: Sequence[tuple[str, float]], mode: RetrievalMode,
                fusion: FusionSettings, top_k: int) -> list[FusedHit]:
        if mode is RetrievalMode.DENSE:
            return [FusedHit(i, s, dense=s, lexical=None) for i, s in dense]
        if mode is RetrievalMode.LEXICAL:
            return [FusedHit(i, s, dense=None, lexical=s) for i, s in lexical]
        return fuse(dense, lexical, fusion, top_k)

    def _check_queries(self, queries: Sequence[str], top_k: int) -> None:
        for query in queries:
            if not query.strip():
                raise InvalidArgument("query must not be empty")
            if len(query) > self.limits.max_query_chars:
                raise InvalidArgument(f"query longer than {self.limits.max_query_chars} characters")
        if not 1 <= top_k <= self.limits.max_top_k:
            raise InvalidArgument(f"top_k must be in 1..{self.limits.max_top_k}, got {top_k}")

    # ---- helpers -------------------------------------------------------------
    def _get(self, name: str) -> StoredCollection:
        if not name:
            raise InvalidArgument("collection must be set")
        with self._lock:
            collection = self._collections.get(name)
        if collection is None:
            raise CollectionNotFound(f"collection {name!r} not found")
        return collection

    def _check_documents(self, documents: Sequence[Document]) -> None:
        if not documents:
            raise InvalidArgument("documents must not be empty")
        if len(documents) > self.limits.max_documents_per_upsert:
            raise InvalidArgument(f"at most {self.limits.max_documents_per_upsert} documents per upsert")
        seen: set[str] = set()
        for position, doc in enumerate(documents):
            if not doc.id:
                raise InvalidArgument(f"documents[{position}] has no id")
            if doc.id in seen:
                raise InvalidArgument(f"document id {doc.id!r} appears twice in one request")
            seen.add(doc.id)
            if len(doc.title) + len(doc.text) > self.limits.max_document_chars:
                raise InvalidArgument(f"document {doc.id!r} is longer than {self.limits.max_document_chars} chars")
