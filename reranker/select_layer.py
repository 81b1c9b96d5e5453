"""Pick BlockRank's scoring layer and heads on training data (never the test split).

    python -m reranker.select_layer --data ../shared/data/scifact --split train \
        --max-queries 150 --depth 20

For each judged query, the first-stage top-`depth` candidates are scored at
every layer up to `--max-layer` in one pass (attention mass of the signal
tokens, per head). The layer whose all-head score gives the best nDCG@10 wins;
then heads are ranked by their own nDCG@10 at that layer and the best top-k
subset is kept. The choice is written to reranker/scoring/<model>.json, which
the engine reads at start-up, with a per-layer curve as PNG.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import ir_measures
import torch
from ir_measures import nDCG
from tqdm.auto import tqdm

from reranker.candidates import first_stage
from reranker.engine import SCORING_DIR, Reranker, RerankerConfig
from retriever.beir import load_qrels

ROOT = Path(__file__).resolve().parent.parent


def ndcg10(qrels: dict, runs: dict[str, dict[str, float]]) -> float:
    return float(ir_measures.calc_aggregate([nDCG @ 10], qrels, runs)[nDCG @ 10])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "scifact")
    parser.add_argument("--split", default="train")
    parser.add_argument("--max-queries", type=int, default=150)
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--block-tokens", type=int, default=160)
    parser.add_argument("--max-layer", type=int, default=-1, help="default: 2/3 of the depth (keep it cheap)")
    parser.add_argument("--model", default="")
    parser.add_argument("--retriever-dir", type=Path, default=ROOT / "var" / "retriever")
    parser.add_argument("--collection", default="scifact")
    parser.add_argument("--out", type=Path, default=None, help="default: reranker/scoring/<model>.json")
    args = parser.parse_args(argv)
    if args.split == "test":
        sys.exit("refusing to tune on the test split")

    reranker = Reranker(RerankerConfig(model_path=args.model, block_tokens=args.block_tokens))
    forward = reranker.forward
    max_layer = args.max_layer if args.max_layer >= 0 else (2 * forward.num_layers) // 3
    layers = list(range(1, max_layer + 1))
    candidates = first_stage(args.data, args.split, args.depth, args.retriever_dir, args.collection,
                             args.max_queries)
    qrels = load_qrels(args.data, args.split)
    qrels = {c.query_id: qrels[c.query_id] for c in candidates}

    # masses[q]: (layers, heads, docs), averaged over the signal tokens
    masses: dict[str, torch.Tensor] = {}
    for cand in tqdm(candidates, desc="scoring all layers", unit="query"):
        prompt = reranker.build_prompt(cand.query, [(d.title, d.text) for d in cand.documents])
        with torch.inference_mode():
            masses[cand.query_id] = forward.head_masses([prompt], max_layer, layers,
                                                        args.block_tokens)[0].mean(dim=1).float().cpu()

    def run_for(select) -> dict[str, dict[str, float]]:
        return {c.query_id: {d.id: float(s) for d, s in zip(c.documents, select(masses[c.query_id]), strict=True)}
                for c in candidates}

    first = ndcg10(qrels, {c.query_id: {d.id: s for d, s in zip(c.documents, c.first_stage_scores, strict=True)}
                           for c in candidates})
    per_layer = [ndcg10(qrels, run_for(lambda m, i=i: m[i].mean(0))) for i in range(len(layers))]
    best = max(range(len(layers)), key=per_layer.__getitem__)
    per_head = [ndcg10(qrels, run_for(lambda m, h=h: m[best, h])) for h in range(forward.n_heads)]
    ranked_heads = sorted(range(forward.n_heads), key=lambda h: -per_head[h])
    subsets = {k: ranked_heads[:k] for k in sorted({1, 2, 3, 4, 6, forward.n_heads}) if k <= forward.n_heads}
    subset_scores = {k: ndcg10(qrels, run_for(lambda m, hs=hs: m[best, hs].mean(0))) for k, hs in subsets.items()}
    k_best = max(subset_scores, key=subset_scores.__getitem__)
    heads = sorted(subsets[k_best]) if k_best < forward.n_heads else []

    result = {
        "model": reranker.model_name, "layer": layers[best], "heads": heads,
        "picked_on": {"data": str(args.data.name), "split": args.split, "queries": len(candidates),
                      "depth": args.depth, "block_tokens": args.block_tokens},
        "ndcg_at_10": {"first_stage": first, "best_layer_all_heads": per_layer[best],
                       "chosen": subset_scores[k_best]},
        "per_layer_all_heads": dict(zip(map(str, layers), per_layer, strict=True)),
        "per_head_at_layer": per_head, "head_subsets": {str(k): v for k, v in subset_scores.items()},
        "command": "python -m reranker.select_layer " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    out = args.out or SCORING_DIR / f"{Path(reranker.model_name).stem}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out.with_suffix(".png"))
    print(f"first stage nDCG@10 {first:.4f}; best layer {layers[best]} (all heads {per_layer[best]:.4f}); "
          f"heads {heads or 'all'} -> {subset_scores[k_best]:.4f}; wrote {out}")
    return 0


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [int(k) for k in result["per_layer_all_heads"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(layers, list(result["per_layer_all_heads"].values()), marker="o", label="attention mass, all heads")
    ax.axhline(result["ndcg_at_10"]["first_stage"], color="gray", linestyle="--", label="first stage")
    ax.set_xlabel("scoring layer")
    ax.set_ylabel("nDCG@10")
    ax.set_title(f"{result['model']}: layer sweep on {result['picked_on']['split']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
