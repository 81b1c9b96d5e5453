"""Pick BlockRank's scoring layer, heads and fusion weight on training data (never test).

    python -m reranker.training.select_layer --data ../shared/data/scifact --split train --max-queries 120
    python -m reranker.training.select_layer --adapter reranker/adapters/scifact-lora     # after training
    python -m reranker.training.select_layer --adapter DIR --also ../shared/data/nfcorpus  # weight across collections

For each judged query, the first-stage top-`depth` candidates are scored at
every layer up to `--max-layer` in one pass (attention mass of the signal
tokens, per head). The layer whose all-head score gives the best nDCG@10 wins
(with `--adapter`, the layer it was trained for is kept); heads are ranked by
their own nDCG@10 at that layer and the best top-k subset is kept (with
`--adapter`, all heads: its training scored their mean). Last, the
weight of the fused score w·reranker + (1-w)·first stage (both min-max
normalised per query) is fitted by grid search, so a reranker that does not
beat the first stage is not served alone. The base model's choice goes to
reranker/scoring/<model>.json; an adapter's into its blockrank.json (on its
held-out dev queries; with --also, the weight is the best mean over those and other
collections' dev queries, so it holds beyond the adapter's own collection). A per-layer curve is saved as PNG.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import ir_measures
import torch
from ir_measures import nDCG
from tqdm.auto import tqdm

from common.beir import load_qrels
from common.paths import SCIFACT, VAR_DIR
from common.plots import figure
from reranker.adapters import ADAPTER_META, read_json, scoring_file
from reranker.engine import Reranker, RerankerConfig
from reranker.ranking import fuse
from reranker.tenants import TenantHandle
from reranker.training.candidates import Candidates, first_stage

Run = dict[str, dict[str, float]]
FUSION_GRID = [i / 20 for i in range(21)]


def ndcg10(qrels: dict, run: Run) -> float:
    return float(ir_measures.calc_aggregate([nDCG @ 10], qrels, run)[nDCG @ 10])


def collect_masses(reranker: Reranker, candidates: list[Candidates], layers: list[int]) -> dict[str, torch.Tensor]:
    """query id -> (layers, heads, docs) attention masses, averaged over the signal tokens."""
    handle = reranker.handle()
    masses = {}
    for cand in tqdm(candidates, desc="scoring layers", unit="query"):
        prompt = reranker.build_prompt(cand.query, [(d.title, d.text) for d in cand.documents], handle)
        with torch.inference_mode():
            masses[cand.query_id] = reranker.forward.head_masses(
                [prompt], max(layers), layers, handle.settings.spec.block_tokens,
                routes=[handle.route])[0].mean(dim=1).float().cpu()
    return masses


def run_from(candidates: list[Candidates], scores: Callable[[Candidates], list[float]]) -> Run:
    return {c.query_id: {d.id: float(s) for d, s in zip(c.documents, scores(c), strict=True)} for c in candidates}


def choose(reranker: Reranker, candidates: list[Candidates], qrels: dict, layers: list[int],
           trained_score: bool) -> dict:
    """Layer, heads and fusion weight; with `trained_score` (an adapter) the layer and the all-head mean it was
    trained on are kept: picking heads again on ~100 held-out queries fits their noise (model card)."""
    masses = collect_masses(reranker, candidates, layers)

    def at(select: Callable[[torch.Tensor], torch.Tensor]) -> float:
        return ndcg10(qrels, run_from(candidates, lambda c: select(masses[c.query_id]).tolist()))

    first = ndcg10(qrels, run_from(candidates, lambda c: c.first_stage_scores))
    per_layer = [at(partial(_heads_mean, i, slice(None))) for i in range(len(layers))]
    best = len(layers) - 1 if trained_score else max(range(len(layers)), key=per_layer.__getitem__)
    n_heads = reranker.forward.n_heads
    per_head = [at(partial(_heads_mean, best, [h])) for h in range(n_heads)]
    ranked_heads = sorted(range(n_heads), key=lambda h: -per_head[h])
    subsets = {k: ranked_heads[:k] for k in sorted({1, 2, 3, 4, 6, n_heads}) if k <= n_heads}
    subset_scores = {k: at(partial(_heads_mean, best, hs)) for k, hs in subsets.items()}
    k_best = n_heads if trained_score else max(subset_scores, key=subset_scores.__getitem__)
    heads = subsets[k_best]

    model_scores = {q: _heads_mean(best, heads, m).tolist() for q, m in masses.items()}
    fusion = fusion_grid(candidates, qrels, model_scores)
    weight = best_weight(fusion)
    return {
        "layer": layers[best], "heads": sorted(heads) if k_best < n_heads else [], "fusion_weight": weight,
        "ndcg_at_10": {"first_stage": first, "layer_all_heads": per_layer[best], "reranker_alone": subset_scores[k_best],
                       "fused": fusion[weight]},
        "per_layer_all_heads": dict(zip(map(str, layers), per_layer, strict=True)),
        "per_head_at_layer": per_head, "head_subsets": {str(k): v for k, v in subset_scores.items()},
        "fusion_grid": {str(w): v for w, v in fusion.items()},
    }


def fusion_grid(candidates: list[Candidates], qrels: dict, model_scores: dict[str, list[float]]) -> dict[float, float]:
    """nDCG@10 of the fused ranking at every weight of FUSION_GRID."""
    return {w: ndcg10(qrels, run_from(candidates, partial(_fused, model_scores, w))) for w in FUSION_GRID}


def best_weight(grid: dict[float, float]) -> float:
    return max(grid, key=lambda w: (round(grid[w], 6), -w))  # ties: the more conservative weight


def macro_grid(grids: list[dict[float, float]]) -> dict[float, float]:
    """Each collection's nDCG@10 per weight, averaged with one vote per collection (a collection with more
    queries must not outvote the others: the weight has to hold for collections never seen)."""
    return {w: sum(g[w] for g in grids) / len(grids) for w in grids[0]}


def across_collections(reranker: Reranker, chosen: dict, args: argparse.Namespace) -> dict:
    """Refit the fusion weight on the mean over the adapter's held-out queries and every --also collection's
    --also-split queries, at the layer and heads already chosen."""
    heads = chosen["heads"] or slice(None)
    grids = {args.data.name: {float(w): v for w, v in chosen["fusion_grid"].items()}}
    for data in args.also:
        candidates = first_stage(data, args.also_split, args.depth, args.retriever_dir, data.name)
        qrels = judged(data, args.also_split, candidates)
        masses = collect_masses(reranker, candidates, [chosen["layer"]])
        scores = {q: _heads_mean(0, heads, m).tolist() for q, m in masses.items()}
        grids[f"{data.name}/{args.also_split}"] = fusion_grid(candidates, qrels, scores)
    mean = macro_grid(list(grids.values()))
    weight = best_weight(mean)
    own = grids[args.data.name][weight]
    return {"fusion_weight": weight, "ndcg_at_10": chosen["ndcg_at_10"] | {"fused": own},
            "fusion_grid_across_collections": {str(w): v for w, v in mean.items()},
            "fusion_grid_by_collection": {name: {str(w): v for w, v in g.items()} for name, g in grids.items()}}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=SCIFACT)
    parser.add_argument("--split", default="train")
    parser.add_argument("--max-queries", type=int, default=120)
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--block-tokens", type=int, default=0, help="0: the adapter's, else 160")
    parser.add_argument("--max-layer", type=int, default=-1, help="default: 2/3 of the depth (keep it cheap)")
    parser.add_argument("--model", default="")
    parser.add_argument("--adapter", default="", help="calibrate this adapter (its layer stays fixed)")
    parser.add_argument("--also", type=Path, action="append", default=[],
                        help="with --adapter: another BEIR collection whose --also-split queries join the fusion "
                             "weight's choice (mean nDCG@10 over the collections, one vote each); its collection "
                             "in --retriever-dir is named after the directory")
    parser.add_argument("--also-split", default="dev")
    parser.add_argument("--retriever-dir", type=Path, default=VAR_DIR / "retriever")
    parser.add_argument("--collection", default="scifact")
    args = parser.parse_args(argv)
    if "test" in (args.split, args.also_split):
        sys.exit("refusing to tune on the test split")
    return args


@dataclass
class Target:
    """Where the choice is written, what it starts from, which queries and layers it is picked on."""

    path: Path
    meta: dict
    candidates: list[Candidates]
    layers: list[int]


def target(args: argparse.Namespace, reranker: Reranker, handle: TenantHandle) -> Target:
    candidates = first_stage(args.data, args.split, args.depth, args.retriever_dir, args.collection)
    if args.adapter:  # an adapter is calibrated on the train queries its training held out
        path = Path(args.adapter) / ADAPTER_META
        meta = read_json(path)
        held_out = set(meta.get("dev_query_ids", []))
        chosen = [c for c in candidates if c.query_id in held_out] or candidates[: args.max_queries]
        return Target(path, meta, chosen, [handle.settings.spec.layer])
    max_layer = args.max_layer if args.max_layer >= 0 else (2 * reranker.forward.num_layers) // 3
    return Target(scoring_file(reranker.lm.name), {}, candidates[: args.max_queries], list(range(1, max_layer + 1)))


def judged(data: Path, split: str, candidates: list[Candidates]) -> dict:
    """The split's qrels of the queries the candidates are for."""
    qrels = load_qrels(data, split)
    return {c.query_id: qrels[c.query_id] for c in candidates}


