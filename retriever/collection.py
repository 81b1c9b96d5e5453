"""One collection: its documents, its dense index, its lexical index, and its on-disk snapshots.

Layout under the collection directory:
    CURRENT              name of the live snapshot (replaced atomically)
    snap-000042/         spec.json, state.json, documents.jsonl, index.faiss
    lexical/             the BM25 index (tantivy) and APPLIED, the snapshot number it reflects
A write builds a new snapshot directory beside the live one, fsyncs it, then swaps CURRENT with os.replace,
so a crash leaves either the old or the new snapshot, never a torn one; older snapshots are removed
afterwards. The snapshot is the source of truth: the lexical index is then updated and committed, and a
crash between the two writes is repaired on load (the lexical index is rebuilt from the snapshot's
documents when its APPLIED number is not the snapshot's).

`Collection.lock` guards the documents and both indexes; a write holds it through both index commits, so
a search never sees a document in one index and not the other.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from common.failpoints import failpoint
from common.files import fsync_dir, write_atomically
from common.types import Document
from retriever.fusion import FusionMethod, FusionSettings, RetrievalMode
from retriever.index import StringIdIndex
from retriever.lexical import LexicalIndex
from retriever.types import CollectionSpec, CollectionStats, HnswSettings, IndexKind

log = logging.getLogger(__name__)
CURRENT = "CURRENT"
LEXICAL = "lexical"
Ranked = list[tuple[str, float]]


class Collection:
    def __init__(self, spec: CollectionSpec, directory: Path) -> None:
        self.spec = spec
        self.directory = directory
        self.documents: dict[str, Document] = {}
        self.index = StringIdIndex(spec.dimension, spec.index, spec.hnsw)
        self.lexical = LexicalIndex(directory / LEXICAL)
        self.lock = threading.RLock()
        self._snapshot_seq = 0

    @classmethod
    def create(cls, spec: CollectionSpec, directory: Path) -> Collection:
        """A new, empty collection, written to disk (both indexes at the first snapshot)."""
        collection = cls(spec, directory)
        with collection.lock:
            collection.persist()
            collection.lexical.apply([], [], collection._snapshot_seq)
        return collection

    def stats(self) -> CollectionStats:
        return CollectionStats(spec=self.spec, document_count=len(self.documents))

    def upsert(self, documents: Sequence[Document], vectors: np.ndarray) -> None:
        with self.lock:
            self.index.upsert([d.id for d in documents], vectors)
            for doc in documents:
                self.documents[doc.id] = doc
            self.persist()
            failpoint("collection.between_dense_and_lexical")
            self.lexical.apply(documents, [], self._snapshot_seq)

    def delete(self, ids: Sequence[str]) -> list[str]:
        with self.lock:
            removed = self.index.remove(ids)
            for doc_id in removed:
                del self.documents[doc_id]
            if removed:
                self.persist()
                failpoint("collection.between_dense_and_lexical")
                self.lexical.apply([], removed, self._snapshot_seq)
            return removed

    def update_settings(self, default_mode: RetrievalMode | None, fusion: FusionSettings | None) -> None:
        with self.lock:
            self.spec = replace(self.spec, default_mode=default_mode or self.spec.default_mode,
                                fusion=fusion or self.spec.fusion)
            self.persist()
            self.lexical.apply([], [], self._snapshot_seq)

    def search_dense(self, query_vectors: np.ndarray, k: int) -> list[Ranked]:
        with self.lock:
            return self.index.search(query_vectors, k)

    def search_lexical(self, query: str, k: int) -> Ranked:
        with self.lock:
            return self.lexical.search(query, k)

    def document(self, doc_id: str) -> Document:
        return self.documents[doc_id]

    def close(self) -> None:
        self.lexical.close()

    # ---- persistence -------------------------------------------------------
    def persist(self) -> None:
        with self.lock:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._snapshot_seq += 1
            name = f"snap-{self._snapshot_seq:06d}"
            tmp = self.directory / f"{name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            self._write_snapshot(tmp)
            # A crash after an earlier rename but before its CURRENT swap leaves a snapshot of this name that
            # nothing points to; it is stale, and a directory cannot replace a non-empty one.
            shutil.rmtree(self.directory / name, ignore_errors=True)
            os.replace(tmp, self.directory / name)
            write_atomically(self.directory / CURRENT, name)
            fsync_dir(self.directory)
            for old in self.directory.glob("snap-*"):
                if old.name != name:
                    shutil.rmtree(old, ignore_errors=True)

    def _write_snapshot(self, target: Path) -> None:
        (target / "spec.json").write_text(json.dumps(spec_to_json(self.spec)))
        state = {"next_label": self.index.next_label, "tombstones": sorted(self.index.tombstones)}
        (target / "state.json").write_text(json.dumps(state))
        with open(target / "documents.jsonl", "w", encoding="utf-8") as out:
            for doc in self.documents.values():
                row = asdict(doc) | {"label": self.index.label_of[doc.id]}
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.index.write(str(target / "index.faiss"))
        for path in target.iterdir():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(target)

    @classmethod
    def load(cls, directory: Path) -> Collection:
        name = (directory / CURRENT).read_text().strip()
        snapshot = directory / name
        spec = spec_from_json(json.loads((snapshot / "spec.json").read_text()))
        state = json.loads((snapshot / "state.json").read_text())
        collection = cls(spec, directory)
        labels: dict[str, int] = {}
        with open(snapshot / "documents.jsonl", encoding="utf-8") as rows:
            for line in rows:
                row = json.loads(line)
                labels[row["id"]] = row.pop("label")
                collection.documents[row["id"]] = Document(**row)
        collection.index.restore(str(snapshot / "index.faiss"), labels, set(state["tombstones"]),
                                 state["next_label"])
        collection._snapshot_seq = int(name.split("-")[1])
        collection._repair_lexical()
        return collection

    def _repair_lexical(self) -> None:
        """Rebuild the lexical index when it does not reflect the snapshot: a crash between the two writes,
        or a collection written before lexical indexes existed."""
        applied = self.lexical.applied
        if applied == self._snapshot_seq and len(self.lexical) == len(self.documents):
            return
        log.info("collection %s: building its lexical index from %d documents (index at write %s, collection "
                 "at write %d)", self.spec.name, len(self.documents), applied, self._snapshot_seq)
        docs = tqdm(self.documents.values(), total=len(self.documents), desc=f"lexical index {self.spec.name}",
                    unit="doc", disable=len(self.documents) < 10_000)
        self.lexical.rebuild(docs, self._snapshot_seq)


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
