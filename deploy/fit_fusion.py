"""Fit a collection's fusion weights on its train queries and store them with the collection.

    python -m deploy.fit_fusion --gateway 127.0.0.1:50050 --retriever 127.0.0.1:50051 \
        --data ../shared/data/nfcorpus --collection nfcorpus [--split train] [--rerank-depth 20] \
        [--held-out reranker/adapters/scifact-lora/blockrank.json] [--out FILE.json]

1. The hybrid weight: every judged query of the split is retrieved by both first stages (lexical and dense,
   the collection's candidate depth each), fused offline for each dense weight 0, 0.05, ..., 1 (convex,
   retriever.fusion) and scored (nDCG@10); the best weight wins (ties: the one nearest 0.5).
2. The reranker weight (when the gateway has a reranker and --rerank-depth > 0): the queries are searched
   through the gateway with the new hybrid first stage and reranked (deploy.evidence); the top --rerank-depth
   are re-fused offline as w·minmax(reranker) + (1-w)·minmax(first stage) for w in 0..1 and scored; the best
   weight (ties: the smaller) is stored only when the paired-bootstrap 95% interval of its gain over the
   first stage lies above 0; otherwise 0 is stored (Search then skips the reranker on the collection) and the
   summary says why. With --held-out, only the queries listed there (an adapter's `dev_query_ids`: train
   queries its training never saw) fit this weight.
Both go to the collection with UpdateCollection; its default mode becomes hybrid. Never on a test split.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import grpc
import ir_measures
from ir_measures import nDCG

from common.beir import load_qrels, split_queries
from common.report import text_table
from deploy.evidence import (
    GRID,
    Evidence,
    Interval,
    as_run,
    best,
    collect_candidates,
    mean_gains,
    paired_bootstrap,
    served_minus_first_stage,
)
from retriever.fusion import FusionSettings, fuse
from services.convert import fusion_from_pb, fusion_to_pb
from services.gen.retrieval.v1 import (
    document_pb2,
    retriever_pb2,
    retriever_pb2_grpc,
    search_pb2,
    search_pb2_grpc,
)
from services.server import GRPC_OPTIONS

Run = dict[str, dict[str, float]]
Ranked = list[tuple[str, float]]


def ndcg10(qrels: dict[str, dict[str, int]], run: Run) -> float:
    return float(ir_measures.calc_aggregate([nDCG @ 10], qrels, run)[nDCG @ 10])


async def search_all(gateway: str, collection: str, queries: dict[str, str], requests: Callable[[str], Any],
                     concurrency: int = 4) -> dict[str, Any]:
    limit = asyncio.Semaphore(concurrency)
    async with grpc.aio.insecure_channel(gateway, options=GRPC_OPTIONS) as channel:
        stub = search_pb2_grpc.SearchServiceStub(channel)

        async def one(text: str) -> Any:
            async with limit:
                return await stub.Search(requests(text), timeout=600)

        replies = await asyncio.gather(*(one(text) for text in queries.values()))
    return dict(zip(queries, replies, strict=True))


def first_stage_lists(gateway: str, collection: str, queries: dict[str, str], depth: int
                      ) -> dict[str, tuple[Ranked, Ranked]]:
    """Per query: (dense, lexical) candidates with their own scores."""
    def request(mode: document_pb2.RetrievalMode) -> Callable[[str], search_pb2.SearchRequest]:
        return lambda text: search_pb2.SearchRequest(collection=collection, query=text, top_k=depth, mode=mode)

    dense = asyncio.run(search_all(gateway, collection, queries, request(document_pb2.RETRIEVAL_MODE_DENSE)))
    lexical = asyncio.run(search_all(gateway, collection, queries, request(document_pb2.RETRIEVAL_MODE_LEXICAL)))
    return {q: ([(h.document.id, h.retrieval_score) for h in dense[q].results],
                [(h.document.id, h.retrieval_score) for h in lexical[q].results]) for q in queries}


def fit_hybrid(lists: dict[str, tuple[Ranked, Ranked]], qrels: dict[str, dict[str, int]],
               settings: FusionSettings) -> dict[float, float]:
    """nDCG@10 of the convex fusion for each dense weight of the grid."""
    grid = {}
    for weight in GRID:
        trial = replace(settings, dense_weight=weight)
        run = {q: as_run([h.id for h in fuse(d, lx, trial, 100)]) for q, (d, lx) in lists.items()}
        grid[weight] = ndcg10(qrels, run)
    return grid


def fit_rerank(evidence: Evidence) -> tuple[float, dict[float, float], Interval | None]:
    """The reranker weight to store, the mean gain over the first stage at each weight of the grid, and the
    bootstrap interval of the best weight's gain: the best weight only when that interval lies above 0 (a gain
    these queries cannot tell from noise is not worth a reranker's cost), else 0."""
    gains = mean_gains(evidence)
    weight = best(gains, prefer=lambda w: w)  # ties: the smaller weight
    if weight == 0.0:
        return 0.0, gains, None
    interval = paired_bootstrap(served_minus_first_stage(evidence, weight))
    return (weight if interval.low > 0.0 else 0.0), gains, interval


