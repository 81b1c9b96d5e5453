"""Sending requests and summing up a level: closed-loop levels (`concurrency` workers send back to back);
deploy.loadtest.openloop builds the open loop on the same pieces."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from collections import Counter
from collections.abc import Sequence

import grpc
import numpy as np
from tqdm.auto import tqdm

from deploy.loadtest.workloads import Workload

OK = "OK"


@dataclasses.dataclass(frozen=True)
class Sample:
    latency_ms: float
    code: str  # "OK" or a grpc.StatusCode name
    timings: dict[str, float]


async def send_one(workload: Workload, index: int, timeout_s: float, sent_at: float | None = None) -> Sample:
    """One request; latency from `sent_at` (perf_counter; an open loop's scheduled time) or from now."""
    request = workload.make_request(index)
    start = time.perf_counter() if sent_at is None else sent_at
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


def summarize(samples: Sequence[Sample], wall_s: float, timing_fields: Sequence[str]) -> dict:
    ok = [s for s in samples if s.code == OK]
    latencies = [s.latency_ms for s in ok]
    errors = Counter(s.code for s in samples if s.code != OK)
    return {
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
