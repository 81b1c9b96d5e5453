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

Several `--dtype` or `--path` values: side by side (reranker.bench.variants).

On CUDA, BlockRank replays CUDA graphs (reranker.graphs) while the eager baseline launches every kernel from
Python: at 10-50 documents that baseline is launch-bound (some 30 ms whatever the size), which flatters
BlockRank. So a second baseline series, `baseline_graphed_s` and `speedup_vs_graphed`: the same full-attention
forward recorded once per input shape in a CUDA graph and timed as replays (copy the ids in, replay), checked
once per size against the eager forward's last-position logits (`baseline_graphed_matches`). A capture that
fails leaves both null with its message in `baseline_graphed_error`; on CPU both are null. The replay is not
always the faster baseline (on an H200 it was from 25 documents on slower than the eager forward, with the same
logits: the captured forward takes another attention kernel), so `speedup_vs_fastest_baseline` compares
BlockRank with whichever baseline is faster at each size.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from common.beir import iter_corpus
from common.device import Dtype, describe_device
from common.paths import SCIFACT
from common.plots import figure
from reranker import kernels
from reranker.batcher import prompt_tokens
from reranker.blockrank import BlockRankForward, ForwardPath, ScoringSpec
from reranker.engine import Reranker, RerankerConfig
from reranker.model import HFModule
from reranker.prompt import DEFAULT_BLOCK_TOKENS, Prompt
from reranker.reference import full_causal_ids
from reranker.routing import SharedPrefixCache
from reranker.rowops import CompileSetting
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


def bench_reranker(args: argparse.Namespace, dtype: str, path: str, cpu_compile: str) -> Reranker:
    """The reranker a speed measurement times: --model, --device, --block-tokens; this dtype, path and setting of
    the compiled CPU row ops."""
    reranker = Reranker(RerankerConfig(model=args.model, device=args.device, dtype=Dtype(dtype),
                                       block_tokens=args.block_tokens, cpu_compile=CompileSetting(cpu_compile)))
    reranker.forward.path = ForwardPath(path)
    return reranker


def variant_name(reranker: Reranker, path: str) -> str:
    """A variant as measured: its dtype, path, and whether its packed path's CPU row ops were compiled."""
    compiled = ", compiled row ops" if reranker.forward.ops.compiled and path != ForwardPath.CHUNKED else ""
    return f"{str(reranker.lm.dtype).removeprefix('torch.')} {path}{compiled}"


def speed_of(args: argparse.Namespace, dtype: str, path: str, cpu_compile: str = "auto") -> dict:
    reranker = bench_reranker(args, dtype, path, cpu_compile)
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
    tqdm.write(summary_table(rows))
    by_n = {r["n_docs"]: r["blockrank_s"] for r in rows}
    result = {
        "device": describe_device(reranker.lm.device), "model": handle.settings.model_name,
        "weights": "adapter merged into a copy of the model, both sides" if merged is not reranker.forward
        else "the base model, both sides",
        "dtype": str(reranker.lm.dtype), "block_tokens": args.block_tokens,
        "variant": variant_name(reranker, path),
        "scoring_layer": handle.settings.spec.layer, "num_layers": reranker.forward.num_layers,
        "threads": torch.get_num_threads(), "blockrank_path": path,  # each row: the path its size took
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
                            path=reranker.forward.path, cuda_graphs=reranker.config.cuda_graphs,
                            row_ops=reranker.forward.ops)


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
    row: dict = {"n_docs": n, "tokens": prompt_tokens(prompt), "blockrank_s": blockrank_s, "full_attention_s": None,
                 "baseline_graphed_s": None, "speedup_vs_graphed": None, "baseline_graphed_matches": None,
                 "path": "packed" if merged.runs_packed([prompt]) else "chunked"}
    if merged is not reranker.forward:
        row["blockrank_tenant_s"] = timed(lambda: reranker.score_prompts([prompt], [handle]), device, args.repeats,
                                          args.budget_s, warmup)
    if device.type == "cuda":  # what the CUDA graphs (reranker.graphs) are worth: the same forward, eager
        with merged.graphs.eager():
            row["blockrank_eager_s"] = timed(blockrank, device, args.repeats, args.budget_s, 1)
    predicted = predict_quadratic(dense_points, n)
    if args.dense_budget_s <= 0:
        row["skipped"] = "--dense-budget-s 0: no full-attention baseline"
        return row
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
    if device.type == "cuda":  # the same baseline without its launch overhead: see the module docstring
        row.update(graphed_baseline(merged.model, ids, args, blockrank_s))
    row["speedup_vs_fastest_baseline"] = min(s for s in (dense_s, row["baseline_graphed_s"]) if s) / blockrank_s
    return row


