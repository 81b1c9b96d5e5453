"""Whether the retriever's embedder gains from keeping freed memory, as the reranker does (`--malloc-keep-mb`).

    python -m retriever.bench.freed_memory [--rounds 3] --out bench-results/cpu/retriever_freed_memory.json

Each setting (`--keep-mb`, 0: glibc's adaptive thresholds) in fresh processes (common.fresh: the setting cannot
be taken back inside one), in rounds whose order rotates, each with the retriever's two malloc arenas and the
bundled embedder at its default dtype, working in one worker thread as the service's pool does: `--docs` SciFact
documents embedded in the embedder's batches (an ingest), then `--queries` one-text encodes (a Search's query).
Per setting, medians over rounds: documents per second, milliseconds per query, page faults of each, and the
process's peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from common.allocator import SERVICE_ARENAS, keep_freed_memory, limit_malloc_arenas
from common.beir import iter_corpus
from common.files import write_result
from common.fresh import json_from_child, rotations
from common.paths import SCIFACT
from common.plots import figures, range_whiskers

WARMUP_DOCS, WARMUP_QUERIES = 64, 20
MEASURES = ("docs_per_s", "faults_per_doc", "query_ms", "faults_per_query", "peak_rss_mib")


def measure(keep_mb: int, docs: int, queries: int) -> dict[str, Any]:
    """In this (fresh) process: the setting, then the embedder's ingest and query work, timed."""
    limit_malloc_arenas(SERVICE_ARENAS)  # before torch starts its threads
    keep_freed_memory(keep_mb)
    from retriever.embedder import Embedder

    texts = [f"{d.title} {d.text}" for d in islice(iter_corpus(SCIFACT), WARMUP_DOCS + docs)]
    questions = [t.split(".")[0][:200] for t in texts[:queries]]  # a title's first sentence: a query's length
    embedder = Embedder()

    def one_by_one(items: list[str]) -> None:
        for item in items:
            embedder.encode([item])

    with ThreadPoolExecutor(max_workers=1) as worker:
        def timed(fn: Callable[[], object]) -> tuple[float, int]:
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            worker.submit(fn).result()
            return time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults

        timed(lambda: embedder.encode(texts[:WARMUP_DOCS]))  # the batch shapes' kernels, the allocator's marks
        timed(lambda: one_by_one(questions[:WARMUP_QUERIES]))
        ingest_s, ingest_faults = timed(lambda: embedder.encode(texts[WARMUP_DOCS:]))
        query_s, query_faults = timed(lambda: one_by_one(questions))
    return {"keep_mb": keep_mb, "docs_per_s": docs / ingest_s, "faults_per_doc": ingest_faults / docs,
            "query_ms": query_s / queries * 1e3, "faults_per_query": query_faults / queries,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "dtype": str(embedder.dtype), "threads": torch.get_num_threads()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    settings = [int(mb) for mb in args.keep_mb.split(",")]
    runs: dict[int, list[dict[str, Any]]] = {keep: [] for keep in settings}
    for keep in tqdm(rotations(settings, args.rounds), desc="processes", unit="process"):
        runs[keep].append(json_from_child(["-m", "retriever.bench.freed_memory", "--child", str(keep), "--docs",
                                           str(args.docs), "--queries", str(args.queries)]))
    rows = [{"keep_mb": keep, **{m: statistics.median(r[m] for r in runs[keep]) for m in MEASURES},
             "rounds": {m: [r[m] for r in runs[keep]] for m in ("docs_per_s", "query_ms")}} for keep in settings]
    for row in rows:
        tqdm.write(f"keep {row['keep_mb']:>4} MiB: {row['docs_per_s']:.1f} docs/s ({row['faults_per_doc']:.0f} "
                   f"faults each), queries {row['query_ms']:.1f} ms ({row['faults_per_query']:.1f} faults each), "
                   f"peak RSS {row['peak_rss_mib']:.0f} MiB")
    first = runs[settings[0]][0]
    return {"dtype": first["dtype"], "threads": first["threads"], "malloc_arenas": SERVICE_ARENAS,
            "rounds": args.rounds, "docs": args.docs, "queries": args.queries, "results": rows}


def plot(result: dict[str, Any], path: Path) -> None:
    rows = result["results"]
    labels = [f"{r['keep_mb']} MiB kept" if r["keep_mb"] else "glibc's thresholds" for r in rows]
    title = (f"the retriever's embedder ({result['dtype']}, {result['threads']} threads): median of "
             f"{result['rounds']} rounds of fresh processes, whiskers their range")
    with figures(path, 2, (10, 3.8), title) as (ingest_ax, query_ax):
        for ax, key, ylabel in ((ingest_ax, "docs_per_s", f"documents embedded per second ({result['docs']})"),
                                (query_ax, "query_ms", "ms per one-text query")):
            medians = [r[key] for r in rows]
            spread = range_whiskers([r["rounds"][key] for r in rows], medians)
            ax.bar(labels, medians, yerr=spread, capsize=4, color=["tab:gray", "tab:blue"][:len(rows)])
            ax.set_ylabel(ylabel)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep-mb", default="0,256", help="settings compared, MiB kept (0: glibc's thresholds)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--docs", type=int, default=1024, help="SciFact documents embedded per process")
    parser.add_argument("--queries", type=int, default=300, help="one-text encodes per process")
    parser.add_argument("--child", type=int, metavar="KEEP_MB", help=argparse.SUPPRESS)  # one measuring process
    parser.add_argument("--out", type=Path, default=Path("bench-results/cpu/retriever_freed_memory.json"))
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(measure(args.child, args.docs, args.queries)), flush=True)
        return 0
    write_result(args.out, run(args), plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
