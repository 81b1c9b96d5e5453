"""Batches on a CPU: one chunked forward over the whole batch against packed forwards over groups that fit.

The batcher hands the reranker several requests at once. On a CPU the packed forward (reranker.packed) is the
faster while a batch's rows fit the caches (reranker.packed.cpu_packed_limit); past that the automatic path runs the
batch as several packed forwards of consecutive prompts that fit (cpu_packed_groups), where it used to run one
chunked forward over all of it. This times both on the same reranker, the same prompts (one SciFact query with
`--n-docs` corpus documents each) and the same process, alternating in `--rounds` rounds so that drift on a
shared machine falls on both alike: seconds per query at each batch size, and the largest score difference
between the two paths (they compute the same ranking).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from common.beir import iter_corpus, load_queries
from common.device import Dtype, describe_device
from common.paths import SCIFACT
from common.plots import figure
from reranker.blockrank import ForwardPath
from reranker.engine import Reranker, RerankerConfig
from reranker.packed import cpu_packed_groups
from reranker.prompt import Prompt
from reranker.tenants import TenantHandle

PATHS = (ForwardPath.CHUNKED, ForwardPath.AUTO)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="")
    p.add_argument("--data", type=Path, default=SCIFACT)
    p.add_argument("--dtype", default="auto", help="auto, fp32 or bf16")
    p.add_argument("--n-docs", type=int, default=20, help="documents per query")
    p.add_argument("--block-tokens", type=int, default=96)
    p.add_argument("--batches", default="1,4,8,16", help="batch sizes, in queries")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("bench-results/cpu/reranker_batches.json"))


def batch_prompts(reranker: Reranker, handle: TenantHandle, args: argparse.Namespace, n: int) -> list[Prompt]:
    """n prompts, each a different query over its own `--n-docs` consecutive corpus documents."""
    queries = list(itertools.islice(load_queries(args.data).values(), n))
    corpus = [(d.title, d.text) for d in itertools.islice(iter_corpus(args.data), n * args.n_docs)]
    if len(queries) < n or len(corpus) < n * args.n_docs:
        raise ValueError(f"{args.data} has too few queries or documents for batches of {n}")
    return [reranker.build_prompt(q, corpus[i * args.n_docs:(i + 1) * args.n_docs], handle)
            for i, q in enumerate(queries)]


def cpu_reranker(args: argparse.Namespace) -> Reranker:
    """The reranker a CPU bench times: --model, --dtype and --block-tokens on the CPU."""
    return Reranker(RerankerConfig(model=args.model, device="cpu", dtype=Dtype(args.dtype),
                                   block_tokens=args.block_tokens))


def described(reranker: Reranker) -> dict[str, Any]:
    """What a CPU bench ran on: the device, the reranker's dtype, torch's threads."""
    return {"device": describe_device(reranker.lm.device), "dtype": str(reranker.lm.dtype).removeprefix("torch."),
            "threads": torch.get_num_threads()}


def max_difference(first: list[list[float]], second: list[list[float]]) -> float:
    """The largest difference between two runs' scores of the same prompts."""
    return max(abs(a - b) for x, y in zip(first, second, strict=True) for a, b in zip(x, y, strict=True))


def run(args: argparse.Namespace) -> dict[str, Any]:
    reranker = cpu_reranker(args)
    handle = reranker.handle()
    sizes = [int(b) for b in args.batches.split(",")]
    prompts = batch_prompts(reranker, handle, args, max(sizes))
    reranker.score_prompts(prompts[:1], [handle])  # warm-up
    seconds: dict[tuple[int, str], list[float]] = {(n, p): [] for n in sizes for p in PATHS}
    scores: dict[tuple[int, str], list[list[float]]] = {}
    for _ in tqdm(range(args.rounds), desc="rounds", unit="round"):
        for n, path in itertools.product(sizes, PATHS):
            reranker.forward.path = path
            start = time.perf_counter()
            scores[n, path] = reranker.score_prompts(prompts[:n], [handle] * n)
            seconds[n, path].append((time.perf_counter() - start) / n)
    reranker.forward.path = ForwardPath.AUTO
    rows = []
    for n in sizes:
        chunked, grouped = (statistics.median(seconds[n, p]) for p in PATHS)
        difference = max_difference(scores[n, PATHS[0]], scores[n, PATHS[1]])
        forward = reranker.forward
        groups = cpu_packed_groups(prompts[:n], forward.element_size, forward.cpu_packed_bytes)
        rows.append({"batch": n, "packed_groups": len(groups), "chunked_s_per_query": chunked,
                     "auto_s_per_query": grouped, "auto_speedup": chunked / grouped,
                     "max_score_difference": difference})
        tqdm.write(f"batch {n:3d}: chunked {chunked:.3f} s/query, automatic ({len(groups)} packed forwards) "
                   f"{grouped:.3f} s/query, {chunked / grouped:.2f}x; scores differ by at most {difference:.2g}")
    return {**described(reranker), "n_docs": args.n_docs, "block_tokens": args.block_tokens, "rounds": args.rounds,
            "batcher_default_batch_tokens": reranker.batch_tokens, "results": rows}


def plot(result: dict[str, Any], path: Path) -> None:
    rows = result["results"]
    batches = [r["batch"] for r in rows]
    with figure(path) as ax:
        ax.plot(batches, [r["chunked_s_per_query"] for r in rows], "o-", label="one chunked forward")
        ax.plot(batches, [r["auto_s_per_query"] for r in rows], "s-", label="automatic: packed forwards that fit")
        ax.set_xlabel("queries per batch")
        ax.set_ylabel("seconds per query")
        ax.set_ylim(bottom=0)
        ax.set_title(f"{result['n_docs']} documents x {result['block_tokens']} tokens a query, {result['dtype']}, "
                     f"{result['threads']} threads")
        ax.legend()