@dataclass
class GraphedFullAttention:
    """The baseline's forward recorded in a CUDA graph for one input shape. The tensors it holds live in the
    graph's private memory pool (or are read by it): drop the object and the memory goes with it."""

    graph: torch.cuda.CUDAGraph
    ids: torch.Tensor  # static input (1, S): a prompt's ids are copied in before each replay
    logits: torch.Tensor  # static output (1, 1, vocab): the last position's logits, rewritten by each replay
    keep: tuple  # what else the graph reads or wrote (positions, the K/V cache): alive as long as it is

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        self.ids.copy_(ids)
        self.graph.replay()
        return self.logits


def capture_full_attention(model: HFModule, ids: torch.Tensor, warmup: int = 2) -> GraphedFullAttention:
    """Record `model`'s full causal forward over `ids` (1, S) to the last position's logits in a CUDA graph. Call
    under inference_mode, as replays must be too (the static tensors are inference tensors)."""
    device = ids.device
    # Captured on zeros, not on `ids`: the check in graphed_baseline then also proves a replay reads what is
    # copied into the static input.
    static_ids = torch.zeros_like(ids)
    positions = torch.arange(ids.shape[1], device=device)[None]

    def forward() -> object:
        # No attention mask, so SDPA takes its causal kernel, as in the eager baseline. use_cache=True, as the
        # eager baseline runs by default (config.use_cache): while a stream is capturing, transformers 5 cannot
        # look at the position ids to rule out packed sequences and, without a cache, materialises an (S, S)
        # mask, which would send SDPA to a masked kernel; with a cache it leaves the mask out.
        return model(input_ids=static_ids, position_ids=positions, use_cache=True, logits_to_keep=1)

    current, side = torch.cuda.current_stream(device), torch.cuda.Stream(device)
    side.wait_stream(current)
    graph = torch.cuda.CUDAGraph()  # its own memory pool: freed with it, nothing shared with reranker.graphs
    # Warm-up on a side stream, as capture requires (kernel choice, cuBLAS workspaces), then capture (on
    # torch.cuda.graph's own stream). Leaving this block makes `current` current again even when a failed
    # capture_end skips torch.cuda.graph's own restore, so a failure leaves later sizes on the usual stream.
    with torch.cuda.stream(side):
        for _ in range(warmup):
            forward()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            out: Any = forward()
    current.wait_stream(side)
    return GraphedFullAttention(graph, static_ids, out.logits, (positions, out))


def graphed_baseline(model: HFModule, ids: torch.Tensor, args: argparse.Namespace, blockrank_s: float) -> dict:
    """The full-attention baseline replayed from a CUDA graph (CUDA only): its time per forward, the speedup over
    it, and whether its last-position logits match the eager forward's. A capture that fails (an op that cannot
    be captured, out of memory) goes into the row, not up: the job runs unattended and keeps the other numbers."""
    try:
        seconds, replayed, eager = replay_full_attention(model, ids, args)
    except Exception as exc:  # noqa: BLE001 - whatever the capture hit, the size's other numbers stand
        error: str | None = f"{type(exc).__name__}: {exc}"
    else:
        error = None
    # The graph, its pool and static tensors (500 documents: gigabytes) died with replay_full_attention's frame
    # (or with the exception's traceback): hand their memory back before the next size.
    torch.cuda.empty_cache()
    if error is not None:
        tqdm.write(f"full attention in a CUDA graph failed at {ids.shape[1]} tokens: {error}")
        return {"baseline_graphed_error": error}
    return {"baseline_graphed_s": seconds, "speedup_vs_graphed": seconds / blockrank_s,
            "baseline_graphed_matches": logits_match(replayed, eager),
            "baseline_graphed_max_abs_diff": (replayed - eager).abs().max().item()}


