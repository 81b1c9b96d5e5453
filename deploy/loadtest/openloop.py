"""Open-loop load: requests arrive at a fixed rate whatever the server does, and a capacity search over rates.

A closed loop (N workers, each waiting for its answer before the next request) slows its own sending when the
server slows, so queueing delay never shows in its latencies (coordinated omission). Here arrivals follow a
Poisson process at the offered rate (exponential gaps from a seeded generator), each request is sent at its
scheduled time whether or not earlier ones have answered, and its latency is counted from that scheduled time:
time spent queued anywhere (server, channel, this client) counts.

The capacity search finds the highest offered rate whose latency percentile (p99 by default) stays under the
SLO with at most `max_error_rate` of the requests failing (refusals by admission control included): from a
start rate, double while rates pass (or halve while they fail), then bisect between the last passing and the
first failing rate. Every probe lasts for at least `Slo.min_arrivals` arrivals (100 for p99 and 1%): on fewer,
the "p99" would be the slowest request and one error would break the budget.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from tqdm.auto import tqdm

from deploy.loadtest.runner import Sample, send_one, summarize
from deploy.loadtest.workloads import Workload


async def run_rate(workload: Workload, rate_rps: float, max_requests: int, duration_s: float, timeout_s: float,
                   first_index: int = 0, seed: int = 0, progress: bool = True, min_arrivals: int = 0,
                   max_duration_s: float = float("inf")) -> tuple[list[Sample], float]:
    """Offer `rate_rps` for `duration_s` or `max_requests` arrivals, whichever ends first, but past `duration_s`
    until `min_arrivals` have arrived (a Poisson count over a fixed time falls short of its mean about half the
    time), never past `max_duration_s`; wait for every answer (each bounded by `timeout_s`). Returns the samples
    and the wall time from the first scheduled send."""
    rng = random.Random(seed)
    bar = tqdm(total=max_requests, desc=f"{workload.name} {rate_rps:g}/s", unit="req", disable=not progress,
               leave=False)
    start = time.perf_counter()
    scheduled = 0.0
    tasks: list[asyncio.Task[Sample]] = []
    for i in range(max_requests):
        scheduled += rng.expovariate(rate_rps)
        if (scheduled > duration_s and i >= min_arrivals) or scheduled > max_duration_s:
            break
        delay = start + scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(send_one(workload, first_index + i, timeout_s, sent_at=start + scheduled))
        task.add_done_callback(lambda _: bar.update(1))
        tasks.append(task)
    samples = list(await asyncio.gather(*tasks))
    bar.close()
    return samples, time.perf_counter() - start


@dataclass(frozen=True)
class Slo:
    latency_ms: float
    percentile: float = 99.0
    max_error_rate: float = 0.01

    @property
    def min_arrivals(self) -> int:
        """The fewest requests a probe can be judged on: below 100 / (100 - percentile) the percentile is the
        slowest request, and below 1 / max_error_rate a single error exceeds the budget (p99 and 1%: 100)."""
        return math.ceil(round(max(100 / (100 - self.percentile), 1 / self.max_error_rate), 6))  # 100.000...01

    def met_by(self, level: dict) -> bool:
        latency = level["latency_ms"].get(f"p{self.percentile:g}")
        errors = level["error_count"] / max(1, level["requests"])
        return (level["requests"] >= self.min_arrivals and latency is not None and latency <= self.latency_ms
                and errors <= self.max_error_rate)


async def find_capacity(probe: Callable[[float], Awaitable[dict]], slo: Slo, start_rps: float, max_rps: float,
                        bisections: int = 3) -> dict:
    """`probe(rate)` runs one open-loop level and returns its summary. Returns every probe and the capacity."""
    probes: list[dict] = []

    async def passes(rate: float) -> bool:
        level = await probe(rate)
        level["meets_slo"] = slo.met_by(level)
        probes.append(level)
        # One line per probe as it ends: a search cut short (a time limit) still shows how far it got.
        p = level["latency_ms"].get(f"p{slo.percentile:g}")
        verdict = "meets the SLO" if level["meets_slo"] else "misses the SLO"
        if level["requests"] < slo.min_arrivals:
            verdict = f"too few arrivals to judge (at least {slo.min_arrivals}): counted as missing the SLO"
        print(f"probe {rate:.4g} req/s: p{slo.percentile:g} {'-' if p is None else f'{p:.1f}'} ms, "
              f"{level['error_count']}/{level['requests']} errors: {verdict}", flush=True)
        return bool(level["meets_slo"])

    good, bad, rate = 0.0, 0.0, start_rps
    if await passes(rate):  # up: double until a rate fails
        while True:
            good, rate = rate, rate * 2
            if rate > max_rps:
                break
            if not await passes(rate):
                bad = rate
                break
    else:  # down: halve until a rate passes (or 1/16 of the start)
        bad = rate
        while rate / 2 >= start_rps / 16:
            rate /= 2
            if await passes(rate):
                good = rate
                break
            bad = rate
    for _ in range(bisections if good and bad else 0):
        middle = (good + bad) / 2
        if await passes(middle):
            good = middle
        else:
            bad = middle
    return {"slo": {"latency_ms": slo.latency_ms, "percentile": slo.percentile, "max_error_rate": slo.max_error_rate},
            "capacity_rps": good, "first_failing_rps": bad or None, "reached_max_rps": not bad,
            "probes": sorted(probes, key=lambda p: p["rate_rps"])}


def summarize_rate(rate_rps: float, samples: list[Sample], wall_s: float, timing_fields: tuple[str, ...]) -> dict:
    return {"rate_rps": rate_rps, **summarize(samples, wall_s, timing_fields)}
