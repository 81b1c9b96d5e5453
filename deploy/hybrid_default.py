"""The default hybrid fusion for a collection without fitted weights, chosen by leave-one-collection-out.

    # per collection and split: the dense and the lexical top 100 of every judged query, with their own scores
    python -m deploy.hybrid_default collect --data ../shared/data/scifact --split train \
        --out bench-results/quality/first-stage/scifact-train.json.gz
    # the default from tuning splits only; test splits are measured at it, never used to choose
    python -m deploy.hybrid_default choose --tune .../scifact-train.json.gz .../nfcorpus-dev.json.gz \
        --measure .../*-test.json.gz --out bench-results/quality/hybrid-default.json

A collection's own train queries fit its dense weight (deploy.fit_fusion); every other collection is served
at the default. The hybrid rule asks that no collection's hybrid fall below its better single stage by more
than 0.005 nDCG@10, so the default is judged by its margin: hybrid minus max(lexical, dense), per collection.
`choose` fuses the stored lists offline exactly as the retriever serves them (retriever.fusion.fuse) for every
dense weight 0, 0.05, ..., 1 and for RRF, takes the dense weight whose worst tuning collection's margin is
largest (ties: the one nearest 0.5, equal weight), holds each tuning collection out in turn (the weight
chosen on the others alone) and reports the held-out margins; the measured collections are scored at the
choice, at the current default and with RRF, so the table shows what each would have served.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from common.beir import load_qrels, split_queries
from common.files import read_json, write_json, write_result
from common.report import text_table
from deploy.evidence import GRID, Interval, as_run, best, paired_bootstrap, per_query_ndcg
from retriever.fusion import DEFAULT_CANDIDATE_DEPTH as DEPTH
from retriever.fusion import FusionMethod, FusionSettings, fuse

RRF = "rrf"
EQUAL_WEIGHT = 0.5  # the tie-break: among equally good weights, the one nearest equal weight
Qrels = dict[str, dict[str, int]]


@dataclass(frozen=True)
class FirstStage:
    """Every judged query's dense and lexical lists (id, score), best first."""

    collection: str
    split: str
    qrels: Qrels
    dense: dict[str, list[tuple[str, float]]]
    lexical: dict[str, list[tuple[str, float]]]

    @staticmethod
    def load(path: Path) -> FirstStage:
        raw = read_json(path)
        lists = {side: {q: [(i, s) for i, s in rows] for q, rows in raw[side].items()} for side in ("dense", "lexical")}
        return FirstStage(raw["collection"], raw["split"], raw["qrels"], lists["dense"], lists["lexical"])

    def save(self, path: Path) -> None:
        write_json(path, asdict(self))

    @property
    def name(self) -> str:
        return f"{self.collection} {self.split}"

    def ndcg(self, rank: dict[str, list[str]]) -> dict[str, float]:
        return per_query_ndcg(self.qrels, {q: as_run(ids) for q, ids in rank.items()})

    @cached_property
    def single_stages(self) -> dict[str, dict[str, float]]:
        """Per side ("dense", "lexical"): every judged query's nDCG@10 with that side alone."""
        return {side: self.ndcg({q: [i for i, _ in rows] for q, rows in lists.items()})
                for side, lists in (("dense", self.dense), ("lexical", self.lexical))}

    @cached_property
    def better_single_stage(self) -> str:
        """The stronger of the two sides on these queries (mean nDCG@10)."""
        return max(self.single_stages, key=lambda side: np.mean(list(self.single_stages[side].values())))

    def hybrid(self, settings: FusionSettings) -> dict[str, float]:
        return self.ndcg({q: [h.id for h in fuse(self.dense[q], self.lexical[q], settings, DEPTH)]
                          for q in self.qrels})

    def margin(self, hybrid: dict[str, float]) -> list[float]:
        """Per judged query: the hybrid's nDCG@10 minus the better single stage's (the collection's, not the
        query's)."""
        single = self.single_stages[self.better_single_stage]
        return [hybrid[q] - single[q] for q in self.qrels]


def convex(weight: float) -> FusionSettings:
    return FusionSettings(method=FusionMethod.CONVEX, dense_weight=weight)


def margins_by_weight(stage: FirstStage) -> dict[float, float]:
    return {w: float(np.mean(stage.margin(stage.hybrid(convex(w))))) for w in GRID}


def maximin_dense_weight(grids: Sequence[dict[float, float]]) -> float:
    """The dense weight whose worst collection's margin is largest (ties: the nearest to equal weight)."""
    return best({w: min(g[w] for g in grids) for w in GRID}, prefer=lambda w: abs(w - EQUAL_WEIGHT))


def scored(stage: FirstStage, settings: FusionSettings) -> dict[str, Any]:
    hybrid = stage.hybrid(settings)
    return {"ndcg": float(np.mean(list(hybrid.values()))), "margin": asdict(paired_bootstrap(stage.margin(hybrid)))}


def summary_of(stage: FirstStage) -> dict[str, Any]:
    means = {side: float(np.mean(list(ndcg.values()))) for side, ndcg in stage.single_stages.items()}
    return {"collection": stage.name, "queries": len(stage.qrels), **means,
            "better_single_stage": stage.better_single_stage}


