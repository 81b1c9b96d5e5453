"""`python -m reranker.bench speed`: how long one rerank takes.

    python -m reranker.bench speed --n-docs 10,25,50,100,200,500 --block-tokens 160 \
        --out bench-results/reranker_speed.json

Wall time of one rerank with BlockRank (block-sparse attention, early
exit at the scoring layer) against the usual listwise LLM reranker (the same
prompt through the full model with ordinary causal attention, prefill up to
the first answer token's logits), on the same model, documents and device,
side by side. Dense sizes whose predicted time exceeds --dense-budget-s (or
that run out of memory) are skipped and the JSON says why.

Same weights on both sides: the reranker's adapter merged into a copy of the
model (`blockrank_s`, `full_attention_s`, `speedup`), as a single-tenant
deployment would run it. `blockrank_tenant_s` is the same rerank with the
adapter as the engine serves tenants, an unmerged LoRA block over the shared
base (its low-rank products cost extra kernels per layer).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from common.beir import iter_corpus
from common.device import describe_device
from common.paths import SCIFACT
from common.plots import figure
from reranker import kernels
from reranker.batcher import prompt_tokens
from reranker.blockrank import BlockRankForward, ScoringSpec
from reranker.engine import Reranker, RerankerConfig
from reranker.prompt import DEFAULT_BLOCK_TOKENS, Prompt
from reranker.reference import full_causal_ids
from reranker.routing import SharedPrefixCache
from reranker.tenants import TenantHandle

QUERY = "Which genetic factors increase the risk of type 2 diabetes?"  # a SciFact-like question, every size


def timed(fn: Callable[[], object], device: torch.device, min_runs: int, budget_s: float, warmup: int = 0) -> float:
    """Median wall time over at least `min_runs` runs... unless one run already eats the budget. `warmup` runs
    first, untimed (a GPU's kernel choice, a CUDA graph's capture: reranker.graphs captures a shape's 2nd run)."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    while len(times) < min_runs and (not times or sum(times) < budget_s):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def predict_quadratic(points: list[tuple[int, float]], n: int) -> float:
    """Conservative extrapolation of dense time: quadratic growth from the largest measured size."""
    if not points:
        return 0.0
    n0, t0 = points[-1]
    return t0 * (n / n0) ** 2


def speed(args: argparse.Namespace) -> dict:
    reranker = Reranker(RerankerConfig(model=args.model, device=args.device, block_tokens=args.block_tokens))
    handle = reranker.handle()
    merged = merged_forward(reranker)
    corpus = [(d.title, d.text) for d in itertools.islice(iter_corpus(args.data), 2000)]
    reranker.score_prompts([reranker.build_prompt(QUERY, corpus[:4], handle)], [handle])  # warm-up
    rows: list[dict] = []
    dense_points: list[tuple[int, float]] = []
    for n in tqdm([int(n) for n in args.n_docs.split(",")], desc="sizes", unit="size"):
        prompt = reranker.build_prompt(QUERY, [corpus[i % len(corpus)] for i in range(n)], handle)
        row = measure_size(args, reranker, handle, merged, prompt, dense_points)
        rows.append(row)
        tqdm.write(json.dumps(row))
    by_n = {r["n_docs"]: r["blockrank_s"] for r in rows}
    result = {
        "device": describe_device(reranker.lm.device), "model": handle.settings.model_name,
        "weights": "adapter merged into a copy of the model, both sides" if merged is not reranker.forward
        else "the base model, both sides",
        "dtype": str(reranker.lm.dtype), "block_tokens": args.block_tokens,
        "scoring_layer": handle.settings.spec.layer, "num_layers": reranker.forward.num_layers,
        "threads": torch.get_num_threads(),
        "blockrank_path": "packed rows, SDPA kernels" if merged.gpu_path else "chunked, einsum attention",
        "cuda_graph_captures": merged.graphs.captures + reranker.forward.graphs.captures,
        "triton_kernels": reranker.lm.device.type == "cuda" and kernels.ENABLED,
        "full_attention_implementation": merged.model.config._attn_implementation, "results": rows,
    }
    if 100 in by_n and 500 in by_n:
        result["blockrank_500_over_100"] = by_n[500] / by_n[100]
    return result


def merged_forward(reranker: Reranker) -> BlockRankForward:
    """The default tenant's reranker with its adapter folded into a copy of the weights (the base model's own
    forward when there is no adapter): what both sides of the comparison run."""
    if reranker.adapter is None:
        return reranker.forward
    from reranker.training.derive import merge_adapter  # peft: the [train] extra

    model = merge_adapter(copy.deepcopy(reranker.lm.model), reranker.adapter)
    return BlockRankForward(model, SharedPrefixCache(reranker.config.prefix_cache_mb << 20),
                            cuda_graphs=reranker.config.cuda_graphs)


def host_scores(forward: BlockRankForward, prompt: Prompt, spec: ScoringSpec) -> list[list[float]]:
    """One rerank on `forward`, its scores back on the host (as Reranker.score_prompts returns them)."""
    return [s.float().cpu().tolist() for s in forward.score([prompt], spec)]


def measure_size(args: argparse.Namespace, reranker: Reranker, handle: TenantHandle, merged: BlockRankForward,
                 prompt: Prompt, dense_points: list[tuple[int, float]]) -> dict:
    """One size: BlockRank (merged, then as a tenant block), then the full-attention baseline on the same prompt
    unless predicted too slow."""
    device, n, spec = reranker.lm.device, prompt.n_docs, handle.settings.spec
    warmup = 2 if device.type == "cuda" else 0

    def blockrank() -> list[list[float]]:
        return host_scores(merged, prompt, spec)

    blockrank_s = timed(blockrank, device, args.repeats, args.budget_s, warmup)
    row: dict = {"n_docs": n, "tokens": prompt_tokens(prompt), "blockrank_s": blockrank_s, "full_attention_s": None}
    if merged is not reranker.forward:
        row["blockrank_tenant_s"] = timed(lambda: reranker.score_prompts([prompt], [handle]), device, args.repeats,
                                          args.budget_s, warmup)
    if device.type == "cuda":  # what the CUDA graphs (reranker.graphs) are worth: the same forward, eager
        with merged.graphs.eager():
            row["blockrank_eager_s"] = timed(blockrank, device, args.repeats, args.budget_s, 1)
    predicted = predict_quadratic(dense_points, n)
    if predicted > args.dense_budget_s:
        row["skipped"] = f"predicted {predicted:.0f}s > --dense-budget-s {args.dense_budget_s:.0f}"
        return row
    ids = full_causal_ids(prompt)[None].to(device)
    try:
        with torch.inference_mode():
            dense_s = timed(lambda: merged.model(input_ids=ids, logits_to_keep=1), device, args.repeats,
                            args.budget_s, min(warmup, 1))
    except torch.OutOfMemoryError:
        row["skipped"] = "out of memory"
        torch.cuda.empty_cache()
        return row
    row["full_attention_s"] = dense_s
    row["speedup"] = dense_s / blockrank_s
    dense_points.append((n, dense_s))
    return row


def plot_speed(result: dict, path: Path) -> None:
    rows = result["results"]
    with figure(path, (7, 4.5)) as ax:
        ax.plot([r["n_docs"] for r in rows], [r["blockrank_s"] for r in rows], marker="o",
                label=f"BlockRank (layers 0..{result['scoring_layer']})")
        tenant = [r for r in rows if r.get("blockrank_tenant_s")]
        if tenant:
            ax.plot([r["n_docs"] for r in tenant], [r["blockrank_tenant_s"] for r in tenant], marker="o",
                    linestyle="--", label="BlockRank, adapter as an unmerged tenant block")
        eager = [r for r in rows if r.get("blockrank_eager_s")]
        if eager:
            ax.plot([r["n_docs"] for r in eager], [r["blockrank_eager_s"] for r in eager], marker="o",
                    linestyle=":", label="BlockRank without CUDA graphs")
        dense = [r for r in rows if r["full_attention_s"] is not None]
        ax.plot([r["n_docs"] for r in dense], [r["full_attention_s"] for r in dense], marker="s",
                label=f"full causal attention ({result['num_layers']} layers)")
        for r in dense:
            ax.annotate(f"{r['speedup']:.1f}x", (r["n_docs"], r["full_attention_s"]), textcoords="offset points",
                        xytext=(0, 6), ha="center", fontsize=8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"documents ({result['block_tokens']}-token blocks)")
        ax.set_ylabel("seconds per rerank")
        ax.set_title(f"{result['model']} on {result['device']}")
        ax.legend()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n-docs", default="10,25,50,100,200,500")
    p.add_argument("--block-tokens", type=int, default=DEFAULT_BLOCK_TOKENS)
    p.add_argument("--model", default="")
    p.add_argument("--device", default="auto")
    p.add_argument("--data", type=Path, default=SCIFACT)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--budget-s", type=float, default=60.0, help="stop repeating a point after this long")
    p.add_argument("--dense-budget-s", type=float, default=400.0)
    p.add_argument("--out", type=Path, required=True)
