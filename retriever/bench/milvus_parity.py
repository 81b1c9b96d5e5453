"""Parity of the Milvus backend with the default one on a BEIR collection (default: SciFact test).

    python -m retriever.bench.milvus_parity --data ../shared/data/scifact --out bench-results/milvus_parity.json

The same vectors (all-MiniLM-L6-v2, embedded once and cached under --cache) go to both sides:
- default: the default backend's components used directly: exact `faiss.IndexFlatIP`, `LexicalIndex`
  (tantivy BM25), `fusion.fuse` for hybrid;
- milvus: `retriever.milvus.MilvusCollection` on Milvus Lite in a temporary file (ingested, then reopened
  as after a restart), fused the same way.
Each side retrieves `--depth` candidates (100, as FusionSettings' candidate_depth) for every judged query.
Reported: the fraction of queries whose dense top-10 id sets are identical on both (target >= 0.95; ties
at the cut are the only legitimate difference), the same for lexical, nDCG@10 of dense, lexical and hybrid
per backend (targets: lexical and hybrid within 0.01 of the default), and Milvus Lite's ingest and
per-query search times.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import faiss
import ir_measures
import numpy as np
from ir_measures import nDCG
from tqdm.auto import tqdm

from common.beir import iter_corpus, load_qrels, split_queries
from common.report import text_table
from common.types import Document
from retriever.backend import Ranked
from retriever.embedder import Embedder, EmbedderConfig
from retriever.fusion import FusionSettings, fuse
from retriever.lexical import LexicalIndex
from retriever.milvus import MilvusBackend
from retriever.types import CollectionSpec

TOP = 10
BATCH = 256
Runs = dict[str, dict[str, Ranked]]  # mode -> query id -> ranking


def embed(data: Path, docs: list[Document], queries: dict[str, str], cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """Corpus and query vectors, cached under `cache` (keyed by collection and size): embedding takes minutes."""
    cache.mkdir(parents=True, exist_ok=True)
    paths = [cache / f"{data.name}-corpus-{len(docs)}.npy", cache / f"{data.name}-queries-{len(queries)}.npy"]
    texts = [[d.embedding_text() for d in docs], list(queries.values())]
    embedder: Embedder | None = None
    out = []
    for path, batch in zip(paths, texts, strict=True):
        if not path.exists():
            embedder = embedder or Embedder(EmbedderConfig())
            np.save(path, embedder.encode(batch, progress=True))
        out.append(np.load(path))
    return out[0], out[1]


def default_runs(docs: list[Document], vectors: np.ndarray, queries: dict[str, str], query_vectors: np.ndarray,
                 depth: int) -> Runs:
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    scores, labels = index.search(query_vectors, depth)
    dense = {qid: [(docs[j].id, float(s)) for j, s in zip(row, srow, strict=True) if j >= 0]
             for qid, row, srow in zip(queries, labels, scores, strict=True)}
    with tempfile.TemporaryDirectory(prefix="parity-lexical-") as tmp:
        lexical_index = LexicalIndex(Path(tmp))
        lexical_index.rebuild(docs, seq=0)
        lexical = {qid: lexical_index.search(text, depth) for qid, text in queries.items()}
        lexical_index.close()
    return {"dense": dense, "lexical": lexical}


def milvus_runs(docs: list[Document], vectors: np.ndarray, queries: dict[str, str], query_vectors: np.ndarray,
                depth: int) -> tuple[Runs, dict[str, float]]:
    """Ingest, then restart (Milvus Lite writes its memtable out as a segment on close), then search.

    Before the restart, Lite rebuilds the memtable's BM25 inverted index (pure Python) on every lexical
    search; that cost is timed on a sample and reported beside the steady state."""
    with tempfile.TemporaryDirectory(prefix="parity-milvus-") as tmp:
        path = str(Path(tmp) / "parity.db")
        backend = MilvusBackend(path)
        collection = backend.create(CollectionSpec(name="parity", dimension=vectors.shape[1]))
        start = time.perf_counter()
        for i in tqdm(range(0, len(docs), BATCH), desc="milvus ingest", unit="batch"):
            collection.upsert(docs[i:i + BATCH], vectors[i:i + BATCH])
        timings = {"ingest_s": time.perf_counter() - start}
        sample = list(queries.values())[:10]
        _, timings["lexical_ms_per_query_in_memtable"] = _timed(
            lambda: [collection.search_lexical(q, depth) for q in sample], len(sample))
        backend.close()
        backend = MilvusBackend(path)
        [collection] = backend.load_all()
        dense_lists, timings["dense_ms_per_query"] = _timed(
            lambda: collection.search_dense(query_vectors, depth), len(queries))
        lexical_lists, timings["lexical_ms_per_query"] = _timed(
            lambda: [collection.search_lexical(q, depth) for q in tqdm(queries.values(), desc="milvus bm25")],
            len(queries))
        backend.close()
    return {"dense": dict(zip(queries, dense_lists, strict=True)),
            "lexical": dict(zip(queries, lexical_lists, strict=True))}, timings


def _timed(call: Callable[[], Any], n: int) -> tuple[Any, float]:
    start = time.perf_counter()
    result = call()
    return result, (time.perf_counter() - start) * 1e3 / max(1, n)


def add_hybrid(runs: Runs, depth: int) -> Runs:
    settings = FusionSettings(candidate_depth=depth)
    hybrid = {qid: [(h.id, h.score) for h in fuse(runs["dense"][qid], runs["lexical"][qid], settings, depth)]
              for qid in runs["dense"]}
    return runs | {"hybrid": hybrid}


def ndcg10(qrels: dict[str, dict[str, int]], run: dict[str, Ranked]) -> float:
    """Rank-preserving scores (ties in the raw scores must not reorder anything, as in deploy.eval)."""
    scored = {qid: {doc_id: float(len(ranked) - r) for r, (doc_id, _) in enumerate(ranked)}
              for qid, ranked in run.items()}
    return float(ir_measures.calc_aggregate([nDCG @ 10], qrels, scored)[nDCG @ 10])


def same_top_sets(a: dict[str, Ranked], b: dict[str, Ranked], top: int = TOP) -> float:
    same = sum({i for i, _ in a[q][:top]} == {i for i, _ in b[q][:top]} for q in a)
    return same / max(1, len(a))


def compare(data: Path, cache: Path, depth: int, max_queries: int | None) -> dict[str, Any]:
    docs = [d for d in iter_corpus(data) if d.embedding_text()]
    queries = split_queries(data)
    if max_queries:
        queries = dict(list(queries.items())[:max_queries])
    qrels = {q: rel for q, rel in load_qrels(data).items() if q in queries}
    vectors, query_vectors = embed(data, docs, queries, cache)
    default = add_hybrid(default_runs(docs, vectors, queries, query_vectors, depth), depth)
    milvus, timings = milvus_runs(docs, vectors, queries, query_vectors, depth)
    milvus = add_hybrid(milvus, depth)
    ndcg = {backend: {mode: ndcg10(qrels, run) for mode, run in runs.items()}
            for backend, runs in (("default", default), ("milvus", milvus))}
    return {"data": str(data), "documents": len(docs), "queries": len(queries), "depth": depth,
            "dense_top10_same_set": same_top_sets(default["dense"], milvus["dense"]),
            "lexical_top10_same_set": same_top_sets(default["lexical"], milvus["lexical"]),
            "ndcg@10": ndcg, "milvus_lite": timings}


def table(result: dict[str, Any]) -> str:
    ndcg = result["ndcg@10"]
    rows = [[mode, ndcg["default"][mode], ndcg["milvus"][mode], ndcg["milvus"][mode] - ndcg["default"][mode]]
            for mode in ("dense", "lexical", "hybrid")]
    head = text_table([("nDCG@10", ""), ("default", ".4f"), ("milvus", ".4f"), ("diff", "+.4f")], rows)
    return (f"{head}\ndense top-10 same id set: {result['dense_top10_same_set']:.3f}   "
            f"lexical: {result['lexical_top10_same_set']:.3f}   ({result['queries']} queries)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m retriever.bench.milvus_parity", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="BEIR-layout directory (test split)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "milvus-parity")
    parser.add_argument("--depth", type=int, default=FusionSettings().candidate_depth)
    parser.add_argument("--max-queries", type=int, default=None)
    args = parser.parse_args(argv)
    result = compare(args.data, args.cache, args.depth, args.max_queries)
    print(table(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
