"""What `make run` shows once the collection is in: how good each stage is over the test queries, then one query's
stages side by side with the judged documents marked.

The first stages (lexical, dense, hybrid: milliseconds a search) are scored over every judged test query. The
reranked stage (seconds a query on a 2-core CPU) is scored over a fixed sample, one query in every k in the qrels
file's order starting with the first: decided before any result is seen, and spread over the whole file. The
first stages are scored over the same sample beside it, so the reranked figure compares like for like.
The example is the sample query whose nDCG@10 in the last stage is nearest that stage's mean over the sample: a
typical query, neither a showcase nor a failure (on a tie, the first in file order).

Scored with ir-measures on rank-preserving runs, as `make eval` (deploy.eval) scores them.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Mapping, Sequence, Set
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean, stdev

import grpc
import ir_measures
from ir_measures import nDCG
from tqdm.auto import tqdm

from common.beir import load_qrels, split_queries
from common.report import text_table
from deploy.eval import ranked_run, skipped_at_zero
from services.gen.retrieval.v1 import document_pb2, search_pb2, search_pb2_grpc
from services.server import GRPC_OPTIONS

TOP = 10
FIRST_STAGES = {"lexical": document_pb2.RETRIEVAL_MODE_LEXICAL, "dense": document_pb2.RETRIEVAL_MODE_DENSE,
                "hybrid": document_pb2.RETRIEVAL_MODE_HYBRID}
RERANKED = "reranked"
# A first-stage search is tens of milliseconds (the query's embedding): 8 in flight keep both cores busy, 900
# searches in under a minute. A CPU forward pass is compute bound, so more reranks in flight only queue (a second
# one lets the next request's retrieval overlap the running forward pass).
FIRST_STAGE_CONCURRENCY = 8
RERANK_CONCURRENCY = 2
# services.run's --rerank-sample default, 30: a 20-document rerank takes 1.7 s a query on a 2-core CPU with AMX
# (the recorded `make eval`: 300 queries in 516 s) and 8.9 s on a 2-core AVX2-only one (60 in 534 s): 30 queries,
# one in every 10 of SciFact's 300, are about a minute on the first and under five on the second, and still enough
# to set the reranker beside the hybrid stage on the same queries (the paired interval printed with it says how
# far 30 queries resolve them).

Hits = list[search_pb2.SearchHit]
Rankings = dict[str, dict[str, Hits]]  # stage -> query id -> its top hits, best first


@dataclass(frozen=True)
class Sample:
    """One query in every `step` of `total`, in file order, starting with the first."""

    query_ids: list[str]
    step: int
    total: int

    @classmethod
    def every_kth(cls, query_ids: Sequence[str], size: int) -> Sample:
        step = max(1, len(query_ids) // size) if size > 0 else 1
        return cls(list(query_ids[::step][:max(0, size)]), step, len(query_ids))

    def rule(self) -> str:
        which = "every one" if self.step == 1 else f"one in every {self.step}"
        return (f"{len(self.query_ids)} of {self.total} test queries: {which} in the qrels file's order, "
                f"starting with the first")


async def _search_each(target: str, requests: Mapping[tuple[str, str], search_pb2.SearchRequest], concurrency: int,
                       label: str) -> dict[tuple[str, str], search_pb2.SearchResponse]:
    """Every request through the gateway, `concurrency` in flight, a progress bar counting the replies."""
    limit = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(requests), desc=label, unit="search")
    async with grpc.aio.insecure_channel(target, options=GRPC_OPTIONS) as channel:
        stub = search_pb2_grpc.SearchServiceStub(channel)

        async def one(request: search_pb2.SearchRequest) -> search_pb2.SearchResponse:
            async with limit:
                reply: search_pb2.SearchResponse = await stub.Search(request, timeout=600)
            bar.update(1)
            return reply

        replies = await asyncio.gather(*(one(request) for request in requests.values()))
    bar.close()
    return dict(zip(requests, replies, strict=True))


def collect(gateway: str, collection: str, queries: Mapping[str, str], reranked: Sequence[str], depth: int,
            timings: dict[str, float] | None = None, notes: set[str] | None = None,
            rerank_weight: float | None = None) -> Rankings:
    """Top 10 of every first stage for every query; reranked (hybrid top `depth` reranked) for the `reranked` query
    ids, unless depth is 0 or the weight that applies is 0. `timings` gets each pass's wall time in seconds,
    `notes` why reranking was skipped; `rerank_weight`, when given, is asked for in the reranked searches."""
    notes = set() if notes is None else notes

    def request(text: str, mode: document_pb2.RetrievalMode, rerank_depth: int = 0) -> search_pb2.SearchRequest:
        weight = rerank_weight if rerank_depth else None
        return search_pb2.SearchRequest(collection=collection, query=text, top_k=TOP, mode=mode,
                                        rerank_depth=rerank_depth, rerank_weight=weight)

    first = {(stage, qid): request(text, mode) for stage, mode in FIRST_STAGES.items() for qid, text in queries.items()}
    passes = [("first stages", first, FIRST_STAGE_CONCURRENCY)]
    if depth > 0 and reranked:
        rerank = {(RERANKED, qid): request(queries[qid], FIRST_STAGES["hybrid"], depth) for qid in reranked}
        passes.append((f"reranked (hybrid top {depth})", rerank, RERANK_CONCURRENCY))
    rankings: Rankings = {}
    for label, requests, concurrency in passes:
        start = time.perf_counter()
        replies = asyncio.run(_search_each(gateway, requests, concurrency, label))
        if timings is not None:
            timings[label] = time.perf_counter() - start
        # A fail-open gateway answers with the first stage: that must not be scored as reranked. A weight of 0
        # (the collection's or the default) skips the reranker on purpose: that is what is served.
        skipped = [reply.rerank_skipped_reason for reply in replies.values()
                   if reply.rerank_skipped_reason and not skipped_at_zero(reply)]
        if skipped:
            raise RuntimeError(f"the gateway did not rerank {len(skipped)} of {len(replies)} queries: {skipped[0]}")
        for (stage, qid), reply in replies.items():
            if skipped_at_zero(reply):  # served = the first stage: there is no reranked stage to show
                notes.add(reply.rerank_skipped_reason)
                continue
            rankings.setdefault(stage, {})[qid] = list(reply.results)
    return rankings


def ndcg_per_query(qrels: Mapping[str, Mapping[str, int]], ranking: Mapping[str, Hits]) -> dict[str, float]:
    """nDCG@10 of each query of `ranking` (0 for one that found nothing)."""
    run = {qid: ranked_run(hits) for qid, hits in ranking.items() if hits}
    judged = {qid: dict(qrels.get(qid, {})) for qid in run}
    scores = {m.query_id: float(m.value) for m in ir_measures.iter_calc([nDCG @ TOP], judged, run)} if run else {}
    return {qid: scores.get(qid, 0.0) for qid in ranking}


def quality_table(per_query: Mapping[str, Mapping[str, float]], sample: Sample) -> str:
    """stage | nDCG@10 over every query | over the sample (when a stage was scored on it only)."""
    sampled = RERANKED in per_query
    columns = [("stage", ""), (f"{sample.total} queries", ".4f")]
    columns += [(f"{len(sample.query_ids)} sampled", ".4f")] if sampled else []
    rows: list[list[object]] = []
    for stage, scores in per_query.items():
        everywhere = fmean(scores.values()) if len(scores) == sample.total else None
        rows.append([stage, everywhere, *([fmean(scores[q] for q in sample.query_ids)] if sampled else [])])
    return text_table(columns, rows)


def typical_query(scores: Mapping[str, float], candidates: Sequence[str]) -> str:
    """The candidate whose score is nearest the candidates' mean; the first in their order on a tie."""
    mean = fmean(scores[q] for q in candidates)
    return min(candidates, key=lambda q: abs(scores[q] - mean))


