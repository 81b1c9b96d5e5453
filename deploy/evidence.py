"""Evidence for the reranker's weight: candidates collected once per judged query, fused offline at every
weight, paired-bootstrap intervals, and the default weight chosen by leave-one-collection-out.

    # per collection and split: the hybrid top 100 and the reranker's scores of its head, through the gateway
    python -m deploy.evidence collect --gateway 127.0.0.1:50050 --data ../shared/data/nfcorpus \
        --collection nfcorpus --split dev --out var/evidence/nfcorpus-dev.json
    # the default weight from tuning splits only; test splits are measured at it, never used to choose
    python -m deploy.evidence choose --tune var/evidence/scifact-train.json var/evidence/nfcorpus-dev.json \
        --measure var/evidence/*-test.json --out bench-results/quality/weights.json
    # two rerankers' scores of the same candidates (two dtypes, say: reranker.gpu score), side by side
    python -m deploy.evidence compare --base fp32/scifact-test.json.gz --other bf16/scifact-test.json.gz \
        --weights 0.35,1 --out bench-results/quality/bf16-parity.json

The served ranking at weight w is the reranked head ordered by w·minmax(reranker) + (1-w)·minmax(first stage)
(reranker.ranking.fuse, as the reranker serves it), then the first-stage tail; w = 0 is the first stage.
`choose` picks the weight that maximises the worst tuning collection's nDCG@10 gain over its first stage
(ties: the smaller weight), checks the rule by holding each tuning collection out in turn (its weight chosen
on the others alone), and keeps the weight only if every held-out collection's gain has a paired-bootstrap 95%
interval above 0 (the bar deploy.fit_fusion sets for a collection's own weight: a default, which applies where
nothing was measured, needs no less); otherwise the default is 0. The reranker's --default-fusion-weight takes it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import grpc
import ir_measures
import numpy as np
from ir_measures import nDCG

from common.beir import load_qrels, split_queries
from common.files import read_json, write_json, write_result
from common.report import text_table
from reranker.ranking import fuse
from services.gen.retrieval.v1 import document_pb2, search_pb2, search_pb2_grpc
from services.server import GRPC_OPTIONS

GRID = [i / 20 for i in range(21)]
BOOTSTRAP_RESAMPLES = 10_000
CANDIDATES = 100  # the first-stage list judged (nDCG@10 needs the top 10; the rest keeps recall honest)
Qrels = dict[str, dict[str, int]]
Run = dict[str, dict[str, float]]


@dataclass(frozen=True)
class Candidates:
    """One query's first-stage list (best first) and the reranker's scores of its head, in that order."""

    ids: list[str]
    first_stage: list[float]
    model: list[float]  # the first len(model) ids: the reranked head


@dataclass(frozen=True)
class Evidence:
    collection: str
    split: str
    depth: int
    qrels: Qrels
    queries: dict[str, Candidates]

    @staticmethod
    def load(path: Path) -> Evidence:
        """From JSON, gzipped when the name ends in .gz."""
        raw = read_json(path)
        return Evidence(raw["collection"], raw["split"], raw["depth"], raw["qrels"],
                        {q: Candidates(**c) for q, c in raw["queries"].items()})

    def save(self, path: Path) -> None:
        write_json(path, asdict(self))

    @property
    def name(self) -> str:
        return f"{self.collection} {self.split}"

    @cached_property
    def judged(self) -> Qrels:
        """The judgments of the queries collected."""
        return {q: rel for q, rel in self.qrels.items() if q in self.queries}

    @cached_property
    def first_stage_ndcg(self) -> dict[str, float]:
        """Per judged query, the first stage's nDCG@10: computed once, compared at every weight."""
        return per_query_ndcg(self.judged, {q: as_run(c.ids) for q, c in self.queries.items()})


@dataclass(frozen=True)
class Interval:
    """A paired difference's mean over queries and its bootstrap 95% interval."""

    mean: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.mean:+.4f} [{self.low:+.4f}, {self.high:+.4f}]"


