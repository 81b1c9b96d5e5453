"""A BM25 inverted index per collection, on disk beside the dense index (tantivy).

One field, `content` = title + text, analysed by tantivy's English stemmer (simple tokenizer, long-token
filter, lower-case, Porter stemmer), as Anserini's "flat" BEIR runs index title and body together; ids in a
raw (untokenised) field, so an upsert is a delete by id term plus an add. Queries are the stemmed query
tokens as a disjunction of term queries: bag-of-words BM25 (k1 1.2, b 0.75), with no query syntax for a
user's text to trip over (measured on SciFact test: 0.687 nDCG@10, against 0.686 through tantivy's query
parser, which turns hyphenated words into phrases; BEIR's Anserini figure is 0.665 multifield / 0.679 flat).

One writer per index; every acknowledged write (or group of writes committed together) is committed
(tantivy commits are atomic: a crash leaves the previous commit), then the searcher is reloaded; searches
run on the last reloaded searcher and never wait for a write. The index is derived state: the collection's
document store is the truth. `APPLIED` beside the index names the last collection write it covers: replaced
(not fsynced) after each commit, and fsynced at the collection's checkpoints. It never runs ahead of the
index (written after the commit it names; after a power cut it may lag), and on load the collection replays
the store's rows after it, which is idempotent (an upsert is a delete by id plus an add), or rebuilds the
index when there is none (see retriever.collection). Kept current, it also lets another process open the
collection (a training job reading a live retriever's directory) without replaying, i.e. without the writer.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import tantivy

from common.files import write_atomically
from common.priority import background_executor
from common.types import Document

log = logging.getLogger(__name__)
APPLIED = "APPLIED"
_WRITER_HEAP_BYTES = 64 << 20
# Handing documents to tantivy is a Python loop that holds the GIL; a search thread waiting for the GIL
# would wait out the interpreter's whole switch interval (5 ms), so the loop yields every this many.
_YIELD_EVERY = 32
_ANALYZER = (tantivy.TextAnalyzerBuilder(tantivy.Tokenizer.simple()).filter(tantivy.Filter.remove_long(40))
             .filter(tantivy.Filter.lowercase()).filter(tantivy.Filter.stemmer("english")).build())


def _schema() -> Any:
    builder = tantivy.SchemaBuilder()
    builder.add_text_field("id", stored=True, tokenizer_name="raw")
    builder.add_text_field("content", stored=False, tokenizer_name="en_stem", index_option="freq")
    return builder.build()


def analyze(text: str) -> list[str]:
    """The stemmed, lower-cased tokens of a text, as this index stores them (the Milvus backend feeds the
    same terms to Milvus's BM25, so both backends score the same terms)."""
    return list(_ANALYZER.analyze(text))


def query_terms(text: str) -> list[str]:
    """The stemmed, lower-cased tokens of a query, each once, in order."""
    return list(dict.fromkeys(analyze(text)))


class LexicalIndex:
    """BM25 over one collection's documents. Thread-safe: writes are serialised, searches run on the
    last committed state and never wait for a write in progress."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.schema = _schema()
        self.index = tantivy.Index(self.schema, path=str(directory), reuse=True)
        self._writer: Any = None
        # Writes run on one low-priority thread, hence one at a time; the tantivy writer opened there starts its indexing and
        # merge threads there, so they inherit the priority too (searches win the CPU under contention).
        self._background = background_executor("lexical-writer")
        self._closed = False
        self.write_seconds = 0.0  # spent in apply/rebuild since opened (what the index adds to ingest)

    @property
    def applied(self) -> int | None:
        """A collection write this index covers (None: unknown, rebuild it)."""
        path = self.directory / APPLIED
        try:
            return int(path.read_text().strip())
        except (OSError, ValueError):
            return None

    def __len__(self) -> int:
        return int(self.index.searcher().num_docs)

    def apply(self, changes: Iterable[tuple[Sequence[Document], Sequence[str]]], seq: int) -> None:
        """Apply (upserts, deletes) pairs in order (each: delete `deletes`, replace or add `upserts`), then
        commit once, make the result searchable, and note `seq` (the last collection write applied)."""
        self._background.submit(self._apply, changes, seq).result()

    def _apply(self, changes: Iterable[tuple[Sequence[Document], Sequence[str]]], seq: int) -> None:
        start = time.perf_counter()
        writer = self._open_writer()
        for upserts, deletes in changes:
            for doc_id in [*deletes, *(d.id for d in upserts)]:
                writer.delete_documents_by_term("id", doc_id)
            self._add(writer, upserts)
        self._commit(writer, seq)
        self.write_seconds += time.perf_counter() - start

    def rebuild(self, documents: Iterable[Document], seq: int) -> int:
        """Replace the whole index with `documents`, the collection as of write `seq` (an index lost or never
        built)."""
        return self._background.submit(self._rebuild, documents, seq).result()

    def _rebuild(self, documents: Iterable[Document], seq: int) -> int:
        writer = self._open_writer()
        writer.delete_all_documents()
        count = self._add(writer, documents)
        self._commit(writer, seq)
        return count

    @staticmethod
    def _add(writer: Any, documents: Iterable[Document]) -> int:
        count = 0
        for count, doc in enumerate(documents, start=1):
            writer.add_document(tantivy.Document(id=doc.id, content=doc.embedding_text()))
            if count % _YIELD_EVERY == 0:
                time.sleep(0)  # let a waiting search thread take the GIL now
        return count

    def record_applied(self, seq: int) -> None:
        """Make it durable that every write up to `seq` is committed here (only after those commits)."""
        self._background.submit(write_atomically, self.directory / APPLIED, str(seq)).result()

    def search(self, query: str, k: int) -> list[tuple[str, float]]:
        """Top-k (id, BM25 score), best first; empty when no query token is in the vocabulary."""
        terms = query_terms(query)
        if not terms or k < 1:
            return []
        clauses = [(tantivy.Occur.Should, tantivy.Query.term_query(self.schema, "content", t)) for t in terms]
        searcher = self.index.searcher()
        hits = searcher.search(tantivy.Query.boolean_query(clauses), k).hits
        return [(searcher.doc(address)["id"][0], float(score)) for score, address in hits]

    def close(self) -> None:
        if self._closed:
            return
        self._background.submit(self._close).result()
        self._background.shutdown()
        self._closed = True

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.wait_merging_threads()
            self._writer = None

    def destroy(self) -> None:
        self.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    def _open_writer(self) -> Any:
        if self._writer is None:
            self._writer = self.index.writer(heap_size=_WRITER_HEAP_BYTES, num_threads=1)
        return self._writer

    def _commit(self, writer: Any, seq: int) -> None:
        """Commit, make it searchable, note `seq` in APPLIED: atomically but not fsynced, since a power cut
        leaving an older value only means more replay (checkpoints make it durable: record_applied)."""
        writer.commit()
        self.index.reload()
        write_atomically(self.directory / APPLIED, str(seq), durable=False)


