"""`python -m reranker.bench merged`: what the merged weights (reranker.routing.MergedWeights) gain a tenant's
batch on a CPU.

One reranker as the service builds it, its default tenant the shipped adapter; per size, one rerank of SciFact
documents three ways, alternating in rotating rounds in one process:

  deltas apart     the base projections over every row, each adapted module's low-rank delta beside them
                   (what a batch mixing tenants runs; `--merged-weights-mb 0`)
  merged weights   the tenant's deltas folded into copies of the weights (what a batch of one tenant runs)
  merged model     the adapter merged into a copy of the model (the naive deployment, one model per tenant:
                   the bound for the two above)

Per size and way: the median of the rounds, each way's speed-up over deltas apart (median of the rounds'
ratios, with their range), and the largest difference of its scores from the deltas apart.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from common.beir import iter_corpus
from common.device import Dtype, describe_device
from common.fresh import paired_speedup, rotations
from common.paths import SCIFACT
from common.plots import figures, range_whiskers
from reranker.bench.speed import QUERY, host_scores, merged_forward, timed
from reranker.engine import Reranker, RerankerConfig
from reranker.prompt import Prompt
from reranker.routing import MergedWeights

WAYS = ("deltas apart", "merged weights", "merged model")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n-docs", default="20,100", help="documents per rerank, comma-separated sizes")
    p.add_argument("--block-tokens", type=int, default=96)
    p.add_argument("--dtype", default="auto", help="the reranker's --dtype")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3, help="reranks per way and round")
    p.add_argument("--data", type=Path, default=SCIFACT)
    p.add_argument("--out", type=Path)


def ways(reranker: Reranker, prompt: Prompt) -> dict[str, Callable[[], list[list[float]]]]:
    """The three ways of one rerank, each a call returning its scores."""
    handle = reranker.handle()
    model = merged_forward(reranker)
    kept = reranker.forward.weights.merged
    if kept is None:
        raise SystemExit("this reranker keeps no merged weights (a GPU, or --merged-weights-mb 0)")

    def served(merged_weights: MergedWeights | None) -> list[list[float]]:
        reranker.forward.weights.merged = merged_weights
        try:
            return reranker.score_prompts([prompt], [handle])
        finally:
            reranker.forward.weights.merged = kept

    return {"deltas apart": lambda: served(None), "merged weights": lambda: served(kept),
            "merged model": lambda: host_scores(model, prompt, handle.settings.spec)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    reranker = Reranker(RerankerConfig(device="cpu", dtype=Dtype(args.dtype), block_tokens=args.block_tokens))
    sizes = [int(n) for n in args.n_docs.split(",")]
    corpus = [(d.title, d.text) for d in itertools.islice(iter_corpus(args.data), max(sizes))]
    rows = []
    for n in tqdm(sizes, desc="sizes", unit="size"):
        prompt = reranker.build_prompt(QUERY, corpus[:n], reranker.handle())
        calls = ways(reranker, prompt)
        scores = {name: call() for name, call in calls.items()}  # also the warm-up: merged weights are made here
        seconds: dict[str, list[float]] = {name: [] for name in WAYS}
        for name in rotations(list(WAYS), args.rounds):
            seconds[name].append(timed(calls[name], reranker.lm.device, args.repeats, budget_s=1e9))
        reference = scores["deltas apart"][0]
        per_way: dict[str, dict[str, Any]] = {name: {
            "seconds": statistics.median(seconds[name]), "rounds_s": seconds[name],
            **paired_speedup(seconds["deltas apart"], seconds[name]),
            "max_score_difference": max(abs(a - b) for a, b in zip(scores[name][0], reference, strict=True))}
            for name in WAYS}
        rows.append({"n_docs": n, **per_way})
        tqdm.write(f"{n} documents: " + ", ".join(f"{name} {way['seconds'] * 1e3:.1f} ms "
                                                   f"({way['speedup_over_first']:.2f}x)" for name, way in per_way.items()))
    merged = reranker.forward.weights.merged
    return {"device": describe_device(reranker.lm.device), "model": reranker.handle().settings.model_name,
            "dtype": str(reranker.lm.dtype).removeprefix("torch."), "block_tokens": args.block_tokens,
            "threads": torch.get_num_threads(), "rounds": args.rounds, "repeats_per_round": args.repeats,
            "merged_weights_bytes": merged.nbytes if merged is not None else 0, "results": rows}


def plot(result: dict[str, Any], path: Path) -> None:
    rows = result["results"]
    title = (f"one rerank of the default tenant (shipped adapter), {result['dtype']}, {result['threads']} threads:"
             f" median of {result['rounds']} rounds (whiskers: their range)\n{result['model']}\n{result['device']}")
    width = 0.8 / len(WAYS)
    with figures(path, 1, (8.0, 5.0), title) as (ax,):
        for i, name in enumerate(WAYS):
            xs = [x + (i - (len(WAYS) - 1) / 2) * width for x in range(len(rows))]
            medians = [r[name]["seconds"] for r in rows]
            ax.bar(xs, medians, width, yerr=range_whiskers([r[name]["rounds_s"] for r in rows], medians),
                   capsize=3, label=name)
            for x, r in zip(xs, rows, strict=True):
                ax.annotate(f"{r[name]['speedup_over_first']:.2f}x", (x, max(r[name]["rounds_s"])),
                            textcoords="offset points", xytext=(0, 4), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(range(len(rows))), [f"{r['n_docs']} docs x {result['block_tokens']} tokens" for r in rows])
        ax.set_ylabel("seconds per rerank")
        ax.margins(y=0.2)
        ax.legend(fontsize=8)
