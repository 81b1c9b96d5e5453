"""A BM25 inverted index per collection, on disk beside the dense index (tantivy).

One field, `content` = title + text, analysed by tantivy's English stemmer (simple tokenizer, long-token
filter, lower-case, Porter stemmer), as Anserini's "flat" BEIR runs index title and body together; ids in a
raw (untokenised) field, so an upsert is a delete by id term plus an add. Queries are the stemmed query
tokens as a disjunction of term queries: bag-of-words BM25 (k1 1.2, b 0.75), with no query syntax for a
user's text to trip over (measured on SciFact test: 0.687 nDCG@10, against 0.686 through tantivy's query
parser, which turns hyphenated words into phrases; BEIR's Anserini figure is 0.665 multifield / 0.679 flat).

One writer per index; every acknowledged write is committed (tantivy commits are atomic: a crash leaves
the previous commit), then the searcher is reloaded. Which write of the collection the index reflects is
kept in `APPLIED` beside it (the collection's snapshot number), written after the commit: on load, a
mismatch means a crash fell between the two writes, and the collection rebuilds this index from its
documents (see retriever.collection).
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import tantivy

from common.files import write_atomically
from common.types import Document

log = logging.getLogger(__name__)
APPLIED = "APPLIED"
_WRITER_HEAP_BYTES = 64 << 20
_ANALYZER = (tantivy.TextAnalyzerBuilder(tantivy.Tokenizer.simple()).filter(tantivy.Filter.remove_long(40))
             .filter(tantivy.Filter.lowercase()).filter(tantivy.Filter.stemmer("english")).build())


def _schema() -> Any:
    builder = tantivy.SchemaBuilder()
    builder.add_text_field("id", stored=True, tokenizer_name="raw")
    builder.add_text_field("content", stored=False, tokenizer_name="en_stem", index_option="freq")
    return builder.build()


def query_terms(text: str) -> list[str]:
    """The stemmed, lower-cased tokens of a query, each once, in order."""
    return list(dict.fromkeys(_ANALYZER.analyze(text)))


class LexicalIndex:
    """BM25 over one collection's documents. Thread-safe: writes are serialised, searches run on the
    last committed state and never wait for a write in progress."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.schema = _schema()
        self.index = tantivy.Index(self.schema, path=str(directory), reuse=True)
        self._writer: Any = None
        self._write_lock = threading.Lock()
        self.write_seconds = 0.0  # spent in apply/rebuild since opened (what the index adds to ingest)

    @property
    def applied(self) -> int | None:
        """The collection write this index reflects (None: never committed under a collection)."""
        path = self.directory / APPLIED
        try:
            return int(path.read_text().strip())
        except (OSError, ValueError):
            return None

    def __len__(self) -> int:
        return int(self.index.searcher().num_docs)

    def apply(self, upserts: Sequence[Document], deletes: Sequence[str], seq: int) -> None:
        """Delete `deletes`, replace or add `upserts`, commit, and record `seq` as applied."""
        with self._write_lock:
            start = time.perf_counter()
            writer = self._open_writer()
            for doc_id in [*deletes, *(d.id for d in upserts)]:
                writer.delete_documents_by_term("id", doc_id)
            for doc in upserts:
                writer.add_document(tantivy.Document(id=doc.id, content=doc.embedding_text()))
            self._commit(writer, seq)
            self.write_seconds += time.perf_counter() - start

    def rebuild(self, documents: Iterable[Document], seq: int) -> int:
        """Replace the whole index with `documents` (repair after a crash between writes)."""
        count = 0
        with self._write_lock:
            writer = self._open_writer()
            writer.delete_all_documents()
            for doc in documents:
                writer.add_document(tantivy.Document(id=doc.id, content=doc.embedding_text()))
                count += 1
            self._commit(writer, seq)
        return count

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
        with self._write_lock:
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
        writer.commit()
        self.index.reload()
        write_atomically(self.directory / APPLIED, str(seq))


