"""Move a collection between storage backends: documents, their stored vectors (no re-embedding), the
collection's settings. The source is left as it was; delete it once the target serves.

    python -m retriever.migrate --collection docs --source faiss:var/retriever --target milvus:var/milvus.db
    python -m retriever.migrate --collection docs --source milvus:http://milvus:19530 --target faiss:var/retriever

A backend is `faiss:DATA_DIR` or `milvus:URI` (a Milvus Lite file or a server; credentials in
MILVUS_TOKEN). Stop the retriever that serves a faiss data directory first: one process writes it at a
time. The copy is checked: the target must hold as many documents as the source.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from tqdm.auto import tqdm

from retriever.backend import Backend, StoredCollection
from retriever.backends import BackendKind, open_backend

log = logging.getLogger(__name__)


def parse_backend(text: str) -> Backend:
    kind, _, location = text.partition(":")
    if kind not in {k.value for k in BackendKind} or not location:
        raise ValueError(f"{text!r}: expected faiss:DATA_DIR or milvus:URI")
    if BackendKind(kind) is BackendKind.MILVUS:
        return open_backend(BackendKind.MILVUS, Path("."), location, os.environ.get("MILVUS_TOKEN", ""))
    return open_backend(BackendKind.FAISS, Path(location))


def migrate(source: Backend, target: Backend, name: str, target_name: str = "", batch_size: int = 1024) -> int:
    """Copy collection `name` of `source` into `target` (as `target_name`, by default the same); returns the
    number of documents copied. Refuses a target collection that already exists."""
    collections = source.load_all()
    try:
        found = [c for c in collections if c.spec.name == name]
        if not found:
            raise ValueError(f"collection {name!r} not found in the {source.name} backend")
        return _copy(found[0], target, target_name or name, batch_size)
    finally:
        for collection in collections:
            collection.close()


def _copy(collection: StoredCollection, target: Backend, name: str, batch_size: int) -> int:
    total = collection.stats().document_count
    if any(c.spec.name == name for c in _closed_after(target.load_all())):
        raise ValueError(f"collection {name!r} already exists in the {target.name} backend")
    copy = target.create(replace(collection.spec, name=name))
    try:
        with tqdm(total=total, desc=f"migrate {collection.spec.name}", unit="doc") as bar:
            for documents, vectors in collection.export(batch_size):
                copy.upsert(documents, vectors)
                bar.update(len(documents))
        copied = copy.stats().document_count
    finally:
        copy.close()
    if copied != total:
        raise RuntimeError(f"the target holds {copied} documents, the source {total}")
    log.info("collection %s: %d documents copied to the %s backend as %s", collection.spec.name, copied,
             target.name, name)
    return copied


def _closed_after(collections: Sequence[StoredCollection]) -> Sequence[StoredCollection]:
    for collection in collections:
        collection.close()
    return collections


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--collection", required=True)
    parser.add_argument("--source", required=True, help="faiss:DATA_DIR or milvus:URI")
    parser.add_argument("--target", required=True, help="faiss:DATA_DIR or milvus:URI")
    parser.add_argument("--target-name", default="", help="the collection's name in the target (default: same)")
    parser.add_argument("--batch-size", type=int, default=1024)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    source, target = parse_backend(args.source), parse_backend(args.target)
    try:
        count = migrate(source, target, args.collection, args.target_name, args.batch_size)
    finally:
        source.close()
        target.close()
    print(f"{args.collection}: {count} documents moved from {args.source} to {args.target}")


if __name__ == "__main__":
    main()
