"""One collection: its documents, its index, and its on-disk snapshots.

Layout under the collection directory:
    CURRENT              name of the live snapshot (replaced atomically)
    snap-000042/         spec.json, state.json, documents.jsonl, index.faiss
A write builds a new snapshot directory beside the live one, fsyncs it, then
swaps CURRENT with os.replace, so a crash leaves either the old or the new
snapshot, never a torn one. Older snapshots are removed afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from common.types import Document
from retriever.index import StringIdIndex
from retriever.types import CollectionSpec, CollectionStats, Hit, HnswSettings, IndexKind

CURRENT = "CURRENT"


class Collection:
    def __init__(self, spec: CollectionSpec, directory: Path) -> None:
        self.spec = spec
        self.directory = directory
        self.documents: dict[str, Document] = {}
        self.index = StringIdIndex(spec.dimension, spec.index, spec.hnsw)
        self.lock = threading.RLock()
        self._snapshot_seq = 0

    def stats(self) -> CollectionStats:
        return CollectionStats(spec=self.spec, document_count=len(self.documents))

    def upsert(self, documents: Sequence[Document], vectors: np.ndarray) -> None:
        with self.lock:
            self.index.upsert([d.id for d in documents], vectors)
            for doc in documents:
                self.documents[doc.id] = doc
            self.persist()

    def delete(self, ids: Sequence[str]) -> list[str]:
        with self.lock:
            removed = self.index.remove(ids)
            for doc_id in removed:
                del self.documents[doc_id]
            if removed:
                self.persist()
            return removed

    def search(self, query_vectors: np.ndarray, top_k: int) -> list[list[Hit]]:
        with self.lock:
            rows = self.index.search(query_vectors, top_k)
            return [[Hit(self.documents[doc_id], score) for doc_id, score in row] for row in rows]

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
            _write_atomically(self.directory / CURRENT, name)
            _fsync_dir(self.directory)
            for old in self.directory.glob("snap-*"):
                if old.name != name:
                    shutil.rmtree(old, ignore_errors=True)

    def _write_snapshot(self, target: Path) -> None:
        (target / "spec.json").write_text(json.dumps(_spec_to_json(self.spec)))
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
        _fsync_dir(target)

    @classmethod
    def load(cls, directory: Path) -> Collection:
        name = (directory / CURRENT).read_text().strip()
        snapshot = directory / name
        spec = _spec_from_json(json.loads((snapshot / "spec.json").read_text()))
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
        return collection


def _spec_to_json(spec: CollectionSpec) -> dict:
    return {"name": spec.name, "dimension": spec.dimension, "index": spec.index.value, "hnsw": asdict(spec.hnsw)}


def _spec_from_json(data: dict) -> CollectionSpec:
    return CollectionSpec(name=data["name"], dimension=data["dimension"], index=IndexKind(data["index"]),
                          hnsw=HnswSettings(**data["hnsw"]))


def _write_atomically(path: Path, content: str) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