# ---- arithmetic -----------------------------------------------------------------------------------------------
def fused_order(candidates: Candidates, weight: float) -> list[str]:
    """The served ranking at `weight`: the head by the fused score (ties keep first-stage order), then the tail."""
    depth = len(candidates.model)
    if depth == 0 or weight == 0.0:
        return list(candidates.ids)
    scores = fuse(candidates.model, candidates.first_stage[:depth], weight)
    head = sorted(range(depth), key=lambda i: -scores[i])
    return [candidates.ids[i] for i in head] + candidates.ids[depth:]


def as_run(ranked: Sequence[str]) -> dict[str, float]:
    """Rank-preserving scores, best first."""
    return {doc_id: float(len(ranked) - rank) for rank, doc_id in enumerate(ranked)}


def per_query_ndcg(qrels: Qrels, run: Run) -> dict[str, float]:
    """nDCG@10 of every judged query (0 for a query the run does not answer)."""
    values = {q: 0.0 for q in qrels}
    for metric in ir_measures.iter_calc([nDCG @ 10], qrels, run):
        values[metric.query_id] = float(metric.value)
    return values


def paired_bootstrap(differences: Sequence[float], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> Interval:
    """Mean of per-query differences with the percentile 95% interval over `resamples` resamplings of the
    queries (with replacement): how far the mean could move with another draw of queries like these."""
    values = np.asarray(differences, dtype=np.float64)
    if values.size == 0:
        return Interval(0.0, 0.0, 0.0)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(resamples, values.size))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return Interval(float(values.mean()), float(low), float(high))


def served_minus_first_stage(evidence: Evidence, weight: float) -> list[float]:
    """Per judged query: nDCG@10 served at `weight` minus the first stage's."""
    first = evidence.first_stage_ndcg
    served = per_query_ndcg(evidence.judged, {q: as_run(fused_order(c, weight)) for q, c in evidence.queries.items()})
    return [served[q] - first[q] for q in evidence.judged]


def mean_gains(evidence: Evidence, grid: Iterable[float] = GRID) -> dict[float, float]:
    """The mean nDCG@10 gain over the first stage at each weight of the grid."""
    return {w: float(np.mean(served_minus_first_stage(evidence, w))) for w in grid}


def best(grid: dict[float, float], prefer: Callable[[float], float]) -> float:
    """The weight with the best score (rounded, so float noise does not decide); ties broken by `prefer`."""
    return max(grid, key=lambda w: (round(grid[w], 6), -prefer(w)))


def maximin_weight(gains: Sequence[dict[float, float]]) -> float:
    """The weight whose worst collection gains most (ties: the smaller)."""
    return best({w: min(g[w] for g in gains) for w in GRID}, prefer=lambda w: w)


# ---- the choice -----------------------------------------------------------------------------------------------
def choose(tune: Sequence[Evidence], measure: Sequence[Evidence]) -> dict[str, Any]:
    """The default weight (see the module doc), the leave-one-out rows behind it, and the measured collections
    at the chosen weight."""
    gains = {e.name: mean_gains(e) for e in tune}
    held_out: list[dict[str, Any]] = []
    for evidence in tune:
        others = [gains[e.name] for e in tune if e is not evidence] or [gains[evidence.name]]
        weight = maximin_weight(others)
        interval = paired_bootstrap(served_minus_first_stage(evidence, weight))
        held_out.append({"held_out": evidence.name, "weight_from_the_others": weight, "queries":
                         len(evidence.queries), "gain": asdict(interval)})
    pooled = maximin_weight(list(gains.values()))
    above_noise = all(row["gain"]["low"] > 0.0 for row in held_out)
    default = pooled if above_noise else 0.0
    measured = [{"collection": e.name, "queries": len(e.queries),
                 "gain": asdict(paired_bootstrap(served_minus_first_stage(e, default))),
                 "grid": mean_gains(e)} for e in measure]
    return {"default_weight": default, "maximin_weight_of_all_tuning": pooled, "held_out_gains_above_noise": above_noise,
            "leave_one_out": held_out, "tuning_grids": gains, "measured_at_default": measured}