def _heads_mean(layer: int, heads: slice | list[int], masses: torch.Tensor) -> torch.Tensor:
    """Scores from one layer's (heads, docs) masses, averaged over the chosen heads."""
    chosen: torch.Tensor = masses[layer, heads].mean(0)
    return chosen


def _fused(model_scores: dict[str, list[float]], weight: float, candidates: Candidates) -> list[float]:
    return fuse(model_scores[candidates.query_id], candidates.first_stage_scores, weight)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reranker = Reranker(RerankerConfig(model=args.model, adapter=args.adapter or "none",
                                       block_tokens=args.block_tokens))
    handle = reranker.handle()
    goal = target(args, reranker, handle)
    qrels = judged(args.data, args.split, goal.candidates)
    chosen = choose(reranker, goal.candidates, qrels, goal.layers, trained_score=bool(args.adapter))
    if args.adapter and args.also:
        chosen |= across_collections(reranker, chosen, args)
    meta = goal.meta | chosen | {
        "model": reranker.lm.name,
        "picked_on": {"data": args.data.name, "split": args.split, "queries": len(goal.candidates),
                      "depth": args.depth, "block_tokens": handle.settings.spec.block_tokens},
        "selection_command": "python -m reranker.training.select_layer " + " ".join(
            argv if argv is not None else sys.argv[1:])}
    goal.path.parent.mkdir(parents=True, exist_ok=True)
    goal.path.write_text(json.dumps(meta, indent=2) + "\n")
    if len(goal.layers) > 1:
        plot(meta, goal.path.with_suffix(".png"))
    n = chosen["ndcg_at_10"]
    print(f"nDCG@10 on {len(goal.candidates)} {args.split} queries: first stage {n['first_stage']:.4f}, "
          f"layer {chosen['layer']} heads {chosen['heads'] or 'all'} -> {n['reranker_alone']:.4f}, "
          f"fused (w={chosen['fusion_weight']:.2f}) {n['fused']:.4f}; wrote {goal.path}")
    return 0


def plot(result: dict, path: Path) -> None:
    layers = [int(k) for k in result["per_layer_all_heads"]]
    with figure(path) as ax:
        ax.plot(layers, list(result["per_layer_all_heads"].values()), marker="o", label="attention mass, all heads")
        ax.axhline(result["ndcg_at_10"]["first_stage"], color="gray", linestyle="--", label="first stage")
        ax.set_xlabel("scoring layer")
        ax.set_ylabel("nDCG@10")
        ax.set_title(f"{result['model']}: layer sweep on {result['picked_on']['split']}")
        ax.legend()


if __name__ == "__main__":
    sys.exit(main())
