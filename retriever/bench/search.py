"""Search latency p50/p99 (ms, one query per call, k=10) of exact (flat) vs HNSW indexes, built through
the project's `StringIdIndex`, on synthetic 384-d unit vectors at each size, plus HNSW recall@10 against
exact search and its build time. Larger efSearch rows are added while recall@10 stays under 0.98, so
the speed/recall trade-off is visible.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from retriever.index import StringIdIndex
from retriever.types import HnswSettings, IndexKind

DIMENSION = 384  # all-MiniLM-L6-v2
K = 10
WARMUP_QUERIES = 10
RECALL_TARGET = 0.98
MAX_EF_SEARCH = 512
CHUNK = 50_000  # synthetic vectors generated (and indexed) per step, to bound memory


class SyntheticEmbeddings:
    """Unit vectors shaped like sentence embeddings: clustered, with a low intrinsic dimension.

    Uniform random 384-d vectors are nearly equidistant from one another, which makes graph
    indexes look far worse than on real data. Real embeddings sit near a low-dimensional
    manifold and form topics, so we sample a Gaussian mixture (uneven cluster sizes) in a random
    subspace and add small isotropic noise in all dimensions. Chunk i is seeded by (seed, i), so a
    smaller collection is exactly a prefix of a larger one and queries never repeat database rows.
    """

    def __init__(self, seed: int, dimension: int = DIMENSION, subspace: int = 64, clusters: int = 1000,
                 spread: float = 0.6, noise: float = 0.2, shared: float = 0.4) -> None:
        rng = np.random.default_rng([seed, 0])
        self.seed = seed
        self.basis = np.linalg.qr(rng.standard_normal((dimension, subspace)))[0].T.astype(np.float32)
        self.centres = rng.standard_normal((clusters, subspace)).astype(np.float32)
        self.weights = rng.dirichlet(np.ones(clusters))
        self.spread = spread
        self.noise = noise
        # Real embeddings share a common direction (SciFact/MiniLM: mean vector norm ~0.38, mean pair
        # cosine ~0.14); `shared` is that offset's length relative to a typical vector's.
        typical_norm = np.sqrt(subspace * (1 + spread**2) + dimension * noise**2)
        direction = rng.standard_normal(dimension)
        self.offset = (shared * typical_norm * direction / np.linalg.norm(direction)).astype(np.float32)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        centre = self.centres[rng.choice(len(self.centres), size=n, p=self.weights)]
        latent = centre + self.spread * rng.standard_normal(centre.shape, dtype=np.float32)
        vectors = latent @ self.basis + self.offset
        vectors += self.noise * rng.standard_normal(vectors.shape, dtype=np.float32)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    def database(self, size: int) -> Iterator[np.ndarray]:
        for i, start in enumerate(range(0, size, CHUNK)):
            yield self.sample(min(CHUNK, size - start), np.random.default_rng([self.seed, 2, i]))

    def queries(self, n: int) -> np.ndarray:
        return self.sample(n, np.random.default_rng([self.seed, 1]))


@dataclass
class SearchRow:
    size: int
    index: str
    ef_search: int | None
    p50_ms: float
    p99_ms: float
    recall_at_10: float
    build_s: float


def build_indexes(data: SyntheticEmbeddings, size: int,
                  hnsw: HnswSettings) -> tuple[dict[IndexKind, StringIdIndex], dict[IndexKind, float]]:
    """Both indexes fed the same chunks; only faiss `add` time counts as build time."""
    indexes = {kind: StringIdIndex(DIMENSION, kind, hnsw) for kind in IndexKind}
    build_s = dict.fromkeys(IndexKind, 0.0)
    chunks = tqdm(data.database(size), total=-(-size // CHUNK), desc=f"build {size:,}", unit="chunk")
    for i, vectors in enumerate(chunks):
        ids = [str(i * CHUNK + j) for j in range(len(vectors))]
        for kind, index in indexes.items():
            start = time.perf_counter()
            index.upsert(ids, vectors)  # HNSW insertion is multithreaded by faiss (OpenMP)
            build_s[kind] += time.perf_counter() - start
    return indexes, build_s


def latencies_ms(index: StringIdIndex, queries: np.ndarray, desc: str) -> tuple[np.ndarray, list[set[str]]]:
    """One query per call, as the service sees them; returns per-query ms and the top-k id sets."""
    for query in queries[:WARMUP_QUERIES]:
        index.search(query[None], K)
    times, results = [], []
    for query in tqdm(queries, desc=desc, unit="q", leave=False):
        start = time.perf_counter()
        hits = index.search(query[None], K)[0]
        times.append((time.perf_counter() - start) * 1e3)
        results.append({doc_id for doc_id, _ in hits})
    return np.asarray(times), results


def recall(found: list[set[str]], truth: list[set[str]]) -> float:
    return float(np.mean([len(f & t) / len(t) for f, t in zip(found, truth, strict=True)]))


def ef_schedule(default: int) -> Iterator[int]:
    ef = default
    while ef <= MAX_EF_SEARCH:
        yield ef
        ef *= 2


def bench_search_size(data: SyntheticEmbeddings, size: int, queries: np.ndarray,
                      hnsw: HnswSettings) -> list[SearchRow]:
    indexes, build_s = build_indexes(data, size, hnsw)
    times, truth = latencies_ms(indexes[IndexKind.FLAT], queries, f"flat {size:,}")
    rows = [search_row(size, IndexKind.FLAT, None, times, 1.0, build_s[IndexKind.FLAT])]
    graph = indexes.pop(IndexKind.HNSW)
    del indexes  # free the flat copy before the HNSW runs
    for ef in ef_schedule(hnsw.ef_search):
        graph.set_ef_search(ef)
        times, found = latencies_ms(graph, queries, f"hnsw ef={ef} {size:,}")
        rows.append(search_row(size, IndexKind.HNSW, ef, times, recall(found, truth), build_s[IndexKind.HNSW]))
        if rows[-1].recall_at_10 >= RECALL_TARGET:
            break
    return rows


def search_row(size: int, kind: IndexKind, ef: int | None, times: np.ndarray, recall_at_10: float,
               build_s: float) -> SearchRow:
    return SearchRow(size=size, index=kind.value, ef_search=ef, p50_ms=float(np.percentile(times, 50)),
                     p99_ms=float(np.percentile(times, 99)), recall_at_10=recall_at_10, build_s=build_s)


def bench_search(sizes: Sequence[int], n_queries: int, seed: int) -> list[SearchRow]:
    data = SyntheticEmbeddings(seed)
    queries = data.queries(n_queries)
    return [row for size in sizes for row in bench_search_size(data, size, queries, HnswSettings())]
