"""Closed-loop levels: `concurrency` workers send back to back; per-level latency, throughput, errors."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import sys
import time
from collections import Counter
from collections.abc import Sequence

import grpc
import numpy as np
from tqdm.auto import tqdm

from deploy.loadtest.workloads import Workload, rerank_workload, search_workload
from services.gen.retrieval.v1 import document_pb2
from services.server import GRPC_OPTIONS

OK = "OK"


@dataclasses.dataclass(frozen=True)
class Sample:
    latency_ms: float
    code: str  # "OK" or a grpc.StatusCode name
    timings: dict[str, float]


async def send_one(workload: Workload, index: int, timeout_s: float) -> Sample:
    request = workload.make_request(index)
    start = time.perf_counter()
    try:
        response = await workload.rpc(request, timeout=timeout_s)
    except grpc.aio.AioRpcError as err:
        return Sample((time.perf_counter() - start) * 1000.0, err.code().name, {})
    latency_ms = (time.perf_counter() - start) * 1000.0
    server_timings = getattr(response, "timings")  # noqa: B009 - Search and Rerank both carry it
    timings = {f: float(getattr(server_timings, f)) for f in workload.timing_fields}
    return Sample(latency_ms, OK, timings)


async def run_level(workload: Workload, concurrency: int, max_requests: int, duration_s: float,
                    timeout_s: float, first_index: int = 0, progress: bool = True) -> tuple[list[Sample], float]:
    """`concurrency` workers send back to back until `max_requests` are sent or `duration_s` has passed.

    Returns the samples and the wall time in seconds."""
    counter = itertools.count(first_index)
    last_index = first_index + max_requests
    samples: list[Sample] = []
    bar = tqdm(total=max_requests, desc=f"{workload.name} c={concurrency}", unit="req", disable=not progress,
               leave=False)
    start = time.perf_counter()
    deadline = time.monotonic() + duration_s

    async def worker() -> None:
        while time.monotonic() < deadline:
            index = next(counter)
            if index >= last_index:
                return
            samples.append(await send_one(workload, index, timeout_s))
            bar.update(1)

    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        bar.close()
    return samples, time.perf_counter() - start


def percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def summarize(concurrency: int, samples: Sequence[Sample], wall_s: float, timing_fields: Sequence[str]) -> dict:
    ok = [s for s in samples if s.code == OK]
    latencies = [s.latency_ms for s in ok]
    errors = Counter(s.code for s in samples if s.code != OK)
    return {
        "concurrency": concurrency,
        "requests": len(samples),
        "ok": len(ok),
        "error_count": sum(errors.values()),
        "errors": dict(sorted(errors.items())),
        "wall_s": wall_s,
        "throughput_rps": len(ok) / wall_s if wall_s > 0 else 0.0,
        "latency_ms": {
            "mean": float(np.mean(latencies)) if latencies else None,
            "p50": percentile(latencies, 50),
            "p95": percentile(latencies, 95),
            "p99": percentile(latencies, 99),
            "max": max(latencies) if latencies else None,
        },
        "server_mean_ms": {f: float(np.mean([s.timings[f] for s in ok])) if ok else None for f in timing_fields},
    }


async def run_all(args: argparse.Namespace, target: str, queries: Sequence[str],
                  documents: Sequence[document_pb2.Document]) -> list[dict]:
    async with grpc.aio.insecure_channel(target, options=GRPC_OPTIONS) as channel:
        if args.service == "reranker":
            workload = rerank_workload(channel, queries, documents, args.docs_per_request, args.tenant.split(","))
        else:
            workload = search_workload(channel, queries, args.collection, args.top_k, args.rerank_depth, args.tenant.split(","))
        if args.warmup > 0:  # connection set-up and first-call costs stay out of the numbers
            await run_level(workload, 1, args.warmup, args.duration_s, args.timeout_s, progress=False)
        levels = []
        next_index = args.warmup
        for concurrency in args.concurrency:
            samples, wall_s = await run_level(workload, concurrency, args.requests, args.duration_s,
                                              args.timeout_s, next_index, progress=args.progress)
            next_index += len(samples)
            levels.append(summarize(concurrency, samples, wall_s, workload.timing_fields))
            print(f"c={concurrency}: {len(samples)} requests in {wall_s:.1f}s", file=sys.stderr)
        return levels
