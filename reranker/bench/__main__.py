"""Reranker benchmarks; each writes JSON and a PNG beside it.

    python -m reranker.bench speed --n-docs 10,25,50,100,200,500 --block-tokens 160 \
        --out bench-results/reranker_speed.json
    python -m reranker.bench tenants --tenants 1,4,16 --out bench-results/reranker_tenants.json
    python -m reranker.bench int8 --out bench-results/cpu/reranker_int8.json
    python -m reranker.bench batch --out bench-results/cpu/reranker_batches.json
    python -m reranker.bench compile --out bench-results/cpu/reranker_compile.json
    python -m reranker.bench ragged --out bench-results/cpu/reranker_ragged.json
    python -m reranker.bench allocator --out bench-results/cpu/reranker_allocator.json
    python -m reranker.bench merged --out bench-results/cpu/reranker_merged.json

`speed`: BlockRank against full causal attention, one rerank, same model and documents (speed.py); several
`--dtype`/`--path` values side by side, each in fresh processes (variants.py).
`tenants`: memory, mixed-tenant throughput and adapter load time of tenants served as shared blocks,
against one model copy per tenant (tenants.py).
`int8`: one layer's projections in fp32, bf16 and dynamic int8 on the CPU, time and error (int8.py).
`batch`: a CPU batch as one chunked forward and as packed forwards over the groups that fit (batch.py).
`compile`: one layer's row-wise work eager and under torch.compile on the CPU (compiled.py).
`ragged`: documents of uneven length on the CPU, padded to the longest or real tokens only (ragged.py).
`allocator`: one CPU rerank with glibc's adaptive malloc thresholds and with freed memory kept (allocator.py).
`merged`: a tenant's rerank on the CPU with its deltas apart, through merged weights, and as a merged model
(merged.py).

Every benchmark runs with the reranker service's malloc settings (`--malloc-arenas 1 --malloc-keep-mb 256`), so
that its figures are what the service does.
"""

from __future__ import annotations

import argparse
import json
import sys

from common.allocator import RERANKER_ARENAS, RERANKER_KEEP_MB, keep_freed_memory, limit_malloc_arenas
from common.files import write_result
from reranker.bench import allocator, batch, compiled, int8, merged, ragged, speed, tenants, variants


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reranker.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--malloc-arenas", type=int, default=RERANKER_ARENAS,
                        help="glibc malloc arenas, as the service's flag (0: glibc's default)")
    parser.add_argument("--malloc-keep-mb", type=int, default=RERANKER_KEEP_MB,
                        help="freed memory glibc keeps for reuse, as the service's flag (0: glibc's adaptive "
                             "thresholds)")
    sub = parser.add_subparsers(dest="command", required=True)
    speed.add_arguments(sub.add_parser("speed", help="BlockRank vs full-attention wall time per rerank"))
    tenants.add_arguments(sub.add_parser("tenants", help="multi-tenant memory, throughput and load time"))
    int8.add_arguments(sub.add_parser("int8", help="one layer's projections: fp32, bf16 and int8 on the CPU"))
    batch.add_arguments(sub.add_parser("batch", help="a CPU batch: one chunked forward or packed groups"))
    compiled.add_arguments(sub.add_parser("compile", help="one layer's row-wise work: eager or torch.compile"))
    ragged.add_arguments(sub.add_parser("ragged", help="uneven documents on a CPU: padded or real tokens only"))
    allocator.add_arguments(sub.add_parser("allocator", help="one CPU rerank: glibc's thresholds or memory kept"))
    merged.add_arguments(sub.add_parser("merged", help="a tenant's CPU rerank: deltas apart or merged weights"))
    args = parser.parse_args(argv)
    limit_malloc_arenas(args.malloc_arenas)  # before torch starts its threads
    keep_freed_memory(args.malloc_keep_mb)
    if getattr(args, "child", False):  # one measuring process (reranker.bench.fresh): its line goes to the parent
        measure = {"allocator": allocator.measure, "speed": variants.one_variant}[args.command]
        print(json.dumps(measure(args)), flush=True)
        return 0
    if args.out is None:
        parser.error(f"{args.command}: --out is required")
    run, plot = {"speed": (variants.run, variants.plot), "tenants": (tenants.run, tenants.plot),
                 "int8": (int8.run, int8.plot), "batch": (batch.run, batch.plot),
                 "compile": (compiled.run, compiled.plot), "ragged": (ragged.run, ragged.plot),
                 "allocator": (allocator.run, allocator.plot), "merged": (merged.run, merged.plot)}[args.command]
    write_result(args.out, run(args), plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
