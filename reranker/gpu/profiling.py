"""`python -m reranker.gpu profile`: where one rerank's time goes (torch profiler), beside its wall time.

On a GPU a 135M model's arithmetic for 100 x 160 tokens is a few milliseconds; the rest is kernel launches
and Python. The table (top operators by device time, or CPU time on CPU) and the launch count say which.
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from common.beir import iter_corpus
from reranker import kernels
from reranker.bench.speed import QUERY, host_scores, merged_forward
from reranker.engine import Reranker, RerankerConfig
from reranker.tenants import EquivalenceMode

RUNS = 5


def run_profile(args: argparse.Namespace) -> str:
    reranker = Reranker(RerankerConfig(device=args.device, block_tokens=args.block_tokens,
                                       equivalence=EquivalenceMode.OFF))
    handle = reranker.handle()
    merged = merged_forward(reranker)  # what reranker.bench speed compares with full attention
    corpus = [(d.title, d.text) for d in itertools.islice(iter_corpus(args.data), args.n_docs)]
    prompt = reranker.build_prompt(QUERY, corpus, handle)
    on_gpu = reranker.lm.device.type == "cuda"

    def synced(fn: Callable[[], object]) -> Callable[[], None]:
        def once() -> None:
            fn()
            if on_gpu:
                torch.cuda.synchronize()
        return once

    once = synced(lambda: host_scores(merged, prompt, handle.settings.spec))
    lines = [f"{args.n_docs} documents x {args.block_tokens} tokens on {reranker.lm.device}, mean of {RUNS}:"]

    def measure(label: str, variant: Callable[[], None]) -> None:
        for _ in range(3):
            variant()  # warm-up: kernels chosen, caches filled, the CUDA graph captured
        lines.append(f"{label}: with CUDA graphs {wall_ms(variant):.1f} ms per rerank, "
                     f"device busy {device_ms(profiled(variant, on_gpu)):.1f} ms")

    measure("adapter merged", once)
    measure("adapter as an unmerged tenant block", synced(lambda: reranker.score_prompts([prompt], [handle])))
    kernels.FEW_ENABLED = False  # the final segment's attention as torch ops (attend_rows), graphs recaptured
    merged.graphs.clear()
    try:
        measure("adapter merged, final segment as torch ops", once)
    finally:
        kernels.FEW_ENABLED = True
        merged.graphs.clear()
    # The table is of the eager forward: inside a graph the launches are not there to count.
    with merged.graphs.eager():
        once()
        eager_ms, events = wall_ms(once), profiled(once, on_gpu)
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    lines.append(f"adapter merged, eager: {eager_ms:.1f} ms per rerank, device busy {device_ms(events):.1f} ms, "
                 f"{launches / RUNS:.0f} kernel launches (table below)")
    sort = "self_cuda_time_total" if on_gpu else "self_cpu_time_total"
    return "\n".join(lines) + "\n\n" + events.table(sort_by=sort, row_limit=30)


def profiled(once: Callable[[], None], on_gpu: bool) -> Any:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        for _ in range(RUNS):
            once()
    return prof.key_averages()


def device_ms(events: Any) -> float:
    """Kernel time per rerank, as the table's "Self CUDA time total" counts it (kernels, no annotations)."""
    return sum(e.self_device_time_total for e in events
               if e.device_type == DeviceType.CUDA and not e.is_user_annotation) / RUNS / 1000


def wall_ms(once: Callable[[], None]) -> float:
    start = time.perf_counter()
    for _ in range(RUNS):
        once()
    return (time.perf_counter() - start) / RUNS * 1000


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--n-docs", type=int, default=100)
    p.add_argument("--block-tokens", type=int, default=160)
    p.add_argument("--out", type=Path, required=True)