def choose(tune: Sequence[FirstStage], measure: Sequence[FirstStage]) -> dict[str, Any]:
    grids = {s.name: margins_by_weight(s) for s in tune}
    held_out = []
    for stage in tune:
        others = [grids[s.name] for s in tune if s is not stage] or [grids[stage.name]]
        weight = maximin_dense_weight(others)
        held_out.append({**summary_of(stage), "weight_from_the_others": weight, **scored(stage, convex(weight))})
    chosen = maximin_dense_weight(list(grids.values()))
    variants = {f"convex {chosen:.2f} (chosen)": convex(chosen),
                f"convex {EQUAL_WEIGHT:.2f} (equal)": convex(EQUAL_WEIGHT),
                RRF: FusionSettings(method=FusionMethod.RRF)}
    measured = [{**summary_of(s), "variants": {name: scored(s, v) for name, v in variants.items()},
                 "grid": grids[s.name] if s.name in grids else margins_by_weight(s)} for s in [*tune, *measure]]
    return {"chosen_dense_weight": chosen, "leave_one_out": held_out, "tuning_grids": grids, "measured": measured}


def report(result: dict[str, Any]) -> str:
    loo = text_table([("held out", ""), ("queries", "d"), ("weight from the others", ".2f"), ("hybrid", ".4f"),
                      ("hybrid - better single stage [95%]", "")],
                     [[r["collection"], r["queries"], r["weight_from_the_others"], r["ndcg"],
                       str(Interval(**r["margin"]))] for r in result["leave_one_out"]])
    names = list(result["measured"][0]["variants"]) if result["measured"] else []
    rows = [[r["collection"], r["queries"], r["lexical"], r["dense"],
             *(f"{v['ndcg']:.4f} ({v['margin']['mean']:+.4f})" for v in r["variants"].values())]
            for r in result["measured"]]
    measured = text_table([("collection", ""), ("queries", "d"), ("lexical", ".4f"), ("dense", ".4f"),
                           *((name, "") for name in names)], rows)
    return (f"{loo}\n\nchosen dense weight {result['chosen_dense_weight']:.2f} (maximin over the tuning splits)\n\n"
            f"nDCG@10 (hybrid - better single stage):\n{measured}")


def collect(data: Path, split: str, data_dir: Path) -> FirstStage:
    """Both sides' top DEPTH for every judged query of `split`, from the in-process retriever at `data_dir`
    (the BEIR corpus ingested there first if the collection does not hold it all)."""
    from reranker.training.candidates import search

    queries = split_queries(data, split)
    ids = list(queries)
    lists: dict[str, dict[str, list[tuple[str, float]]]] = {}
    for side in ("dense", "lexical"):
        hits = search(data, data_dir, data.name, [queries[q] for q in ids], DEPTH, side)
        lists[side] = {q: [(doc.id, float(score)) for doc, score in row] for q, row in zip(ids, hits, strict=True)}
    qrels = {q: rel for q, rel in load_qrels(data, split).items() if q in queries}
    return FirstStage(data.name, split, qrels, lists["dense"], lists["lexical"])


def plot(result: dict[str, Any], path: Path) -> None:
    """Hybrid minus the better single stage against the dense weight: tuning splits solid, the rest dashed."""
    from common.plots import figure

    tuning = set(result["tuning_grids"])
    with figure(path, (8, 4.5)) as ax:
        for row in result["measured"]:
            grid = row["grid"]
            ax.plot([float(w) for w in grid], list(grid.values()), "-" if row["collection"] in tuning else "--",
                    marker=".", label=row["collection"])
        ax.axhline(-0.005, color="grey", linewidth=0.8, label="the hybrid rule's bound")
        ax.axvline(result["chosen_dense_weight"], color="black", linestyle=":", label="chosen")
        ax.set_xlabel("dense weight (0: lexical alone, 1: dense alone)")
        ax.set_ylabel("nDCG@10, hybrid - better single stage")
        ax.legend(fontsize=8)


def main(argv: list[str] | None = None) -> int:
    from common.paths import VAR_DIR

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    take = commands.add_parser("collect", help="dense and lexical lists for one collection's split")
    take.add_argument("--data", type=Path, required=True, help="BEIR-layout directory (the collection's name)")
    take.add_argument("--split", required=True)
    take.add_argument("--retriever-dir", type=Path, default=VAR_DIR / "retriever")
    take.add_argument("--out", type=Path, required=True)
    pick = commands.add_parser("choose", help="the default dense weight by leave-one-collection-out")
    pick.add_argument("--tune", type=Path, nargs="+", required=True, help="lists of train/dev splits")
    pick.add_argument("--measure", type=Path, nargs="*", default=[], help="lists to measure at the choice")
    pick.add_argument("--out", type=Path, default=None, help="JSON, with a PNG of every margin curve beside it")
    args = parser.parse_args(argv)
    if args.command == "collect":
        collect(args.data, args.split, args.retriever_dir).save(args.out)
        print(f"wrote {args.out}")
        return 0
    tune = [FirstStage.load(p) for p in args.tune]
    if any(s.split == "test" for s in tune):
        parser.error("refusing to choose on a test split")
    result = choose(tune, [FirstStage.load(p) for p in args.measure])
    print(report(result))
    if args.out:
        write_result(args.out, result, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
