"""The retrieval engine: named collections, each with a dense index (embedder + FAISS) and a lexical one
(BM25), searched alone or fused (retriever.fusion).

Thread-safe; every method may block (embedding, FAISS, tantivy), so async callers run
them in a worker thread. Errors are `retriever.types.RetrieverError` subclasses.
"""

from __future__ import annotations

import logging
import re
import shutil
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from common.types import Document
from retriever.collection import CURRENT, Collection
from retriever.embedder import Embedder
from retriever.fusion import FusionSettings, RetrievalMode, fuse
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
    def __init__(self, data_dir: Path, embedder: Embedder, limits: Limits = Limits()) -> None:
        self.data_dir = Path(data_dir)
        self.embedder = embedder
        self.limits = limits
        self._collections: dict[str, Collection] = {}
        self._lock = threading.Lock()

    def load(self) -> None:
        """Load every persisted collection under the data directory."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        found = sorted(p for p in self.data_dir.iterdir() if (p / CURRENT).exists())
        for directory in tqdm(found, desc="loading collections", unit="collection", disable=not found):
            collection = Collection.load(directory)
            self._collections[collection.spec.name] = collection
            log.info("loaded collection %s (%d docs)", collection.spec.name, len(collection.documents))

    def close(self) -> None:
        """Release the collections' index writers (one process writes a data directory at a time)."""
        with self._lock:
            for collection in self._collections.values():
                collection.close()

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
            collection = Collection.create(spec, self.data_dir / name)
            self._collections[name] = collection
        return collection.stats()

    def delete_collection(self, name: str) -> None:
        with self._lock:
            collection = self._collections.pop(name, None)
        if collection is None:
            raise CollectionNotFound(f"collection {name!r} not found")
        with collection.lock:
            collection.close()
            trash = self.data_dir / f".deleted-{name}-{uuid.uuid4().hex[:8]}"
            collection.directory.rename(trash)  # atomic: a restart never sees half a collection
            shutil.rmtree(trash, ignore_errors=True)

    def list_collections(self) -> list[CollectionStats]:
        with self._lock:
            collections = list(self._collections.values())
        return sorted((c.stats() for c in collections), key=lambda s: s.spec.name)

    def get_stats(self, name: str) -> CollectionStats:
        return self._get(name).stats()

    def lexical_write_seconds(self, name: str) -> float:
        """Time the collection's lexical index has spent on writes since it was opened."""
        return self._get(name).lexical.write_seconds

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
        with collection.lock:
            wanted = list(dict.fromkeys(ids))
            found = [collection.documents[i] for i in wanted if i in collection.documents]
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
        vectors = self.embedder.encode(list(queries)) if mode is not RetrievalMode.LEXICAL else None
        with collection.lock:  # both sides and the documents from one state of the collection
            dense = collection.search_dense(vectors, depth) if vectors is not None else [[] for _ in queries]
            lexical = [collection.search_lexical(q, depth) if mode is not RetrievalMode.DENSE else [] for q in queries]
            return [self._hits(collection, d, lx, mode, fusion, top_k) for d, lx in zip(dense, lexical, strict=True)]

    @staticmethod
    def _hits(collection: Collection, dense: Sequence[tuple[str, float]], lexical: Sequence[tuple[str, float]],
              mode: RetrievalMode, fusion: FusionSettings, top_k: int) -> list[Hit]:
        if mode is RetrievalMode.DENSE:
            return [Hit(collection.document(i), s, dense_score=s) for i, s in dense]
        if mode is RetrievalMode.LEXICAL:
            return [Hit(collection.document(i), s, lexical_score=s) for i, s in lexical]
        return [Hit(collection.document(f.id), f.score, dense_score=f.dense, lexical_score=f.lexical)
                for f in fuse(dense, lexical, fusion, top_k)]

    def _check_queries(self, queries: Sequence[str], top_k: int) -> None:
        for query in queries:
            if not query.strip():
                raise InvalidArgument("query must not be empty")
            if len(query) > self.limits.max_query_chars:
                raise InvalidArgument(f"query longer than {self.limits.max_query_chars} characters")
        if not 1 <= top_k <= self.limits.max_top_k:
            raise InvalidArgument(f"top_k must be in 1..{self.limits.max_top_k}, got {top_k}")

    # ---- helpers -------------------------------------------------------------
    def _get(self, name: str) -> Collection:
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
