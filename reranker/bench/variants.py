"""`python -m reranker.bench speed` with several `--dtype`, `--path` or `--cpu-compile` values (`--dtype fp32,bf16
--path chunked,auto`): every combination timed side by side (BlockRank, adapter merged), each in a fresh process as a
deployment runs one dtype (reranker.bench.fresh), over `--rounds` rounds whose order rotates, so that a shared
machine's drift falls on each alike; each variant's speed-up over the first is the median of the rounds' ratios,
with their range. One value: reranker.bench.speed's run, against full attention."""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from common.beir import iter_corpus
from common.device import describe_device
from common.fresh import paired_speedup, rotations
from common.plots import figures, range_whiskers
from reranker.batcher import prompt_tokens
from reranker.bench.fresh import in_fresh_process
from reranker.bench.speed import (
    QUERY,
    bench_reranker,
    host_scores,
    merged_forward,
    plot_speed,
    speed_of,
    timed,
    variant_name,
)


def run(args: argparse.Namespace) -> dict:
    """One (dtype, path, cpu_compile) asked for: its run (reranker.bench.speed). Several: side by side."""
    variants = list(itertools.product(args.dtype.split(","), args.path.split(","), args.cpu_compile.split(",")))
    if len(variants) == 1:
        return speed_of(args, *variants[0])
    return side_by_side(args, variants)


def side_by_side(args: argparse.Namespace, combos: list[tuple[str, str, str]]) -> dict:
    """Every (dtype, path, cpu_compile) timed in fresh processes, one per variant and round
    (reranker.bench.fresh: a deployment runs one dtype per process), over `--rounds` rounds whose order rotates,
    so that drift on a shared machine falls on each alike. Per variant and size: the median of its rounds; per
    size, each variant's speed-up over the first: the median of the rounds' ratios (a round's processes ran back
    to back), with their range. Two combinations that run the same thing here (`--cpu-compile off,auto` on a CPU
    where auto compiles nothing) stop the run at their first process: results are keyed by what ran."""
    runs: dict[tuple[str, str, str], list[dict]] = {combo: [] for combo in combos}
    for combo in tqdm(rotations(combos, args.rounds), desc="processes", unit="process"):
        dtype, path, cpu_compile = combo
        runs[combo].append(in_fresh_process(args, "speed", [
            "--device", args.device, "--dtype", dtype, "--path", path, "--cpu-compile", cpu_compile, "--data",
            str(args.data), "--n-docs", args.n_docs, "--block-tokens", str(args.block_tokens), "--repeats",
            str(args.repeats), "--budget-s", str(args.budget_s)] + (["--model", args.model] if args.model else [])))
        same = [c for c in combos if c != combo and runs[c] and runs[c][0]["variant"] == runs[combo][0]["variant"]]
        if same:
            raise SystemExit(f"{combo} and {same[0]} both ran {runs[combo][0]['variant']!r} here: nothing to compare")
    first = runs[combos[0]]
    rows = []
    for i, row in enumerate(first[0]["results"]):
        entry: dict = {"n_docs": row["n_docs"], "tokens": row["tokens"]}
        first_s = [run["results"][i]["blockrank_s"] for run in first]
        for combo in combos:
            seconds = [run["results"][i]["blockrank_s"] for run in runs[combo]]
            entry[runs[combo][0]["variant"]] = {"blockrank_s": statistics.median(seconds), "rounds_s": seconds,
                                                **paired_speedup(first_s, seconds)}
        rows.append(entry)
    tqdm.write(json.dumps(rows, indent=1))
    return {"device": first[0]["device"], "model": first[0]["model"], "block_tokens": args.block_tokens,
            "threads": first[0]["threads"], "rounds": args.rounds, "repeats_per_round": args.repeats,
            "first": first[0]["variant"], "side_by_side": rows,
            "variants": [{"variant": runs[c][0]["variant"], "dtype": runs[c][0]["dtype"], "results": [
                {"n_docs": r["n_docs"], "blockrank_s": e[runs[c][0]["variant"]]["blockrank_s"], "path": r["path"]}
                for r, e in zip(runs[c][0]["results"], rows, strict=True)]} for c in combos]}


def one_variant(args: argparse.Namespace) -> dict:
    """A side-by-side run's measurement in its own process (--child): BlockRank only, adapter merged, each size
    warmed up once (its kernels) and then timed."""
    reranker = bench_reranker(args, args.dtype, args.path, args.cpu_compile)
    handle = reranker.handle()
    merged = merged_forward(reranker)
    sizes = [int(n) for n in args.n_docs.split(",")]
    corpus = [(d.title, d.text) for d in itertools.islice(iter_corpus(args.data), max(sizes))]
    rows = []
    for n in sizes:
        prompt = reranker.build_prompt(QUERY, [corpus[i % len(corpus)] for i in range(n)], handle)
        seconds = timed(partial(host_scores, merged, prompt, handle.settings.spec), reranker.lm.device,
                        args.repeats, args.budget_s, warmup=1)
        rows.append({"n_docs": n, "tokens": prompt_tokens(prompt), "blockrank_s": seconds,
                     "path": "packed" if merged.runs_packed([prompt]) else "chunked"})
    return {"device": describe_device(reranker.lm.device), "model": handle.settings.model_name,
            "dtype": str(reranker.lm.dtype), "variant": variant_name(reranker, args.path),
            "threads": torch.get_num_threads(), "results": rows}


def plot(result: dict, path: Path) -> None:
    if "side_by_side" in result:
        plot_variants(result, path)
    else:
        plot_speed(result, path)


def plot_variants(result: dict, path: Path) -> None:
    """Per size, a bar per variant: the median of its rounds, whiskers over the rounds' range, and its
    speed-up over the first variant (median of the rounds' ratios, with their range)."""
    rows, names = result["side_by_side"], [v["variant"] for v in result["variants"]]
    title = (f"one rerank: median of {result['rounds']} rounds of fresh processes (whiskers: their range)\n"
             f"{result['model']}\n{result['device']}")
    width = 0.8 / len(names)
    with figures(path, 1, (max(7.0, 2.2 * len(rows) * len(names) / 2), 5.0), title) as (ax,):
        for i, name in enumerate(names):
            xs = [x + (i - (len(names) - 1) / 2) * width for x in range(len(rows))]
            medians = [r[name]["blockrank_s"] for r in rows]
            spread = range_whiskers([r[name]["rounds_s"] for r in rows], medians)
            ax.bar(xs, medians, width, yerr=spread, capsize=3, label=name)
            for x, r in zip(xs, rows, strict=True):
                low, high = r[name]["speedup_range"]
                ax.annotate(f"{r[name]['speedup_over_first']:.2f}x\n({low:.2f}-{high:.2f})",
                            (x, max(r[name]["rounds_s"])), textcoords="offset points", xytext=(0, 4), ha="center",
                            va="bottom", fontsize=7)
        ax.set_xticks(list(range(len(rows))), [f"{r['n_docs']} docs x {result['block_tokens']} tokens" for r in rows])
        ax.set_ylabel(f"seconds per rerank (BlockRank; against {result['first']})")
        ax.margins(y=0.2)
        ax.legend(fontsize=8)