def report(result: dict[str, Any]) -> str:
    def gain(row: Any) -> str:
        return str(Interval(**row["gain"]))

    loo = text_table([("held out", ""), ("queries", "d"), ("weight from the others", ".2f"),
                      ("gain over first stage [95%]", "")],
                     [[r["held_out"], r["queries"], r["weight_from_the_others"], gain(r)]
                      for r in result["leave_one_out"]])
    verdict = (f"default weight {result['default_weight']:.2f} (maximin over every tuning collection "
               f"{result['maximin_weight_of_all_tuning']:.2f}; every held-out gain's interval above 0: "
               f"{result['held_out_gains_above_noise']})")
    if not result["measured_at_default"]:
        return f"{loo}\n\n{verdict}"
    measured = text_table([("measured at the default", ""), ("queries", "d"), ("gain over first stage [95%]", "")],
                          [[r["collection"], r["queries"], gain(r)] for r in result["measured_at_default"]])
    return f"{loo}\n\n{verdict}\n\n{measured}"


# ---- two rerankers on the same candidates ------------------------------------------------------------------------
def compare(base: Evidence, other: Evidence, weights: Sequence[float]) -> dict[str, Any]:
    """nDCG@10 served at each weight with `base`'s reranker scores and with `other`'s, on identical candidates,
    the per-query difference (other - base) with its paired-bootstrap interval; and how alike the two rankings of
    each head are (Kendall's tau of the two score lists, mean over queries)."""
    if base.queries.keys() != other.queries.keys() or any(
            base.queries[q].ids[:base.depth] != other.queries[q].ids[:other.depth] for q in base.queries):
        raise ValueError("the two evidence files must hold the same queries and candidates")
    rows = []
    for weight in weights:
        ndcg = [per_query_ndcg(e.judged, {q: as_run(fused_order(c, weight)) for q, c in e.queries.items()})
                for e in (base, other)]
        rows.append({"weight": weight, "base": float(np.mean(list(ndcg[0].values()))),
                     "other": float(np.mean(list(ndcg[1].values()))),
                     "other_minus_base": asdict(paired_bootstrap([ndcg[1][q] - ndcg[0][q] for q in base.judged]))})
    taus = [kendall_tau(base.queries[q].model, other.queries[q].model) for q in base.queries]
    return {"collection": base.collection, "split": base.split, "queries": len(base.judged), "depth": base.depth,
            "first_stage": float(np.mean(list(base.first_stage_ndcg.values()))),
            "mean_kendall_tau": float(np.mean(taus)), "min_kendall_tau": float(np.min(taus)), "rows": rows}


