"""Embedding throughput and fidelity, and what precision costs in retrieval quality.

1. Throughput (docs/s) of the same model (all-MiniLM-L6-v2) on the same texts (the first
   `--embed-docs` SciFact documents): sentence-transformers `encode(batch_size=32)` as the reference,
   our `Embedder` at dtype "auto" (bf16 on CPUs with native bf16) and at "fp32". Each row also reports
   the mean/min cosine of its vectors to the reference vectors: how much the speed costs in fidelity.
2. Quality: SciFact test nDCG@10 with exact search over the whole corpus, embedded once in fp32 and
   once in "auto", so a precision change that loses ranking quality shows up here, not in production.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import faiss
import numpy as np
import torch

from common.beir import iter_corpus, load_qrels, split_queries
from retriever.embedder import Embedder, default_model_path

K = 10
WARMUP_TEXTS = 8


@dataclass
class EmbedRow:
    name: str
    precision: str
    docs: int
    seconds: float
    docs_per_s: float
    speedup_vs_st: float
    cosine_to_st_mean: float
    cosine_to_st_min: float


def load_texts(data: Path, limit: int | None) -> list[str]:
    return [doc.embedding_text() for doc in islice(iter_corpus(data), limit)]


def timed_encode(encode: Callable[[list[str]], np.ndarray], texts: list[str]) -> tuple[np.ndarray, float]:
    """Warm once (first-call allocations, lazy init) so the timing measures steady state."""
    encode(texts[:WARMUP_TEXTS])
    start = time.perf_counter()
    vectors = encode(texts)
    return vectors, time.perf_counter() - start


def sentence_transformers_encoder(device: torch.device) -> Callable[[list[str]], np.ndarray]:
    # Imported here: sentence-transformers is a dev-only dependency, needed by this benchmark alone.
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(default_model_path()), device=str(device))
    return lambda texts: model.encode(texts, batch_size=32, normalize_embeddings=True,
                                      show_progress_bar=len(texts) > WARMUP_TEXTS)


def our_encoder(embedder: Embedder) -> Callable[[list[str]], np.ndarray]:
    return lambda texts: embedder.encode(texts, progress=len(texts) > WARMUP_TEXTS)


def bench_embedding(texts: list[str], embedders: dict[str, Embedder], device: torch.device) -> list[EmbedRow]:
    reference, st_seconds = timed_encode(sentence_transformers_encoder(device), texts)
    rows = [embed_row("sentence-transformers", "fp32", reference, reference, st_seconds, st_seconds)]
    for precision, embedder in embedders.items():
        vectors, seconds = timed_encode(our_encoder(embedder), texts)
        name = f"Embedder ({precision})"
        rows.append(embed_row(name, dtype_name(embedder.dtype), vectors, reference, seconds, st_seconds))
    return rows


def embed_row(name: str, precision: str, vectors: np.ndarray, reference: np.ndarray,
              seconds: float, st_seconds: float) -> EmbedRow:
    # Both sides are unit vectors, so the row-wise dot product is the cosine.
    cosines = np.einsum("ij,ij->i", vectors, reference)
    return EmbedRow(name=name, precision=precision, docs=len(vectors), seconds=seconds,
                    docs_per_s=len(vectors) / seconds, speedup_vs_st=st_seconds / seconds,
                    cosine_to_st_mean=float(cosines.mean()), cosine_to_st_min=float(cosines.min()))


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def bench_quality(data: Path, embedders: dict[str, Embedder], max_docs: int | None) -> dict:
    """nDCG@10 per precision with exact search, so only the embedding precision differs."""
    import ir_measures
    from ir_measures import nDCG

    docs = list(islice(iter_corpus(data), max_docs))
    doc_ids = [doc.id for doc in docs]
    qrels = restrict_qrels(load_qrels(data, "test"), set(doc_ids))
    queries = {qid: text for qid, text in split_queries(data, "test").items() if qid in qrels}
    result: dict = {"dataset": "scifact", "split": "test", "corpus_docs": len(docs), "queries": len(queries),
                    "dtype": {p: dtype_name(e.dtype) for p, e in embedders.items()}, "ndcg_at_10": {}}
    corpus_vectors: dict[str, np.ndarray] = {}
    for precision, embedder in embedders.items():
        corpus_vectors[precision] = embedder.encode([doc.embedding_text() for doc in docs], progress=True)
        query_vectors = embedder.encode(list(queries.values()))
        run = exact_run(corpus_vectors[precision], doc_ids, query_vectors, list(queries))
        result["ndcg_at_10"][precision] = ir_measures.calc_aggregate([nDCG @ 10], qrels, run)[nDCG @ 10]
    if {"fp32", "auto"} <= corpus_vectors.keys():
        result["auto_minus_fp32"] = result["ndcg_at_10"]["auto"] - result["ndcg_at_10"]["fp32"]
        cosines = np.einsum("ij,ij->i", corpus_vectors["auto"], corpus_vectors["fp32"])
        result["corpus_cosine_auto_vs_fp32"] = {"mean": float(cosines.mean()), "min": float(cosines.min())}
    return result


def restrict_qrels(qrels: dict[str, dict[str, int]], doc_ids: set[str]) -> dict[str, dict[str, int]]:
    """Judgements on documents we embedded; with a partial corpus (debug runs) the others are unreachable."""
    kept = {qid: {d: rel for d, rel in judged.items() if d in doc_ids} for qid, judged in qrels.items()}
    return {qid: judged for qid, judged in kept.items() if judged}


def exact_run(corpus: np.ndarray, doc_ids: list[str], queries: np.ndarray,
              query_ids: list[str]) -> dict[str, dict[str, float]]:
    index = faiss.IndexFlatIP(corpus.shape[1])
    index.add(corpus)
    scores, rows = index.search(queries, K)
    return {qid: {doc_ids[r]: float(s) for s, r in zip(row_scores, row_ids, strict=True) if r >= 0}
            for qid, row_scores, row_ids in zip(query_ids, scores, rows, strict=True)}
