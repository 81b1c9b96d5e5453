"""First-stage candidate lists for offline work (layer selection, training, benchmarks).

Uses the retriever engine in-process on a persisted data directory (the one
`make run` fills), ingesting the BEIR corpus there first if it is missing.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

from common.beir import count_corpus, iter_corpus, load_qrels, load_queries
from common.types import Document


@dataclass
class Candidates:
    query_id: str
    query: str
    documents: list[Document]
    first_stage_scores: list[float]


def first_stage(data: Path, split: str, depth: int, data_dir: Path, collection: str,
                max_queries: int | None = None, mode: str = "") -> list[Candidates]:
    """Top-`depth` first-stage candidates for the judged queries of `split`; `mode` (dense, lexical, hybrid)
    overrides the collection's default retrieval mode."""
    queries = load_queries(data)
    judged = [q for q in load_qrels(data, split) if q in queries][:max_queries]
    hits = search(data, data_dir, collection, [queries[q] for q in judged], depth, mode)
    return [Candidates(q, queries[q], [d for d, _ in row], [score for _, score in row])
            for q, row in zip(judged, hits, strict=True)]


def search(data: Path, data_dir: Path, collection: str, queries: list[str], depth: int,
           mode: str = "") -> list[list[tuple[Document, float]]]:
    """Top-`depth` (document, score) per query from `collection` in the retriever directory `data_dir`, after
    ingesting the BEIR corpus at `data` there if the collection does not hold it all."""
    # Imported here: the GPU run reads candidates from a file and has no faiss, tantivy or embedder.
    from retriever.embedder import Embedder
    from retriever.engine import RetrieverEngine
    from retriever.fusion import RetrievalMode
    from retriever.types import CollectionNotFound

    with RetrieverEngine(data_dir, Embedder()) as engine:  # closed: the next caller may open the directory
        engine.load()
        expected = count_corpus(data, indexable_only=True)
        try:
            have = engine.get_stats(collection).document_count
        except CollectionNotFound:
            engine.create_collection(collection)
            have = 0
        if have != expected:
            engine.upsert(collection, list(iter_corpus(data)), progress=True)
        rows = engine.search_batch(collection, queries, depth, RetrievalMode(mode) if mode else None)
    return [[(h.document, h.score) for h in row] for row in rows]


def save_candidates(path: Path, candidates: list[Candidates]) -> None:
    """Candidate lists as gzipped JSON lines of ids and first-stage scores (texts stay in the corpus), so work
    on another machine (the GPU run) needs neither the embedder nor the index."""
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for c in candidates:
            f.write(json.dumps({"query_id": c.query_id, "query": c.query, "doc_ids": [d.id for d in c.documents],
                                "scores": c.first_stage_scores}) + "\n")


def load_candidates(path: Path, data: Path, depth: int | None = None) -> list[Candidates]:
    """What save_candidates wrote, documents read back from the BEIR corpus at `data`, cut to `depth`."""
    corpus = {d.id: d for d in iter_corpus(data)}
    out = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            ids = row["doc_ids"][:depth]
            out.append(Candidates(row["query_id"], row["query"], [corpus[i] for i in ids], row["scores"][:len(ids)]))
    return out