def side_by_side(rankings: Mapping[str, Hits], relevant: Set[str], width: int = 26) -> str:
    """rank | one column per stage: each cell a document id and the start of its title, `*` = judged relevant."""
    def cell(hits: Hits, rank: int) -> str:
        if rank >= len(hits):
            return ""
        doc = hits[rank].document
        text = f"{'*' if doc.id in relevant else ' '}{doc.id} {doc.title or doc.text}"
        return text if len(text) <= width else text[:width - 1] + "…"

    deepest = max((len(hits) for hits in rankings.values()), default=0)
    rows = [["rank", *rankings], ["-" * 4, *["-" * width for _ in rankings]]]
    rows += [[str(rank + 1), *[cell(hits, rank) for hits in rankings.values()]] for rank in range(deepest)]
    return "\n".join("  ".join([row[0].rjust(4), *[c.ljust(width) for c in row[1:]]]).rstrip() for row in rows)


def paired_difference(better: Mapping[str, float], base: Mapping[str, float], query_ids: Sequence[str]
                      ) -> tuple[float, float]:
    """Mean of `better - base` over the queries, and the half-width of its 95% interval (normal approximation of
    the paired differences): whether a sample this size can tell the two apart."""
    differences = [better[q] - base[q] for q in query_ids]
    half_width = 1.96 * stdev(differences) / math.sqrt(len(differences)) if len(differences) > 1 else math.inf
    return fmean(differences), half_width