def replay_full_attention(model: HFModule, ids: torch.Tensor,
                          args: argparse.Namespace) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Capture, check, time: (seconds per replay, the replay's last-position logits, the eager forward's), both
    float32 copies outside the graph's pool, so nothing of the graph outlives this call."""
    with torch.inference_mode():
        eager = model(input_ids=ids, logits_to_keep=1).logits[0, -1].to(torch.float32, copy=True)
        graphed = capture_full_attention(model, ids)
        replayed = graphed(ids)[0, -1].to(torch.float32, copy=True)  # a copy: each replay rewrites the output
        seconds = timed(lambda: graphed(ids), ids.device, args.repeats, args.budget_s, 1)
    return seconds, replayed, eager


def logits_match(replayed: torch.Tensor, eager: torch.Tensor) -> bool:
    """Equal up to bf16 rounding: the graph replays the eager forward's kernels, but cuBLAS may choose others on
    the capture stream and bf16's 8-bit mantissa compounds over the layers. So within 2% of the logits' scale,
    which a wrong mask, stale input or wrong positions would exceed by far."""
    scale = eager.abs().max().item()
    return bool(torch.allclose(replayed, eager, rtol=2e-2, atol=2e-2 * scale))


def summary_table(rows: list[dict]) -> str:
    """Seconds per rerank, one line per size: BlockRank, the eager baseline and the CUDA-graph one (- where not
    measured: skipped, failed, or on CPU), with BlockRank's speedup over each."""

    def cell(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    lines = [f"{'docs':>5} {'tokens':>7} {'blockrank_s':>12} {'full_eager_s':>13} {'speedup':>8} "
             f"{'full_graphed_s':>15} {'speedup':>8} {'graph ok':>8}"]
    for r in rows:
        matches = r.get("baseline_graphed_matches")
        lines.append(f"{r['n_docs']:>5} {r['tokens']:>7} {r['blockrank_s']:>12.4f} "
                     f"{cell(r['full_attention_s'], '.4f'):>13} {cell(r.get('speedup'), '.1f'):>8} "
                     f"{cell(r.get('baseline_graphed_s'), '.4f'):>15} {cell(r.get('speedup_vs_graphed'), '.1f'):>8} "
                     f"{'-' if matches is None else str(matches):>8}")
    return "\n".join(lines)


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
        graphed = [r for r in rows if r.get("baseline_graphed_s") is not None]
        if graphed:  # CUDA only: the baseline without its kernel-launch overhead
            ax.plot([r["n_docs"] for r in graphed], [r["baseline_graphed_s"] for r in graphed], marker="^",
                    linestyle="--", label="full causal attention in a CUDA graph")
            for r in graphed:
                ax.annotate(f"{r['speedup_vs_graphed']:.1f}x", (r["n_docs"], r["baseline_graphed_s"]),
                            textcoords="offset points", xytext=(0, -12), ha="center", fontsize=8)
        finish_axes(ax, result, "seconds per rerank", "")


def finish_axes(ax: Any, result: dict, ylabel: str, title_suffix: str) -> None:
    """Log-log axes over documents, labels, the title (model and device) and the legend."""
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"documents ({result['block_tokens']}-token blocks)")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{result['model']} on {result['device']}{title_suffix}")
    ax.legend()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n-docs", default="10,25,50,100,200,500")
    p.add_argument("--block-tokens", type=int, default=DEFAULT_BLOCK_TOKENS)
    p.add_argument("--model", default="")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="one or several of auto, fp32, bf16, fp16 (comma-separated: "
                   "each is run, side by side)")
    p.add_argument("--path", default="auto", help="one or several of auto, packed, chunked (reranker.blockrank."
                   "ForwardPath); with --dtype, every combination")
    p.add_argument("--cpu-compile", default="auto", help="one or several of auto, on, off (the reranker's "
                   "--cpu-compile: compiled row ops on a CPU); with --dtype and --path, every combination")
    p.add_argument("--data", type=Path, default=SCIFACT)
    p.add_argument("--repeats", type=int, default=3, help="reranks per point (per round, side by side)")
    p.add_argument("--rounds", type=int, default=3, help="side by side: alternating rounds over the variants")
    p.add_argument("--budget-s", type=float, default=60.0, help="stop repeating a point after this long")
    p.add_argument("--dense-budget-s", type=float, default=400.0, help="0: no full-attention baseline")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one variant's process (side_by_side)
    p.add_argument("--out", type=Path, default=None, help="the JSON (required; a PNG is written beside it)")
