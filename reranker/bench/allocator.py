"""What glibc's handling of freed memory costs a CPU rerank: its adaptive thresholds against a fixed amount of freed
memory kept for reuse (common.allocator.keep_freed_memory, the reranker service's `--malloc-keep-mb`).

The setting is process-wide and cannot be undone inside a process (glibc's adaptive thresholds carry what the
process freed before), so every measurement is a fresh process: `python -m reranker.bench --malloc-keep-mb N
allocator --child ...` loads the reranker, warms it up, and times `--reranks` reranks of one SciFact shortlist in
one dedicated thread, as the service's batcher runs them, printing one JSON line. The processes run
over `--rounds` rounds whose order rotates (common.fresh.rotations), so that drift on a shared machine falls on
each setting alike. Per setting and size: seconds per rerank (median over rounds), page faults per rerank, the
process's resident memory after its reranks and at its peak; each setting's speed-up over the first is the median
of the rounds' paired ratios, with their range.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from common.beir import iter_corpus
from common.fresh import paired_speedup, rotations
from common.paths import SCIFACT
from common.plots import figures, range_whiskers
from common.procstats import ProcessStats
from reranker.bench.batch import cpu_reranker, described
from reranker.bench.fresh import in_fresh_process
from reranker.bench.speed import QUERY

WARMUP_RERANKS = 2  # the first reranks of a size build oneDNN's kernels and set the allocator's marks


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="")
    p.add_argument("--data", type=Path, default=SCIFACT)
    p.add_argument("--dtype", default="bf16", help="auto, fp32 or bf16")
    p.add_argument("--sizes", default="20x96,100x160", help="documents x block tokens, comma-separated")
    p.add_argument("--keep-mb", default="0,256", help="settings compared: MiB kept (0: glibc's adaptive thresholds)")
    p.add_argument("--reranks", type=int, default=5, help="timed reranks per process, after the warm-up")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one measurement (see the docstring)
    p.add_argument("--block-tokens", type=int, default=0, help=argparse.SUPPRESS)  # set per size by the parent
    p.add_argument("--n-docs", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=Path("bench-results/cpu/reranker_allocator.json"))


def run(args: argparse.Namespace) -> dict[str, Any]:
    sizes = [tuple(int(x) for x in size.split("x")) for size in args.sizes.split(",")]
    settings = [int(mb) for mb in args.keep_mb.split(",")]
    samples: dict[tuple[int, int, int], list[dict[str, Any]]] = {}
    for (n_docs, block), keep in tqdm(rotations([(size, keep) for size in sizes for keep in settings], args.rounds),
                                      desc="processes", unit="process"):
        samples.setdefault((n_docs, block, keep), []).append(child(args, n_docs, block, keep))
    rows = [summary(n_docs, block, settings, samples) for n_docs, block in sizes]
    for row in rows:
        tqdm.write(json.dumps(row))
    first = next(iter(samples.values()))[0]
    return {"device": first["device"], "dtype": first["dtype"], "threads": first["threads"], "rounds": args.rounds,
            "reranks_per_process": args.reranks, "settings_keep_mb": settings, "results": rows,
            "samples": [{"n_docs": n, "block_tokens": b, "keep_mb": k, "runs": runs}
                        for (n, b, k), runs in samples.items()]}


def child(args: argparse.Namespace, n_docs: int, block: int, keep_mb: int) -> dict[str, Any]:
    """One fresh process's measurement at one setting and size."""
    return in_fresh_process(args, "allocator", [
        "--data", str(args.data), "--dtype", args.dtype, "--n-docs", str(n_docs), "--block-tokens", str(block),
        "--reranks", str(args.reranks)] + (["--model", args.model] if args.model else []), keep_mb=keep_mb)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """In this process: the reranks, timed in one worker thread (the batcher's), with the faults and memory."""
    reranker = cpu_reranker(args)
    handle = reranker.handle()
    corpus = [(d.title, d.text) for d in itertools.islice(iter_corpus(args.data), args.n_docs)]
    prompt = reranker.build_prompt(QUERY, corpus, handle)

    def reranks(count: int) -> float:
        start = time.perf_counter()
        for _ in range(count):
            reranker.score_prompts([prompt], [handle])
        return (time.perf_counter() - start) / count

    with ThreadPoolExecutor(max_workers=1) as worker:
        worker.submit(reranks, WARMUP_RERANKS).result()
        faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        seconds = worker.submit(reranks, args.reranks).result()
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {**described(reranker), "s_per_rerank": seconds, "faults_per_rerank": faults / args.reranks,
            "rss_mib": ProcessStats.of(os.getpid()).rss_mib, "peak_rss_mib": round(peak_mib, 1)}


def summary(n_docs: int, block: int, settings: list[int], samples: dict[tuple[int, int, int], list[dict[str, Any]]],
            ) -> dict[str, Any]:
    """One size: per setting the medians over rounds; each setting's speed-up over the first, the median of the
    rounds' ratios with their range (common.fresh.paired_speedup)."""
    row: dict[str, Any] = {"n_docs": n_docs, "block_tokens": block}
    first_s = [r["s_per_rerank"] for r in samples[n_docs, block, settings[0]]]
    for keep in settings:
        runs = samples[n_docs, block, keep]
        row[f"keep_{keep}"] = {key: statistics.median(r[key] for r in runs)
                               for key in ("s_per_rerank", "faults_per_rerank", "rss_mib", "peak_rss_mib")}
        if keep != settings[0]:
            row[f"keep_{keep}"] |= paired_speedup(first_s, [r["s_per_rerank"] for r in runs])
    return row


def plot(result: dict[str, Any], path: Path) -> None:
    rows, settings = result["results"], result["settings_keep_mb"]
    rounds_of = {(s["n_docs"], s["block_tokens"], s["keep_mb"]): s["runs"] for s in result["samples"]}
    label = {0: "glibc's adaptive thresholds"} | {k: f"{k} MiB freed kept" for k in settings if k}
    title = (f"one CPU rerank, {result['dtype']}, {result['threads']} threads, {result['rounds']} rotating rounds of "
             "fresh processes (whiskers: their range)")
    with figures(path, 2, (11, 3.6), title) as (time_ax, fault_ax):
        width = 0.8 / len(settings)
        for i, keep in enumerate(settings):
            xs = [x + (i - (len(settings) - 1) / 2) * width for x in range(len(rows))]
            medians = [r[f"keep_{keep}"]["s_per_rerank"] for r in rows]
            rounds = [[run["s_per_rerank"] for run in rounds_of[r["n_docs"], r["block_tokens"], keep]] for r in rows]
            time_ax.bar(xs, medians, width, yerr=range_whiskers(rounds, medians), capsize=3, label=label[keep])
            fault_ax.bar(xs, [r[f"keep_{keep}"]["faults_per_rerank"] for r in rows], width, label=label[keep])
        names = [f"{r['n_docs']} x {r['block_tokens']} tokens" for r in rows]
        for ax, ylabel in ((time_ax, "seconds per rerank (median)"), (fault_ax, "page faults per rerank")):
            ax.set_xticks(list(range(len(rows))), names)
            ax.set_ylabel(ylabel)
            ax.legend()
