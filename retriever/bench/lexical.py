"""The lexical index and hybrid search: what BM25 costs beside the dense index.

1. Lexical indexing throughput (docs/s) and BM25 search latency p50/p99 (one query per call, k=100, real
   SciFact queries) at each size; documents past SciFact's own are synthetic: words drawn from the SciFact
   corpus vocabulary with their corpus frequencies, lengths drawn from its document lengths.
2. Hybrid against dense alone, through the engine on SciFact (5K documents, real queries): query latency
   p50/p99 of each mode, side by side in one run.
3. Ingest: SciFact through `RetrieverEngine.upsert` in 256-document batches; the time the lexical index
   takes (apply + commit) against the rest of each write, measured in the same writes.
"""

from __future__ import annotations

import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from itertools import islice
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from common.beir import iter_corpus, load_queries
from common.types import Document
from retriever.embedder import Embedder
from retriever.engine import RetrieverEngine
from retriever.fusion import RetrievalMode
from retriever.lexical import LexicalIndex

K = 100
CHUNK = 20_000
BATCH = 256


@dataclass
class LexicalRow:
    size: int
    index_docs_per_s: float
    p50_ms: float
    p99_ms: float


class SyntheticCorpus:
    """Documents whose words follow the SciFact vocabulary's frequencies and whose lengths follow its own."""

    def __init__(self, data: Path, seed: int) -> None:
        self.real = list(iter_corpus(data))
        counts = Counter(word for doc in self.real for word in doc.embedding_text().split())
        self.words = np.array(list(counts))
        weights = np.array(list(counts.values()), dtype=np.float64)
        self.p = weights / weights.sum()
        self.lengths = np.array([len(d.embedding_text().split()) for d in self.real])
        self.seed = seed

    def documents(self, size: int) -> Iterator[Document]:
        yield from self.real[:size]
        rng = np.random.default_rng(self.seed)
        for start in range(len(self.real), size, CHUNK):
            n = min(CHUNK, size - start)
            lengths = rng.choice(self.lengths, size=n)
            words = self.words[rng.choice(len(self.words), size=int(lengths.sum()), p=self.p)].tolist()
            ends = np.cumsum(lengths).tolist()
            for i, (begin, end) in enumerate(zip([0, *ends[:-1]], ends, strict=True)):
                yield Document(id=f"s{start + i}", text=" ".join(words[begin:end]))


def bench_lexical(data: Path, sizes: list[int], n_queries: int, seed: int) -> list[LexicalRow]:
    corpus = SyntheticCorpus(data, seed)
    queries = list(load_queries(data).values())[:n_queries]
    return [_lexical_size(corpus, size, queries) for size in sizes]


def _lexical_size(corpus: SyntheticCorpus, size: int, queries: list[str]) -> LexicalRow:
    with tempfile.TemporaryDirectory(prefix="lexical-bench-") as tmp:
        index = LexicalIndex(Path(tmp))
        docs = corpus.documents(size)
        seconds = 0.0
        with tqdm(total=size, desc=f"lexical index {size:,}", unit="doc") as bar:
            for chunk in iter(lambda: list(islice(docs, CHUNK)), []):
                start = time.perf_counter()  # only indexing counts, not generating the text
                index.apply([(chunk, [])], seq=0)
                seconds += time.perf_counter() - start
                bar.update(len(chunk))
        times = _latencies(lambda q: index.search(q, K), queries)
        index.close()
    return LexicalRow(size, size / seconds, float(np.percentile(times, 50)), float(np.percentile(times, 99)))


def _latencies(search: Callable[[str], object], queries: list[str]) -> np.ndarray:
    for query in queries[:10]:
        search(query)
    times = []
    for query in queries:
        start = time.perf_counter()
        search(query)
        times.append((time.perf_counter() - start) * 1e3)
    return np.asarray(times)


def bench_hybrid_and_ingest(data: Path, embedder: Embedder, n_queries: int) -> dict:
    """SciFact through the engine: ingest (lexical share of each write), then each mode's query latency."""
    with tempfile.TemporaryDirectory(prefix="hybrid-bench-") as tmp:
        engine = RetrieverEngine(Path(tmp), embedder)
        engine.create_collection("c")
        docs = list(iter_corpus(data))
        start = time.perf_counter()
        for i in tqdm(range(0, len(docs), BATCH), desc="ingest SciFact", unit="batch"):
            engine.upsert("c", docs[i:i + BATCH])
        total_s = time.perf_counter() - start
        lexical_s = engine.lexical_write_seconds("c")
        queries = list(load_queries(data).values())[:n_queries]
        latency = {mode.value: _latencies(partial(engine.search, "c", top_k=10, mode=mode), queries)
                   for mode in RetrievalMode}
        engine.close()
    dense = latency[RetrievalMode.DENSE.value]
    return {
        "ingest": {"documents": len(docs), "total_s": total_s, "lexical_s": lexical_s,
                   "lexical_overhead": lexical_s / (total_s - lexical_s)},
        "query_ms": {mode: {"p50": float(np.percentile(t, 50)), "p99": float(np.percentile(t, 99))}
                     for mode, t in latency.items()},
        "hybrid_over_dense_p50": float(np.percentile(latency[RetrievalMode.HYBRID.value], 50)
                                       / np.percentile(dense, 50)),
    }
