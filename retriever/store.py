"""A collection's documents and vectors in SQLite: the source of truth its indexes are derived from.

One row per id that was ever written: title, text, metadata, its float32 vector, and `seq`, the number of
the write that last touched it (every write takes the next number). A delete keeps the row as a tombstone
(`deleted` = 1, content dropped) so that an index checkpointed at write N learns, from the rows with
seq > N, both what was added and what was removed since; tombstones are purged once every index has
checkpointed past them (`purge_tombstones`).

Durability: WAL journal, `synchronous=FULL`: a commit returns after the log is fsynced, so an
acknowledged write survives a process crash and a power cut (`NORMAL` would risk the last commits on power
loss). Concurrent writers are committed together by the collection (group commit): one fsync per group.
Readers use their own connection per thread and never wait for the writer (WAL readers see the last
commit). Document text is read from here per request, not held in memory.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.types import Document

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS documents (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    deleted INTEGER NOT NULL DEFAULT 0,
    title TEXT NOT NULL DEFAULT '',
    text TEXT NOT NULL DEFAULT '',
    metadata TEXT NOT NULL DEFAULT '{}',
    vector BLOB
);
CREATE INDEX IF NOT EXISTS documents_by_seq ON documents (seq);
"""
_IN_CHUNK = 500  # ids per `IN (...)`: well under SQLite's bound-parameter limit


@dataclass
class Write:
    """One acknowledged unit of change: upserts (with their vectors) or deletes, never half applied."""

    upserts: Sequence[Document] = ()
    vectors: np.ndarray | None = None
    deletes: Sequence[str] = ()
    seq: int = 0  # assigned at commit
    deleted: list[str] = field(default_factory=list)  # the deletes that were present, set at commit


@dataclass(frozen=True)
class Change:
    """A row written after some sequence number, as an index replays it."""

    id: str
    seq: int
    document: Document | None  # None: deleted
    vector: np.ndarray | None


class DocumentStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._writer = self._connect()
        self._writer.executescript(_SCHEMA)
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []  # every thread's, closed together
        self._readers_lock = threading.Lock()
        self.last_seq = int(self.meta("seq") or 0)

    def _connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=FULL")
        connection.execute("PRAGMA busy_timeout=60000")
        return connection

    def _reader(self) -> sqlite3.Connection:
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._connect()
            self._local.connection = connection
            with self._readers_lock:
                self._readers.append(connection)
        return connection

    # ---- writes (one thread at a time: the collection's committer) ----------
    def commit(self, writes: Sequence[Write]) -> None:
        """Apply `writes` in order in one transaction, each with the next sequence number; fsynced."""
        db = self._writer
        db.execute("BEGIN IMMEDIATE")
        try:
            for write in writes:
                self.last_seq += 1
                write.seq = self.last_seq
                self._upsert_rows(write)
                self._delete_rows(write)
            db.execute("INSERT OR REPLACE INTO meta VALUES ('seq', ?)", (str(self.last_seq),))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            self.last_seq = int(self.meta("seq") or 0)
            raise

    def _upsert_rows(self, write: Write) -> None:
        if not write.upserts:
            return
        assert write.vectors is not None and len(write.vectors) == len(write.upserts)
        vectors = np.ascontiguousarray(write.vectors, dtype=np.float32)
        self._writer.executemany(
            "INSERT OR REPLACE INTO documents (id, seq, deleted, title, text, metadata, vector) "
            "VALUES (?, ?, 0, ?, ?, ?, ?)",
            [(d.id, write.seq, d.title, d.text, json.dumps(d.metadata, ensure_ascii=False), v.tobytes())
             for d, v in zip(write.upserts, vectors, strict=True)])

    def _delete_rows(self, write: Write) -> None:
        if not write.deletes:
            return
        wanted = list(dict.fromkeys(write.deletes))
        present = {row[0] for row in _live_rows(self._writer, "id", wanted)}
        write.deleted = [i for i in wanted if i in present]
        self._writer.executemany(
            "UPDATE documents SET deleted = 1, seq = ?, title = '', text = '', metadata = '{}', vector = NULL "
            "WHERE id = ?", [(write.seq, i) for i in write.deleted])

    def set_meta(self, key: str, value: str) -> None:
        self._writer.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def purge_tombstones(self, up_to_seq: int) -> int:
        """Drop tombstones every index has checkpointed past."""
        return self._writer.execute("DELETE FROM documents WHERE deleted = 1 AND seq <= ?", (up_to_seq,)).rowcount

    # ---- reads (any thread) ------------------------------------------------
    def meta(self, key: str) -> str | None:
        row = self._reader().execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def get(self, ids: Sequence[str]) -> list[Document]:
        """Live documents under `ids`, in the order asked, each once."""
        wanted = list(dict.fromkeys(ids))
        found = {doc_id: Document(doc_id, title, text, json.loads(metadata)) for doc_id, title, text, metadata
                 in _live_rows(self._reader(), "id, title, text, metadata", wanted)}
        return [found[i] for i in wanted if i in found]

    def count(self) -> int:
        return int(self._reader().execute("SELECT COUNT(*) FROM documents WHERE deleted = 0").fetchone()[0])

    def changes_after(self, seq: int, batch_size: int = 4096) -> Iterator[list[Change]]:
        """Rows written after write `seq` (live and tombstones), in write order, in batches."""
        cursor = self._reader().execute(
            "SELECT id, seq, deleted, title, text, metadata, vector FROM documents WHERE seq > ? ORDER BY seq",
            (seq,))
        while rows := cursor.fetchmany(batch_size):
            yield [self._change(row) for row in rows]

    def changes_since_count(self, seq: int) -> int:
        return int(self._reader().execute("SELECT COUNT(*) FROM documents WHERE seq > ?", (seq,)).fetchone()[0])

    def live_documents(self, batch_size: int = 4096) -> Iterator[tuple[list[Document], np.ndarray]]:
        """Every live document with its vector, in batches."""
        for changes in self.changes_after(0, batch_size):
            documents, vectors = [], []
            for change in changes:
                if change.document is not None and change.vector is not None:
                    documents.append(change.document)
                    vectors.append(change.vector)
            if documents:
                yield documents, np.stack(vectors)

    def _change(self, row: tuple) -> Change:
        doc_id, seq, deleted, title, text, metadata, vector = row
        if deleted:
            return Change(doc_id, seq, None, None)
        return Change(doc_id, seq, Document(doc_id, title, text, json.loads(metadata)),
                      np.frombuffer(vector, dtype=np.float32))

    def close(self) -> None:
        self._writer.close()
        with self._readers_lock:
            for connection in self._readers:
                connection.close()
            self._readers.clear()


def _live_rows(db: sqlite3.Connection, columns: str, ids: list[str]) -> Iterator[tuple]:
    """`columns` of the live rows under `ids`, in chunks of `IN (...)` under SQLite's parameter limit."""
    for start in range(0, len(ids), _IN_CHUNK):
        chunk = ids[start:start + _IN_CHUNK]
        yield from db.execute(f"SELECT {columns} FROM documents WHERE deleted = 0 AND id IN "
                              f"({','.join('?' * len(chunk))})", chunk)