def current_settings(retriever: str, collection: str) -> FusionSettings:
    with grpc.insecure_channel(retriever, options=GRPC_OPTIONS) as channel:
        listed = retriever_pb2_grpc.RetrieverServiceStub(channel).ListCollections(
            retriever_pb2.ListCollectionsRequest(), timeout=30)
    for info in listed.collections:
        if info.name == collection:
            return fusion_from_pb(info.fusion)
    raise SystemExit(f"no collection {collection!r} on {retriever}")


def store(retriever: str, collection: str, settings: FusionSettings) -> None:
    with grpc.insecure_channel(retriever, options=GRPC_OPTIONS) as channel:
        retriever_pb2_grpc.RetrieverServiceStub(channel).UpdateCollection(retriever_pb2.UpdateCollectionRequest(
            collection=collection, default_mode=document_pb2.RETRIEVAL_MODE_HYBRID,
            fusion=fusion_to_pb(settings)), timeout=60)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gateway", required=True, help="SearchService HOST:PORT")
    parser.add_argument("--retriever", required=True, help="RetrieverService HOST:PORT (to store the weights)")
    parser.add_argument("--data", type=Path, required=True, help="BEIR-layout directory")
    parser.add_argument("--collection", required=True)
    parser.add_argument("--split", default="train")
    parser.add_argument("--max-queries", type=int, default=0, help="0 = every judged query of the split")
    parser.add_argument("--rerank-depth", type=int, default=20, help="0: do not fit the reranker weight")
    parser.add_argument("--held-out", type=Path, default=None,
                        help="blockrank.json whose dev_query_ids alone fit the reranker weight")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.split == "test":
        parser.error("refusing to fit on the test split")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    queries = split_queries(args.data, args.split)
    if args.max_queries:
        queries = dict(list(queries.items())[: args.max_queries])
    qrels = {q: rel for q, rel in load_qrels(args.data, args.split).items() if q in queries}
    settings = current_settings(args.retriever, args.collection)
    lists = first_stage_lists(args.gateway, args.collection, queries, settings.candidate_depth)
    hybrid = fit_hybrid(lists, qrels, settings)
    settings = replace(settings, dense_weight=best(hybrid, prefer=lambda w: abs(w - 0.5)))
    store(args.retriever, args.collection, settings)
    result: dict[str, Any] = {"collection": args.collection, "split": args.split, "queries": len(queries),
                              "hybrid_grid": hybrid, "dense_weight": settings.dense_weight}
    if args.rerank_depth > 0:
        held = set(json.loads(args.held_out.read_text()).get("dev_query_ids", [])) if args.held_out else set()
        fit_queries = {q: t for q, t in queries.items() if not held or q in held}
        evidence = Evidence(args.collection, args.split, args.rerank_depth,
                            {q: qrels[q] for q in fit_queries if q in qrels},
                            asyncio.run(collect_candidates(args.gateway, args.collection, fit_queries,
                                                           args.rerank_depth, concurrency=4)))
        weight, gains, interval = fit_rerank(evidence)
        settings = replace(settings, rerank_weight=weight)
        store(args.retriever, args.collection, settings)
        result |= {"rerank_gain_grid": gains, "rerank_weight": weight, "rerank_queries": len(fit_queries),
                   "rerank_gain": asdict(interval) if interval else None}
    print(summary(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def summary(result: dict[str, Any]) -> str:
    hybrid = result["hybrid_grid"]
    text = f"{result['collection']} {result['split']} ({result['queries']} queries), nDCG@10:\n" + text_table(
        [("fitted", ""), ("weight", ".2f"), ("at weight", ".4f"), ("at 0", ".4f"), ("at 1", ".4f")],
        [["hybrid dense weight", result["dense_weight"], hybrid[result["dense_weight"]], hybrid[0.0], hybrid[1.0]]])
    if "rerank_gain_grid" in result:
        gains, gain = result["rerank_gain_grid"], result["rerank_gain"]
        top = best(gains, prefer=lambda w: w)
        verdict = (f"reranker weight {result['rerank_weight']:.2f}: at its best weight {top:.2f} the reranker "
                   f"gains {gains[top]:+.4f} nDCG@10 over the first stage on {result['rerank_queries']} queries")
        if gain:
            verdict += f", 95% interval {Interval(**gain)}"
        if result["rerank_weight"] == 0.0:
            verdict += ("; not above 0, so 0 is stored and Search skips the reranker on this collection "
                        "(a request can still set rerank_weight)")
        text += "\n" + verdict
    return text


if __name__ == "__main__":
    sys.exit(main())
