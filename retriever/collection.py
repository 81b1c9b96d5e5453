"""The default, local backend: one collection per directory, SQLite as the source of truth, FAISS and
tantivy as indexes derived from it.

Layout under the collection directory:
    store.sqlite (-wal, -shm)   documents, vectors, spec; each write numbered (retriever.store)
    dense/CHECKPOINT            the write number of the last dense checkpoint, N
    dense/index-N.faiss, .json  the FAISS index and its id<->label state as of write N
    lexical/                    the BM25 index (tantivy), committed on every write; APPLIED: a write it covers

A write (upsert or delete) is one SQLite transaction, fsynced before the RPC returns (group commit:
writers that arrive while one commits go in the next transaction together), then applied to the FAISS
index in memory and to the tantivy index (one commit per group). Its cost is what it carries, not the
collection's size. Checkpoints run in the background: when the writes since the last one reach a fraction
of the collection (or a time bound passes), the FAISS index is copied and written beside the old one, the
pointer swapped, the lexical index's APPLIED (noted after every commit) fsynced, and tombstones both
cover are purged.

On start: the last dense checkpoint is read and the store's rows after it replayed; the lexical index
replays the rows after its APPLIED (idempotent), or is rebuilt when missing. A crash at any point thus
loses no acknowledged write and leaves no unacknowledged write half applied: the store's transaction is
all or nothing, and both indexes are re-derived from it.

Concurrency: searches take a read lock around the FAISS search only (tantivy searches need none); a
writer takes the write lock only for the in-memory mutation (microseconds to milliseconds for a flat
index), and a checkpoint copies the index while writers, not readers, wait. Collections written by
earlier versions as whole snapshots (CURRENT, snap-N/) are converted on first load.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from tqdm.auto import tqdm

from common.failpoints import failpoint
from common.files import fsync_dir, install, temporary_for, write_atomically
from common.rwlock import ReadWriteLock
from common.types import Document
from retriever.fusion import FusionSettings, RetrievalMode
from retriever.index import StringIdIndex
from retriever.legacy import LEGACY_CURRENT, convert_snapshot_layout
from retriever.lexical import LexicalIndex
from retriever.store import Change, DocumentStore, Write
from retriever.types import CollectionNotFound, CollectionSpec, CollectionStats, spec_from_json, spec_to_json

log = logging.getLogger(__name__)
STORE = "store.sqlite"
DENSE = "dense"
LEXICAL = "lexical"
CHECKPOINT = "CHECKPOINT"
Ranked = list[tuple[str, float]]


@dataclass(frozen=True)
class CheckpointPolicy:
    """When the background checkpointer writes the derived indexes: once the writes since the last
    checkpoint reach `fraction` of the collection (at least `min_changes`), or `max_interval_s` after a
    write. Geometric growth keeps a checkpoint's cost amortised to O(1) per written row; a restart
    replays at most about that fraction."""

    fraction: float = 0.1
    min_changes: int = 1000
    max_interval_s: float = 300.0
    poll_s: float = 1.0


class GroupCommit:
    """Writers queue their writes; whoever takes the lead applies everything queued, in order, as one
    group (one fsync), and each writer returns once its own write is applied."""

    def __init__(self, apply_group: Callable[[list[Write]], None]) -> None:
        self._apply_group = apply_group
        self._queue: list[tuple[Write, Future[None]]] = []
        self._queue_lock = threading.Lock()
        self.leader_lock = threading.Lock()  # held while a group is applied (and by checkpoints)

    def submit(self, write: Write) -> None:
        done: Future[None] = Future()
        with self._queue_lock:
            self._queue.append((write, done))
        with self.leader_lock:
            if not done.done():
                with self._queue_lock:
                    group, self._queue = self._queue, []
                self._lead([w for w, _ in group], [f for _, f in group])
        done.result()

    def _lead(self, writes: list[Write], futures: list[Future[None]]) -> None:
        try:
            self._apply_group(writes)
        except BaseException as error:  # every writer of the group learns it failed
            for future in futures:
                future.set_exception(error)
            return
        for future in futures:
            future.set_result(None)


class Collection:
    """A `retriever.backend.StoredCollection` on local disk."""

    def __init__(self, spec: CollectionSpec, directory: Path, store: DocumentStore,
                 policy: CheckpointPolicy = CheckpointPolicy()) -> None:
        self.spec = spec
        self.directory = directory
        self.store = store
        self.policy = policy
        self.index = StringIdIndex(spec.dimension, spec.index, spec.hnsw)
        self.lexical = LexicalIndex(directory / LEXICAL)
        self._searching = ReadWriteLock()  # FAISS searches (read) against in-memory mutations (write)
        self._commits = GroupCommit(self._apply_group)
        self.applied_seq = 0  # the last write in both indexes
        self.checkpoint_seq = 0  # the last write the on-disk checkpoints cover
        self._last_write = time.monotonic()
        self._closing = threading.Event()
        self._closed = False  # set by close(): calls still in flight (on a deleted collection) get NOT_FOUND
        self._checkpointer: threading.Thread | None = None

    # ---- life cycle ----------------------------------------------------------
    @classmethod
    def create(cls, spec: CollectionSpec, directory: Path, policy: CheckpointPolicy = CheckpointPolicy()
               ) -> Collection:
        directory.mkdir(parents=True)
        (directory / DENSE).mkdir()
        store = DocumentStore(directory / STORE)
        store.set_meta("spec", json.dumps(spec_to_json(spec)))
        fsync_dir(directory)
        collection = cls(spec, directory, store, policy)
        collection.lexical.record_applied(0)
        collection._start_checkpointer()
        return collection

    @classmethod
    def load(cls, directory: Path, policy: CheckpointPolicy = CheckpointPolicy()) -> Collection:
        if (directory / LEGACY_CURRENT).exists():
            convert_snapshot_layout(directory, STORE, LEXICAL)
        store = DocumentStore(directory / STORE)
        collection = cls(spec_from_json(json.loads(store.meta("spec") or "{}")), directory, store, policy)
        collection._restore_dense()
        collection._restore_lexical()
        collection.applied_seq = collection.store.last_seq
        collection._start_checkpointer()
        return collection

    def close(self) -> None:
        """Stop the checkpointer, write a last checkpoint (a fast next start), release the files."""
        self._closing.set()
        if self._checkpointer is not None:
            self._checkpointer.join()
        self.checkpoint()
        with self._commits.leader_lock, self._searching.write():  # in-flight reads and writes finish first
            self._closed = True
        self.lexical.close()
        self.store.close()

    # ---- StoredCollection --------------------------------------------------------
    def stats(self) -> CollectionStats:
        return CollectionStats(spec=self.spec, document_count=len(self.index))

    def upsert(self, documents: Sequence[Document], vectors: np.ndarray) -> None:
        self._commits.submit(Write(upserts=list(documents), vectors=vectors))

    def delete(self, ids: Sequence[str]) -> list[str]:
        write = Write(deletes=list(ids))
        self._commits.submit(write)
        return write.deleted

    def get(self, ids: Sequence[str]) -> list[Document]:
        with self._searching.read():
            self._check_open()
            return self.store.get(ids)

    def search_dense(self, query_vectors: np.ndarray, k: int) -> list[Ranked]:
        with self._searching.read():
            self._check_open()
            return self.index.search(query_vectors, k)

    def _check_open(self) -> None:
        if self._closed:
            raise CollectionNotFound(f"collection {self.spec.name!r} not found")

    def search_lexical(self, query: str, k: int) -> Ranked:
        return self.lexical.search(query, k)

    def update_settings(self, default_mode: RetrievalMode | None, fusion: FusionSettings | None) -> None:
        with self._commits.leader_lock:
            spec = replace(self.spec, default_mode=default_mode or self.spec.default_mode,
                           fusion=fusion or self.spec.fusion)
            self.store.set_meta("spec", json.dumps(spec_to_json(spec)))
            self.spec = spec

    def export(self, batch_size: int) -> Iterator[tuple[list[Document], np.ndarray]]:
        return self.store.live_documents(batch_size)

    @property
    def lexical_write_seconds(self) -> float:
        return self.lexical.write_seconds

    # ---- the write path ----------------------------------------------------------
    def _apply_group(self, writes: list[Write]) -> None:
        self._check_open()
        self.store.commit(writes)  # durable from here: a crash after this replays the group on load
        failpoint("collection.after_store_commit")
        with self._searching.write():
            for write in writes:
                self._apply_dense(write)
        failpoint("collection.between_dense_and_lexical")
        self.lexical.apply(((w.upserts, w.deleted) for w in writes), writes[-1].seq)
        self.applied_seq = writes[-1].seq
        self._last_write = time.monotonic()

    def _apply_dense(self, write: Write) -> None:
        if write.upserts:
            assert write.vectors is not None
            self.index.upsert([d.id for d in write.upserts], write.vectors)
        if write.deleted:
            self.index.remove(write.deleted)

    # ---- checkpoints ---------------------------------------------------------------
    def _start_checkpointer(self) -> None:
        self._checkpointer = threading.Thread(target=self._checkpoint_loop, name=f"checkpoint-{self.spec.name}",
                                              daemon=True)
        self._checkpointer.start()

    def _checkpoint_loop(self) -> None:
        while not self._closing.wait(self.policy.poll_s):
            if self._checkpoint_due():
                try:
                    self.checkpoint()
                except Exception:  # the store still holds every write; the next try may succeed
                    log.exception("collection %s: checkpoint failed", self.spec.name)

    def _checkpoint_due(self) -> bool:
        pending = self.applied_seq - self.checkpoint_seq
        if pending <= 0:
            return False
        changed = self.store.changes_since_count(self.checkpoint_seq)
        threshold = max(self.policy.min_changes, self.policy.fraction * len(self.index))
        return changed >= threshold or time.monotonic() - self._last_write >= self.policy.max_interval_s

    def checkpoint(self) -> None:
        """Write the dense index as of the last applied write, record the lexical index's coverage, purge
        tombstones both cover. Writers wait while the index is copied; searches do not."""
        with self._commits.leader_lock:
            seq = self.applied_seq
            if seq == self.checkpoint_seq:
                return
            copy, state = self.index.snapshot()
        dense = self.directory / DENSE
        index_path = dense / f"index-{seq}.faiss"
        scratch = temporary_for(index_path)
        faiss.write_index(copy, str(scratch))
        install(scratch, index_path)
        write_atomically(dense / f"index-{seq}.json", json.dumps(state))
        failpoint("collection.before_checkpoint_swap")
        write_atomically(dense / CHECKPOINT, str(seq))
        self.lexical.record_applied(seq)  # every write up to seq was committed there before applied_seq moved
        for old in dense.glob("index-*"):
            if old.name.split(".")[0] != f"index-{seq}":
                old.unlink(missing_ok=True)
        with self._commits.leader_lock:
            self.store.purge_tombstones(seq)
        self.checkpoint_seq = seq
        log.info("collection %s: checkpoint at write %d (%d documents)", self.spec.name, seq, len(state["labels"]))

    # ---- recovery --------------------------------------------------------------
    def _restore_dense(self) -> None:
        dense = self.directory / DENSE
        dense.mkdir(exist_ok=True)
        try:
            seq = int((dense / CHECKPOINT).read_text().strip())
        except (OSError, ValueError):
            seq = 0
        if seq:
            state = json.loads((dense / f"index-{seq}.json").read_text())
            self.index.restore(str(dense / f"index-{seq}.faiss"), state)
        self.checkpoint_seq = seq
        replayed = 0
        for changes in self._progress(self.store.changes_after(seq), f"dense replay {self.spec.name}"):
            self._replay_dense(changes)
            replayed += len(changes)
        if replayed:
            log.info("collection %s: %d rows after the dense checkpoint (write %d) replayed", self.spec.name,
                     replayed, seq)

    def _replay_dense(self, changes: list[Change]) -> None:
        live = [c for c in changes if c.vector is not None]
        if live:
            self.index.upsert([c.id for c in live], np.stack([c.vector for c in live if c.vector is not None]))
        gone = [c.id for c in changes if c.document is None]
        if gone:
            self.index.remove(gone)

    def _restore_lexical(self) -> None:
        applied = self.lexical.applied
        if applied is None or applied > self.store.last_seq:
            log.info("collection %s: building its lexical index from %d documents", self.spec.name, len(self.index))
            docs = (d for batch, _ in self.store.live_documents() for d in batch)
            self.lexical.rebuild(tqdm(docs, total=len(self.index), desc=f"lexical index {self.spec.name}",
                                      unit="doc", disable=len(self.index) < 10_000), self.store.last_seq)
            return
        replayed = 0
        for batch in self.store.changes_after(applied):
            self.lexical.apply((([c.document], []) if c.document else ([], [c.id]) for c in batch), batch[-1].seq)
            replayed += len(batch)
        if replayed:
            log.info("collection %s: %d rows after the lexical index's write %d replayed", self.spec.name,
                     replayed, applied)

    def _progress(self, batches: Iterator[list[Change]], desc: str) -> Iterator[list[Change]]:
        pending = self.store.changes_since_count(self.checkpoint_seq)
        bar = tqdm(total=pending, desc=desc, unit="row", disable=pending < 50_000)
        for batch in batches:
            yield batch
            bar.update(len(batch))
        bar.close()


class LocalBackend:
    """`retriever.backend.Backend`: collections as directories under `data_dir`."""

    name = "faiss"

    def __init__(self, data_dir: Path, policy: CheckpointPolicy = CheckpointPolicy()) -> None:
        self.data_dir = Path(data_dir)
        self.policy = policy

    def load_all(self) -> list[Collection]:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        found = sorted(p for p in self.data_dir.iterdir() if is_collection_dir(p))
        return [Collection.load(d, self.policy)
                for d in tqdm(found, desc="loading collections", unit="collection", disable=not found)]

    def create(self, spec: CollectionSpec) -> Collection:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        return Collection.create(spec, self.data_dir / spec.name, self.policy)

    def drop(self, collection: Any) -> None:
        assert isinstance(collection, Collection)
        collection.close()
        trash = self.data_dir / f".deleted-{collection.spec.name}-{uuid.uuid4().hex[:8]}"
        collection.directory.rename(trash)  # atomic: a restart never sees half a collection
        shutil.rmtree(trash, ignore_errors=True)

    def close(self) -> None:
        pass


def is_collection_dir(path: Path) -> bool:
    return (path / STORE).exists() or (path / LEGACY_CURRENT).exists()
