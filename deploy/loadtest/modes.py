"""The three ways to load a target: closed-loop concurrency levels, open-loop rates, and a capacity search."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from deploy.loadtest.openloop import Slo, find_capacity, run_rate, summarize_rate
from deploy.loadtest.runner import OK, run_level, summarize
from deploy.loadtest.workloads import Workload, rerank_workload, search_workload
from services.gen.retrieval.v1 import document_pb2
from services.server import GRPC_OPTIONS
from services.tls import aio_channel, client_tls


async def run_mode(args: argparse.Namespace, target: str, queries: Sequence[str],
                   documents: Sequence[document_pb2.Document]) -> dict:
    """{"levels": [...]} (closed, open) or {"levels": probes, "capacity": {...}} (capacity)."""
    async with aio_channel(target, client_tls(args), GRPC_OPTIONS, args.api_key) as channel:
        tenants = args.tenant.split(",")
        workload = (rerank_workload(channel, queries, documents, args.docs_per_request, tenants)
                    if args.service == "reranker" else
                    search_workload(channel, queries, args.collection, args.top_k, args.rerank_depth, tenants))
        warm_mean_ms = await _warm_up(workload, args)
        if args.mode == "closed":
            return {"levels": await _closed(workload, args)}
        if args.mode == "open":
            return {"levels": [await _open(workload, args, rate) for rate in args.rates]}
        start_rps = args.start_rps or (500.0 / warm_mean_ms if warm_mean_ms else 1.0)
        slo = capacity_slo(args)
        capacity = await find_capacity(lambda rate: _open(workload, args, rate, slo.min_arrivals), slo,
                                       start_rps, args.max_rps, args.bisections)
        return {"levels": capacity.pop("probes"), "capacity": capacity}


async def _warm_up(workload: Workload, args: argparse.Namespace) -> float | None:
    """Connection set-up and first-call costs stay out of the numbers; the mean latency seeds the capacity
    search's first rate (half of what one closed-loop client achieves)."""
    if args.warmup <= 0:
        return None
    samples, _ = await run_level(workload, 1, args.warmup, args.duration_s, args.timeout_s, progress=False)
    ok = [s.latency_ms for s in samples if s.code == OK]
    return sum(ok) / len(ok) if ok else None


async def _closed(workload: Workload, args: argparse.Namespace) -> list[dict]:
    levels = []
    next_index = args.warmup
    for concurrency in args.concurrency:
        samples, wall_s = await run_level(workload, concurrency, args.requests, args.duration_s, args.timeout_s,
                                          next_index, progress=args.progress)
        next_index += len(samples)
        levels.append({"concurrency": concurrency, **summarize(samples, wall_s, workload.timing_fields)})
        print(f"c={concurrency}: {len(samples)} requests in {wall_s:.1f}s", file=sys.stderr)
    return levels


MAX_LEVEL_S = 600.0  # neither --min-requests nor a capacity probe's minimum stretches a level beyond this


def capacity_slo(args: argparse.Namespace) -> Slo:
    return Slo(args.slo_ms, args.slo_percentile, args.max_error_rate)


async def _open(workload: Workload, args: argparse.Namespace, rate: float, min_arrivals: int = 0) -> dict:
    # A slow rate goes on past --duration-s for --min-requests arrivals, and a capacity probe for as many as its
    # SLO is judged on (a p99 of two samples says little).
    samples, wall_s = await run_rate(workload, rate, args.requests, min(args.duration_s, MAX_LEVEL_S), args.timeout_s,
                                     args.warmup, args.seed, args.progress,
                                     min(args.requests, max(args.min_requests, min_arrivals)), MAX_LEVEL_S)
    level = summarize_rate(rate, samples, wall_s, workload.timing_fields)
    p99 = level["latency_ms"]["p99"]
    print(f"{rate:g}/s: {len(samples)} requests in {wall_s:.1f}s, {level['error_count']} errors, p99 "
          f"{'-' if p99 is None else f'{p99:.0f} ms'}", file=sys.stderr)
    return level