def kendall_tau(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall's tau-a of two score lists over the same items (1: the same order)."""
    x, y = np.asarray(a), np.asarray(b)
    i, j = np.triu_indices(len(x), k=1)
    return float(np.mean(np.sign(x[i] - x[j]) * np.sign(y[i] - y[j]))) if len(i) else 1.0


# ---- collecting -------------------------------------------------------------------------------------------------
async def collect_candidates(gateway: str, collection: str, queries: dict[str, str], depth: int,
                             concurrency: int = 2, timeout: float = 600.0,
                             progress: Callable[[], object] = lambda: None) -> dict[str, Candidates]:
    """Per query: the hybrid first stage's top CANDIDATES, then the same query reranked (an explicit weight,
    so a default of 0 does not skip it) for the reranker's own scores of the head."""
    limit = asyncio.Semaphore(concurrency)
    async with grpc.aio.insecure_channel(gateway, options=GRPC_OPTIONS) as channel:
        stub = search_pb2_grpc.SearchServiceStub(channel)

        async def one(text: str) -> Candidates:
            async with limit:
                first = await stub.Search(search_pb2.SearchRequest(
                    collection=collection, query=text, top_k=CANDIDATES, mode=document_pb2.RETRIEVAL_MODE_HYBRID),
                    timeout=timeout)
                reranked = await stub.Search(search_pb2.SearchRequest(
                    collection=collection, query=text, top_k=depth, rerank_depth=depth, rerank_weight=1.0,
                    mode=document_pb2.RETRIEVAL_MODE_HYBRID), timeout=timeout)
            progress()
            if depth and not reranked.reranked:
                raise RuntimeError(f"the gateway did not rerank: {reranked.rerank_skipped_reason}")
            model = {h.document.id: h.rerank_model_score for h in reranked.results}
            ids = [h.document.id for h in first.results]
            return Candidates(ids, [h.retrieval_score for h in first.results], [model[i] for i in ids[:depth]])

        answers = await asyncio.gather(*(one(text) for text in queries.values()))
    return dict(zip(queries, answers, strict=True))


def collect(gateway: str, data: Path, collection: str, split: str, depth: int,
            only: set[str] | None = None) -> Evidence:
    from tqdm.auto import tqdm

    queries = {q: t for q, t in split_queries(data, split).items() if only is None or q in only}
    qrels = {q: rel for q, rel in load_qrels(data, split).items() if q in queries}
    with tqdm(total=len(queries), desc=f"evidence {collection} {split}", unit="query") as bar:
        candidates = asyncio.run(collect_candidates(gateway, collection, queries, depth,
                                                    progress=lambda: bar.update(1)))
    return Evidence(collection, split, depth, qrels, candidates)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    take = commands.add_parser("collect", help="candidates and reranker scores for one collection's split")
    take.add_argument("--gateway", required=True, help="SearchService HOST:PORT")
    take.add_argument("--data", type=Path, required=True, help="BEIR-layout directory")
    take.add_argument("--collection", required=True)
    take.add_argument("--split", required=True)
    take.add_argument("--rerank-depth", type=int, default=20)
    take.add_argument("--only-queries-of", type=Path, default=None, metavar="BLOCKRANK_JSON",
                      help="only an adapter's held-out train queries (its dev_query_ids): the rest trained it")
    take.add_argument("--out", type=Path, required=True)
    pick = commands.add_parser("choose", help="the default weight by leave-one-collection-out")
    pick.add_argument("--tune", type=Path, nargs="+", required=True, help="evidence of train/dev splits")
    pick.add_argument("--measure", type=Path, nargs="*", default=[], help="evidence to measure at the choice")
    pick.add_argument("--out", type=Path, default=None, help="JSON, with a PNG of every gain curve beside it")
    side = commands.add_parser("compare", help="two rerankers' scores of the same candidates, side by side")
    side.add_argument("--base", type=Path, required=True)
    side.add_argument("--other", type=Path, required=True)
    side.add_argument("--weights", default="0.35,1", help="fusion weights to serve at (1: the reranker alone)")
    side.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.command == "compare":
        compared = compare(Evidence.load(args.base), Evidence.load(args.other),
                           [float(w) for w in args.weights.split(",")])
        print(json.dumps(compared, indent=2))
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(compared, indent=2) + "\n")
        return 0
    if args.command == "collect":
        only = set(json.loads(args.only_queries_of.read_text())["dev_query_ids"]) if args.only_queries_of else None
        collect(args.gateway, args.data, args.collection, args.split, args.rerank_depth, only).save(args.out)
        print(f"wrote {args.out}")
        return 0
    tune = [Evidence.load(p) for p in args.tune]
    if any(e.split == "test" for e in tune):
        parser.error("refusing to choose a weight on a test split")
    result = choose(tune, [Evidence.load(p) for p in args.measure])
    print(report(result))
    if args.out:
        write_result(args.out, result, plot)
    return 0


def plot(result: dict[str, Any], path: Path) -> None:
    """Mean nDCG@10 gain over the first stage against the weight: tuning collections solid, measured ones dashed,
    the chosen default as a vertical line."""
    from common.plots import figure

    with figure(path, (8, 4.5)) as ax:
        curves = [(name, grid, "-") for name, grid in result["tuning_grids"].items()]
        curves += [(row["collection"], row["grid"], "--") for row in result["measured_at_default"]]
        for name, grid, style in curves:
            ax.plot([float(w) for w in grid], list(grid.values()), style, marker=".", label=name)
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.axvline(result["default_weight"], color="black", linestyle=":", label="default")
        ax.set_xlabel("reranker weight (0: first stage, 1: reranker alone)")
        ax.set_ylabel("nDCG@10 gain over the first stage")
        ax.legend(fontsize=8)


if __name__ == "__main__":
    sys.exit(main())
