"""Pick BlockRank's scoring layer, heads and fusion weight on training data (never test).

    python -m reranker.select_layer --data ../shared/data/scifact --split train --max-queries 120
    python -m reranker.select_layer --adapter reranker/adapters/scifact-lora     # after training

For each judged query, the first-stage top-`depth` candidates are scored at
every layer up to `--max-layer` in one pass (attention mass of the signal
tokens, per head). The layer whose all-head score gives the best nDCG@10 wins
(with `--adapter`, the layer it was trained for is kept); heads are ranked by
their own nDCG@10 at that layer and the best top-k subset is kept. Last, the
weight of the fused score w·reranker + (1-w)·first stage (both min-max
normalised per query) is fitted by grid search, so a reranker that does not
beat the first stage is not served alone. The base model's choice goes to
reranker/scoring/<model>.json; an adapter's into its blockrank.json (on its
held-out dev queries). A per-layer curve is saved as PNG.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import ir_measures
import torch
from ir_measures import nDCG
from tqdm.auto import tqdm

from reranker.candidates import Candidates, first_stage
from reranker.engine import ADAPTER_META, SCORING_DIR, Reranker, RerankerConfig, fuse
from reranker.plots import figure
from retriever.beir import load_qrels

ROOT = Path(__file__).resolve().parent.parent
Run = dict[str, dict[str, float]]
FUSION_GRID = [i / 20 for i in range(21)]


def ndcg10(qrels: dict, run: Run) -> float:
    return float(ir_measures.calc_aggregate([nDCG @ 10], qrels, run)[nDCG @ 10])


def collect_masses(reranker: Reranker, candidates: list[Candidates], layers: list[int]) -> dict[str, torch.Tensor]:
    """query id -> (layers, heads, docs) attention masses, averaged over the signal tokens."""
    masses = {}
    for cand in tqdm(candidates, desc="scoring layers", unit="query"):
        prompt = reranker.build_prompt(cand.query, [(d.title, d.text) for d in cand.documents])
        with torch.inference_mode():
            masses[cand.query_id] = reranker.forward.head_masses(
                [prompt], max(layers), layers, reranker.spec.block_tokens,
                routes=[reranker.default.route])[0].mean(dim=1).float().cpu()
    return masses


def run_from(candidates: list[Candidates], scores: Callable[[Candidates], list[float]]) -> Run:
    return {c.query_id: {d.id: float(s) for d, s in zip(c.documents, scores(c), strict=True)} for c in candidates}


def choose(reranker: Reranker, candidates: list[Candidates], qrels: dict, layers: list[int],
           fixed_layer: bool) -> dict:
    masses = collect_masses(reranker, candidates, layers)

    def at(select: Callable[[torch.Tensor], torch.Tensor]) -> float:
        return ndcg10(qrels, run_from(candidates, lambda c: select(masses[c.query_id]).tolist()))

    first = ndcg10(qrels, run_from(candidates, lambda c: c.first_stage_scores))
    per_layer = [at(lambda m, i=i: m[i].mean(0)) for i in range(len(layers))]
    best = len(layers) - 1 if fixed_layer else max(range(len(layers)), key=per_layer.__getitem__)
    n_heads = reranker.forward.n_heads
    per_head = [at(lambda m, h=h: m[best, h]) for h in range(n_heads)]
    ranked_heads = sorted(range(n_heads), key=lambda h: -per_head[h])
    subsets = {k: ranked_heads[:k] for k in sorted({1, 2, 3, 4, 6, n_heads}) if k <= n_heads}
    subset_scores = {k: at(lambda m, hs=hs: m[best, hs].mean(0)) for k, hs in subsets.items()}
    k_best = max(subset_scores, key=subset_scores.__getitem__)
    heads = subsets[k_best]

    model_scores = {c.query_id: masses[c.query_id][best, heads].mean(0).tolist() for c in candidates}
    fusion = {w: ndcg10(qrels, run_from(candidates, lambda c, w=w: fuse(model_scores[c.query_id],
                                                                          c.first_stage_scores, w)))
              for w in FUSION_GRID}
    weight = max(FUSION_GRID, key=lambda w: (round(fusion[w], 6), -w))  # ties: the more conservative weight
    return {
        "layer": layers[best], "heads": sorted(heads) if k_best < n_heads else [], "fusion_weight": weight,
        "ndcg_at_10": {"first_stage": first, "layer_all_heads": per_layer[best], "reranker_alone": subset_scores[k_best],
                       "fused": fusion[weight]},
        "per_layer_all_heads": dict(zip(map(str, layers), per_layer, strict=True)),
        "per_head_at_layer": per_head, "head_subsets": {str(k): v for k, v in subset_scores.items()},
        "fusion_grid": {str(w): v for w, v in fusion.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "scifact")
    parser.add_argument("--split", default="train")
    parser.add_argument("--max-queries", type=int, default=120)
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--block-tokens", type=int, default=0, help="0: the adapter's, else 160")
    parser.add_argument("--max-layer", type=int, default=-1, help="default: 2/3 of the depth (keep it cheap)")
    parser.add_argument("--model", default="")
    parser.add_argument("--adapter", default="", help="calibrate this adapter (its layer stays fixed)")
    parser.add_argument("--retriever-dir", type=Path, default=ROOT / "var" / "retriever")
    parser.add_argument("--collection", default="scifact")
    args = parser.parse_args(argv)
    if args.split == "test":
        sys.exit("refusing to tune on the test split")

    reranker = Reranker(RerankerConfig(model_path=args.model, adapter=args.adapter or "none",
                                       block_tokens=args.block_tokens))
    candidates = first_stage(args.data, args.split, args.depth, args.retriever_dir, args.collection)
    if args.adapter:
        meta_path = Path(args.adapter) / ADAPTER_META
        meta = json.loads(meta_path.read_text())
        held_out = set(meta.get("dev_query_ids", []))
        candidates = [c for c in candidates if c.query_id in held_out] or candidates[: args.max_queries]
        layers = [reranker.spec.layer]
    else:
        meta_path = SCORING_DIR / f"{Path(reranker.lm.name).stem}.json"
        meta = {}
        candidates = candidates[: args.max_queries]
        max_layer = args.max_layer if args.max_layer >= 0 else (2 * reranker.forward.num_layers) // 3
        layers = list(range(1, max_layer + 1))
    qrels = load_qrels(args.data, args.split)
    qrels = {c.query_id: qrels[c.query_id] for c in candidates}
    chosen = choose(reranker, candidates, qrels, layers, fixed_layer=bool(args.adapter))
    meta.update(chosen)
    meta.update({"model": reranker.lm.name, "picked_on": {"data": args.data.name, "split": args.split,
                                                          "queries": len(candidates), "depth": args.depth,
                                                          "block_tokens": reranker.spec.block_tokens},
                 "selection_command": "python -m reranker.select_layer " + " ".join(
                     argv if argv is not None else sys.argv[1:])})
    meta_path.parent.mkdir(parents=True, exist_ok=True)
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    if len(layers) > 1:
        plot(meta, meta_path.with_suffix(".png"))
    n = chosen["ndcg_at_10"]
    print(f"nDCG@10 on {len(candidates)} {args.split} queries: first stage {n['first_stage']:.4f}, "
          f"layer {chosen['layer']} heads {chosen['heads'] or 'all'} -> {n['reranker_alone']:.4f}, "
          f"fused (w={chosen['fusion_weight']:.2f}) {n['fused']:.4f}; wrote {meta_path}")
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
