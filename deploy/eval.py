"""Retrieval quality through the real SearchService, scored the way IR people do.

    python -m deploy.eval --target 127.0.0.1:50050 --data ../shared/data/scifact \
        --collection scifact [--split test] [--rerank-depth 20] [--max-queries M] [--out FILE.json]

Each judged query of the split runs through the gateway as every first stage (lexical, dense, hybrid; no
reranking) and once reranked (the collection's default first stage, top `--rerank-depth` reranked), side
by side. The reranked reply gives two rankings: the served one (fused with the first stage when a fusion
weight applies) and the reranker's own scores alone. Runs are scored with ir-measures (nDCG@10,
Recall@100, MRR@10). Works on any BEIR-layout directory; `--ingest-target RETRIEVER` first ingests the
corpus if the collection is missing or incomplete.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import ir_measures
from ir_measures import RR, R, nDCG
from tqdm.auto import tqdm

from common.beir import count_corpus, load_qrels, split_queries
from common.report import text_table
from deploy.evidence import Interval, paired_bootstrap, per_query_ndcg
from services.gen.retrieval.v1 import document_pb2, search_pb2, search_pb2_grpc
from services.server import GRPC_OPTIONS

MEASURES = [nDCG @ 10, R @ 100, RR @ 10]
Run = dict[str, dict[str, float]]
FIRST_STAGES = {"lexical (BM25)": document_pb2.RETRIEVAL_MODE_LEXICAL,
                "dense (MiniLM)": document_pb2.RETRIEVAL_MODE_DENSE,
                "hybrid": document_pb2.RETRIEVAL_MODE_HYBRID}
SERVED = "served (default settings)"


@dataclass
class Runs:
    by_system: dict[str, Run] = field(default_factory=dict)
    rerank_ms: list[float] = field(default_factory=list)
    weights: set[tuple[float | None, str]] = field(default_factory=set)  # (weight, source) the served runs used

    def add(self, system: str, qid: str, run: dict[str, float]) -> None:
        self.by_system.setdefault(system, {})[qid] = run


async def collect_runs(target: str, collection: str, queries: dict[str, str], depth: int, top_k: int,
                       concurrency: int, timeout: float) -> Runs:
    runs = Runs()
    limit = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(queries), desc=f"eval {collection}", unit="query")
    async with grpc.aio.insecure_channel(target, options=GRPC_OPTIONS) as channel:
        stub = search_pb2_grpc.SearchServiceStub(channel)

        async def one(qid: str, text: str) -> None:
            async with limit:
                for system, mode in FIRST_STAGES.items():
                    reply = await stub.Search(search_pb2.SearchRequest(collection=collection, query=text,
                                                                       top_k=top_k, mode=mode), timeout=timeout)
                    runs.add(system, qid, ranked_run(reply.results))
                if depth > 0:
                    await rerank_one(stub, collection, qid, text, depth, top_k, timeout, runs)
                bar.update(1)

        await asyncio.gather(*(one(qid, text) for qid, text in queries.items()))
    bar.close()
    return runs


async def rerank_one(stub: Any, collection: str, qid: str, text: str, depth: int, top_k: int, timeout: float,
                     runs: Runs) -> None:
    reply = await stub.Search(search_pb2.SearchRequest(collection=collection, query=text, top_k=top_k,
                                                       rerank_depth=depth), timeout=timeout)
    weight = reply.rerank_weight if reply.HasField("rerank_weight") else None
    runs.weights.add((weight, document_pb2.RerankWeightSource.Name(reply.rerank_weight_source)))
    if reply.reranked:
        runs.add(f"reranker alone (depth {depth})", qid, ranked_run(reranker_alone(reply.results, depth)))
        runs.rerank_ms.append(reply.timings.rerank_ms)
    elif not skipped_at_zero(reply):  # only a weight of 0 skips reranking on purpose
        raise RuntimeError(f"gateway did not rerank: {reply.rerank_skipped_reason}")
    runs.add(SERVED, qid, ranked_run(reply.results))


def skipped_at_zero(reply: search_pb2.SearchResponse) -> bool:
    """Reranking skipped on purpose: the weight that applied was 0."""
    return not reply.reranked and reply.HasField("rerank_weight") and reply.rerank_weight == 0.0


def ranked_run(hits: Sequence[search_pb2.SearchHit]) -> dict[str, float]:
    """Rank-preserving scores, best first (ties in the served scores cannot reorder anything)."""
    return {hit.document.id: float(len(hits) - rank) for rank, hit in enumerate(hits)}


def reranker_alone(hits: Sequence[search_pb2.SearchHit], depth: int) -> list[search_pb2.SearchHit]:
    """The reranked head ordered by the reranker's own score (no fusion), then the first-stage tail."""
    return [*sorted(hits[:depth], key=lambda h: -h.rerank_model_score), *hits[depth:]]


