"""Collections written by earlier versions as whole snapshots (CURRENT -> snap-N/ with spec.json,
documents.jsonl and index.faiss), converted into a document store on their first load."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from common.files import fsync_dir
from common.types import Document
from retriever.store import DocumentStore, Write
from retriever.types import CollectionSpec, spec_from_json, spec_to_json

log = logging.getLogger(__name__)
LEGACY_CURRENT = "CURRENT"


def convert_snapshot_layout(directory: Path, store_name: str, lexical_name: str) -> None:
    """Move a collection written as whole snapshots (CURRENT -> snap-N/) into a document store. The store
    is built beside and renamed into place, so a crash leaves the snapshot (converted again) or the store
    (leftovers removed); the vectors come from the snapshot's FAISS index."""
    name = (directory / LEGACY_CURRENT).read_text().strip()
    snapshot = directory / name
    if not (directory / store_name).exists() and snapshot.exists():
        spec = spec_from_json(json.loads((snapshot / "spec.json").read_text()))
        log.info("collection %s: converting snapshot %s to a document store", spec.name, name)
        tmp = directory / f"{store_name}.tmp"
        tmp.unlink(missing_ok=True)
        store = DocumentStore(tmp)
        store.set_meta("spec", json.dumps(spec_to_json(spec)))
        documents, vectors = _read_snapshot(snapshot, spec)
        if documents:
            store.commit([Write(upserts=documents, vectors=vectors)])
        store.close()
        os.replace(tmp, directory / store_name)
        fsync_dir(directory)
    for leftover in [*directory.glob("snap-*"), directory / lexical_name]:
        shutil.rmtree(leftover, ignore_errors=True)
    (directory / LEGACY_CURRENT).unlink(missing_ok=True)
    fsync_dir(directory)


def _read_snapshot(snapshot: Path, spec: CollectionSpec) -> tuple[list[Document], np.ndarray]:
    index: Any = faiss.read_index(str(snapshot / "index.faiss"))
    documents, labels = [], []
    with open(snapshot / "documents.jsonl", encoding="utf-8") as rows:
        for line in rows:
            row = json.loads(line)
            labels.append(row.pop("label"))
            documents.append(Document(**row))
    vectors = index.reconstruct_batch(np.asarray(labels, dtype=np.int64)) if labels else \
        np.zeros((0, spec.dimension), np.float32)
    return documents, vectors