def show_quality(gateway: str, collection: str, data: Path, depth: int, sample_size: int,
                 out: Callable[[str], None] = print, rerank_weight: float | None = None) -> str:
    """The quality table over the test queries, then the typical sample query side by side; returns its id."""
    queries = split_queries(data, "test")
    qrels = load_qrels(data, "test")
    sample = Sample.every_kth(list(queries), sample_size)
    timings: dict[str, float] = {}
    notes: set[str] = set()
    rankings = collect(gateway, collection, queries, sample.query_ids, depth, timings, notes, rerank_weight)
    per_query = {stage: ndcg_per_query(qrels, ranking) for stage, ranking in rankings.items()}
    for note in sorted(notes):
        out(f"\nnot reranked at default settings: {note} (docs/quality.md)")
    served = f" (reranked: hybrid top {depth} reranked, as served)" if RERANKED in per_query else ""
    out(f"\nnDCG@10 on {data.name} test, collection {collection}{served}")
    out(quality_table(per_query, sample))
    if RERANKED in per_query:
        out(f"sampled: {sample.rule()}; every stage is scored on them too, like for like")
        change, half_width = paired_difference(per_query[RERANKED], per_query["hybrid"], sample.query_ids)
        verdict = "within" if abs(change) <= half_width else "beyond"
        out(f"reranked - hybrid on the same {len(sample.query_ids)}: {change:+.4f} ± {half_width:.4f} (95%, paired), "
            f"{verdict} what this sample can resolve")
    out("took " + ", ".join(f"{label} {seconds:.0f}s" for label, seconds in timings.items()))
    last = RERANKED if RERANKED in per_query else "hybrid"
    example = typical_query(per_query[last], sample.query_ids if last == RERANKED else list(queries))
    show_example(example, queries[example], rankings, per_query, qrels.get(example, {}), last, out)
    return example


def show_example(query_id: str, query: str, rankings: Rankings, per_query: Mapping[str, Mapping[str, float]],
                 judged: Mapping[str, int], chosen_by: str, out: Callable[[str], None]) -> None:
    """The example query's stages side by side, its judged documents marked, and why it was the one shown."""
    sampled = "sampled " if chosen_by == RERANKED else ""
    mean = fmean(per_query[chosen_by][q] for q in rankings[chosen_by])
    out(f"\nexample: the {sampled}query whose {chosen_by} nDCG@10 ({per_query[chosen_by][query_id]:.3f}) is nearest "
        f"the {sampled}mean ({mean:.3f}): a typical one, neither best nor worst")
    out(f"query {query_id}: {query}")
    relevant = {doc for doc, grade in judged.items() if grade > 0}
    out(f"judged relevant (*): {', '.join(sorted(relevant))}")
    out(side_by_side({stage: ranking[query_id] for stage, ranking in rankings.items()}, relevant))
    out("nDCG@10  " + "  ".join(f"{stage} {scores[query_id]:.3f}" for stage, scores in per_query.items()))


def show_query(gateway: str, collection: str, query: str, depth: int, out: Callable[[str], None] = print,
               rerank_weight: float | None = None) -> None:
    """A user's own query (nothing judged): every stage side by side."""
    rankings = collect(gateway, collection, {"query": query}, ["query"], depth, rerank_weight=rerank_weight)
    out(f"\nquery: {query}")
    out(side_by_side({stage: ranking["query"] for stage, ranking in rankings.items()}, set()))