def score(qrels: dict[str, dict[str, int]], run: Run) -> dict[str, float]:
    values = ir_measures.calc_aggregate(MEASURES, qrels, run)
    return {str(m): float(values[m]) for m in MEASURES}


def table(rows: dict[str, dict[str, float]]) -> str:
    names = [str(m) for m in MEASURES]
    return text_table([("system", ""), *[(n, ".4f") for n in names]],
                      [[system, *[vals[n] for n in names]] for system, vals in rows.items()])


def ensure_collection(retriever_target: str, collection: str, data: Path) -> None:
    from services.client import collection_size, ingest_corpus

    if collection_size(retriever_target, collection) != count_corpus(data, indexable_only=True):
        ingest_corpus(retriever_target, collection, data)


def evaluate(target: str, data: Path, collection: str, split: str = "test", depth: int = 20,
             max_queries: int | None = None, concurrency: int = 2, timeout: float = 600.0) -> dict[str, Any]:
    queries = split_queries(data, split)
    if max_queries:
        queries = dict(list(queries.items())[:max_queries])
    qrels = {q: rel for q, rel in load_qrels(data, split).items() if q in queries}
    start = time.perf_counter()
    runs = asyncio.run(collect_runs(target, collection, queries, depth, 100, concurrency, timeout))
    latencies = sorted(runs.rerank_ms)
    result = {
        "data": str(data), "collection": collection, "split": split, "queries": len(queries),
        "rerank_depth": depth, "results": {system: score(qrels, run) for system, run in runs.by_system.items()},
        "seconds": time.perf_counter() - start,
        "rerank_ms_p50": latencies[len(latencies) // 2] if latencies else None,
        "rerank_weights": sorted([w, source] for w, source in runs.weights if w is not None),
    }
    if SERVED in runs.by_system:
        hybrid, served = (per_query_ndcg(qrels, runs.by_system[s]) for s in ("hybrid", SERVED))
        result["served_minus_hybrid"] = asdict(paired_bootstrap([served[q] - hybrid[q] for q in qrels]))
    return result


def summary_table(results: Sequence[dict[str, Any]]) -> str:
    """nDCG@10 of each collection's stages side by side, and served - hybrid with its bootstrap interval."""
    stages = [*FIRST_STAGES, SERVED]
    rows = []
    for r in results:
        ndcg = [r["results"].get(s, {}).get(str(nDCG @ 10)) for s in stages]
        gain = r.get("served_minus_hybrid")
        weights = ", ".join(f"{w:.2f} {source.removeprefix('RERANK_WEIGHT_SOURCE_').lower()}"
                            for w, source in r.get("rerank_weights", []))
        rows.append([f"{r['collection']} {r['split']}", r["queries"], *ndcg,
                     str(Interval(**gain)) if gain else "-", weights or "-"])
    return text_table([("collection", ""), ("queries", "d"), *[(s, ".4f") for s in stages],
                       ("served - hybrid [95%]", ""), ("weight", "")], rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", required=True, help="gateway HOST:PORT")
    parser.add_argument("--data", type=Path, required=True, help="BEIR-layout directory")
    parser.add_argument("--collection", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--rerank-depth", type=int, default=20)
    parser.add_argument("--max-queries", type=int, default=None)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--ingest-target", default="", help="retriever HOST:PORT: ingest the corpus if needed")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.ingest_target:
        ensure_collection(args.ingest_target, args.collection, args.data)
    result = evaluate(args.target, args.data, args.collection, args.split, args.rerank_depth, args.max_queries,
                      args.concurrency)
    print(table(result["results"]))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
