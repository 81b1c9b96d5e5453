"""The dynamic batcher (reranker.batcher) on its own: token cap, carry-over, a full queue, cancelled
requests and shutdown; fair share across tenants (deficit round-robin by tokens, per-tenant limits) and a
noisy neighbour under a cost model. The score function records what it is given, so batches can be inspected."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Sequence

import pytest

from reranker.batcher import BatcherConfig, RerankBatcher, prompt_tokens
from reranker.errors import QueueFull, TenantQueueFull
from reranker.limits import TenantLimits
from reranker.prompt import Prompt


def prompt(tag: int, doc_tokens: int = 25) -> Prompt:
    """10 prefix + doc_tokens + 5 final tokens; `tag` tells requests apart."""
    return Prompt(prefix=[tag] * 10, docs=[[tag] * doc_tokens], final=[tag] * 5, signal_tokens=2, tag_lengths=[0])


class Recorder:
    """Scores a batch as [[tag]] per prompt; can hold the first batch until released."""

    def __init__(self, hold: bool = False) -> None:
        self.batches: list[list[int]] = []
        self.started = threading.Event()
        self.release = threading.Event()
        if not hold:
            self.release.set()

    def __call__(self, prompts: Sequence[Prompt], handles: Sequence[str]) -> list[list[float]]:
        self.started.set()
        self.release.wait(timeout=30)
        self.batches.append([p.prefix[0] for p in prompts])
        return [[float(p.prefix[0])] for p in prompts]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=60))


@pytest.mark.parametrize(("configured", "scorers_own"), [(100, 65_536), (0, 100)])
def test_token_cap_splits_batches_and_carries_the_overflow_in_order(configured, scorers_own):
    """The cap is the configured one, else (0) the one the scorer runs best at."""
    assert prompt_tokens(prompt(0)) == 40

    async def scenario() -> tuple[list[list[int]], list[float]]:
        recorder = Recorder()
        batcher = RerankBatcher(recorder, BatcherConfig(max_queue=16, max_batch_tokens=configured, max_wait_ms=50),
                                batch_tokens=scorers_own)
        batcher.start()
        scored = await asyncio.gather(*(batcher.submit(prompt(i), "t") for i in range(5)))
        await batcher.stop()
        return recorder.batches, [s.scores[0] for s in scored]

    batches, scores = run(scenario())
    assert batches == [[0, 1], [2, 3], [4]], "40 + 40 fit under 100 tokens; the third starts the next batch"
    assert scores == [0.0, 1.0, 2.0, 3.0, 4.0], "every caller gets its own prompt's scores"


def test_a_prompt_larger_than_the_cap_runs_alone():
    async def scenario() -> list[list[int]]:
        recorder = Recorder()
        batcher = RerankBatcher(recorder, BatcherConfig(max_batch_tokens=50, max_wait_ms=50))
        batcher.start()
        await asyncio.gather(batcher.submit(prompt(0, doc_tokens=200), "t"), batcher.submit(prompt(1), "t"))
        await batcher.stop()
        return recorder.batches

    assert run(scenario()) == [[0], [1]]


def test_full_queue_refuses_at_once_and_queued_requests_still_complete():
    async def scenario() -> tuple[list[list[int]], list[float]]:
        recorder = Recorder(hold=True)
        batcher = RerankBatcher(recorder, BatcherConfig(max_queue=2, max_wait_ms=1))
        batcher.start()
        first = asyncio.create_task(batcher.submit(prompt(0), "t"))
        await asyncio.to_thread(recorder.started.wait, 30)  # the worker is busy with request 0
        queued = [asyncio.create_task(batcher.submit(prompt(i), "t")) for i in (1, 2)]
        await asyncio.sleep(0)
        with pytest.raises(QueueFull):
            await batcher.submit(prompt(3), "t")
        recorder.release.set()
        scored = await asyncio.gather(first, *queued)
        await batcher.stop()
        return recorder.batches, [s.scores[0] for s in scored]

    batches, scores = run(scenario())
    assert scores == [0.0, 1.0, 2.0]
    assert batches == [[0], [1, 2]], "request 3 was never scored"


def test_cancelled_requests_are_skipped_and_stop_cancels_the_queue():
    async def scenario() -> tuple[list[list[int]], bool]:
        recorder = Recorder(hold=True)
        batcher = RerankBatcher(recorder, BatcherConfig(max_wait_ms=1))
        batcher.start()
        busy = asyncio.create_task(batcher.submit(prompt(0), "t"))
        await asyncio.to_thread(recorder.started.wait, 30)
        with pytest.raises(TimeoutError):  # a caller whose deadline passes while queued
            await asyncio.wait_for(batcher.submit(prompt(1), "t"), timeout=0.05)
        waiting = asyncio.create_task(batcher.submit(prompt(2), "t"))
        await asyncio.sleep(0)
        recorder.release.set()
        await busy
        await waiting
        left = asyncio.create_task(batcher.submit(prompt(3), "t"))
        await batcher.stop()
        await asyncio.sleep(0)
        return recorder.batches, left.cancelled() or left.done()

    batches, settled = run(scenario())
    assert [0] in batches and all(1 not in b for b in batches), "the timed-out request never reached the model"
    assert settled, "stop() leaves no caller waiting forever"


# --- fair share -------------------------------------------------------------------------------------------


def held_batches(config: BatcherConfig, requests: Sequence[tuple[str, Prompt, TenantLimits | None]]) -> list[list[int]]:
    """Batches (as tags) of `requests`, all queued while the worker is held on a first request (tag 9)."""

    async def scenario() -> list[list[int]]:
        recorder = Recorder(hold=True)
        batcher = RerankBatcher(recorder, config)
        batcher.start()
        blocker = asyncio.create_task(batcher.submit(prompt(9), "h", "blocker"))
        await asyncio.to_thread(recorder.started.wait, 30)
        queued = [asyncio.create_task(batcher.submit(p, "h", tenant, limits)) for tenant, p, limits in requests]
        await asyncio.sleep(0)
        recorder.release.set()
        await asyncio.gather(blocker, *queued)
        await batcher.stop()
        return recorder.batches[1:]

    return run(scenario())


def test_deficit_round_robin_serves_backlogged_tenants_equal_tokens_whatever_their_prompt_lengths():
    short, long = prompt(1, doc_tokens=25), prompt(2, doc_tokens=145)  # 40 and 160 tokens
    quantum, cap = 100, 400
    config = BatcherConfig(max_queue=1000, max_batch_tokens=cap, max_wait_ms=1, tenant_quantum_tokens=quantum)
    # 8000 tokens each: tenant 1 as 200 short prompts, tenant 2 as 50 prompts 4x longer. Requests-fair (or
    # FIFO) would give tenant 2 four times tenant 1's tokens per turn.
    batches = held_batches(config, [("a", short, None)] * 200 + [("b", long, None)] * 50)
    size = {1: 40, 2: 160}
    served = {1: 0, 2: 0}
    for i, batch in enumerate(batches):
        for tag in batch:
            served[tag] += size[tag]
        if i < len(batches) - 1:
            assert cap - 160 < sum(size[t] for t in batch) <= cap, "full batches: the next prompt did not fit"
        if served[1] < 8000 and served[2] < 8000:  # both still backlogged
            # DRR's bound: after k visits a backlogged tenant has had k quanta less a deficit smaller than its
            # head prompt; mid-visit the one being served is at most one quantum ahead. So the difference
            # stays under one quantum plus the longest prompt (100 + 160), whatever the cut points.
            assert abs(served[1] - served[2]) < quantum + 160, (i, served)
    assert served == {1: 8000, 2: 8000}


def test_round_robin_position_carries_over_so_no_tenant_is_always_first():
    config = BatcherConfig(max_queue=100, max_batch_tokens=80, max_wait_ms=1, tenant_quantum_tokens=40)
    requests = [(tenant, prompt(tag), None) for _ in range(3) for tenant, tag in (("a", 1), ("b", 2), ("c", 3))]
    assert held_batches(config, requests) == [[1, 2], [3, 1], [2, 3], [1, 2], [3]]


def test_max_inflight_caps_a_tenants_share_of_each_pass_and_a_lone_tenant_gets_full_batches():
    config = BatcherConfig(max_queue=100, max_batch_tokens=400, max_wait_ms=1, tenant_quantum_tokens=40)
    capped = TenantLimits(max_inflight=2)
    batches = held_batches(config, [("a", prompt(1), capped)] * 20 + [("b", prompt(2), None)] * 20)
    assert all(batch.count(1) <= 2 for batch in batches), batches
    assert [len(b) for b in batches[:2]] == [10, 10], "b fills what a may not take: work-conserving"
    assert batches[2:] == [[2, 1, 2, 1, 2, 2]] + [[1, 1]] * 7, "then a alone, still two a pass"
    alone = held_batches(config, [("b", prompt(2), None)] * 25)
    assert [len(b) for b in alone] == [10, 10, 5], "a lone tenant takes whole batches (400 / 40 tokens)"
    assert [len(b) for b in held_batches(config, [("a", prompt(1), capped)] * 5)] == [2, 2, 1]


def test_limits_fall_back_to_the_config_defaults_that_change_nothing_for_one_tenant():
    batcher: RerankBatcher[str] = RerankBatcher(Recorder(), BatcherConfig(max_queue=7))
    assert batcher.resolve_limits(None) == (7, 0), "default: the whole queue, no in-flight cap (as before)"
    tuned = RerankBatcher(Recorder(), BatcherConfig(tenant_max_queued=3, tenant_max_inflight=2))
    assert tuned.resolve_limits(TenantLimits(max_inflight=5)) == (3, 5)
    for bad in (0, -1, True):
        with pytest.raises(ValueError):
            TenantLimits(max_queued=bad)


def test_a_tenant_over_its_queue_limit_is_refused_at_once_while_others_are_admitted():
    async def scenario() -> tuple[list[list[int]], dict[str, int]]:
        recorder = Recorder(hold=True)
        batcher = RerankBatcher(recorder, BatcherConfig(max_queue=4, max_wait_ms=1))
        batcher.start()
        busy = asyncio.create_task(batcher.submit(prompt(0), "h", "noisy"))
        await asyncio.to_thread(recorder.started.wait, 30)  # the worker is held: no batch can finish
        two = TenantLimits(max_queued=2)
        noisy = [asyncio.create_task(batcher.submit(prompt(i), "h", "noisy", two)) for i in (1, 2)]
        await asyncio.sleep(0)
        with pytest.raises(TenantQueueFull, match=r"'noisy'.*max_queued=2"):  # no batch awaited: held worker
            await asyncio.wait_for(batcher.submit(prompt(3), "h", "noisy", two), timeout=5)
        noisy[0].cancel()  # a caller's deadline: its slot is free again
        await asyncio.sleep(0)
        noisy.append(asyncio.create_task(batcher.submit(prompt(4), "h", "noisy", two)))
        quiet = [asyncio.create_task(batcher.submit(prompt(i), "h", "quiet")) for i in (5, 6)]
        await asyncio.sleep(0)
        depths = batcher.tenant_depths()
        with pytest.raises(QueueFull) as full:  # the shared max_queue still bounds all that waits
            await batcher.submit(prompt(7), "h", "quiet")
        assert not isinstance(full.value, TenantQueueFull) and batcher.depth == 4
        recorder.release.set()
        await asyncio.gather(busy, noisy[1], noisy[2], *quiet)
        await batcher.stop()
        return recorder.batches, depths

    batches, depths = run(scenario())
    assert depths == {"noisy": 2, "quiet": 2}
    assert batches[0] == [0] and sorted(batches[1]) == [2, 4, 5, 6], "refused and cancelled ones never scored"


# --- noisy neighbour ---------------------------------------------------------------------------------------
# Cost model: a pass sleeps for its prompt tokens (a forward pass costs about its tokens). Every prompt is
# P = 100 tokens and 40 us a token, so one prompt costs S = 4 ms and the device serves 250 prompts/s. The
# three quiet tenants each offer 20% of that (50/s, Poisson); the fourth offers 20% (its share: "no flood")
# or 100% (5x its share: "flood"), same seed, so the quiet tenants' arrivals are the same in every run.
# "No flood" keeps the fourth tenant at its share: against the three alone no non-preemptive scheduler can
# promise 1.5x, since whatever the flood is admitted (one 4 ms prompt a pass here) is device time the others
# wait behind (measured: 1.3-1.8x over 6 seeds).
# All four runs share one event loop and run at the same time (sleeps cost no CPU), so a stall of this
# loaded machine hits both sides of each comparison alike.
P, TOKEN_S, RUN_S = 100, 40e-6, 1.5
QUIET = ("q1", "q2", "q3")
FLOOD_LIMITS = TenantLimits(max_queued=8, max_inflight=1)


def cost_model(prompts: Sequence[Prompt], handles: Sequence[str]) -> list[list[float]]:
    time.sleep(sum(prompt_tokens(p) for p in prompts) * TOKEN_S)
    return [[0.0] for _ in prompts]


def arrivals(flood_share: float, seed: int = 7) -> list[tuple[float, str]]:
    capacity = 1 / (P * TOKEN_S)
    rates = {**{tenant: 0.2 * capacity for tenant in QUIET}, "noisy": flood_share * capacity}
    events = []
    for tenant, rate in rates.items():  # one generator per tenant: the quiet ones' times do not depend on the flood
        rng, t = random.Random(f"{seed}-{tenant}"), 0.0
        while (t := t + rng.expovariate(rate)) < RUN_S:
            events.append((t, tenant))
    return sorted(events)


async def offer(events: list[tuple[float, str]], fair: bool) -> dict[str, list[float]]:
    """Latencies (queue + model ms) per tenant; refusals as "<tenant> refused" with the passes completed
    between the call and the refusal."""
    passes = [0]
    batcher = RerankBatcher(cost_model, BatcherConfig(max_batch_tokens=16 * P, max_wait_ms=2),
                            on_batch=lambda requests, tokens: passes.__setitem__(0, passes[0] + 1))
    batcher.start()
    out: dict[str, list[float]] = {}

    async def one(tenant: str) -> None:
        before = passes[0]
        try:  # FCFS: every request as one tenant with no limits, the batcher's behaviour before fair share
            scored = await batcher.submit(prompt(1, doc_tokens=P - 15), "h", tenant if fair else "",
                                          FLOOD_LIMITS if fair and tenant == "noisy" else None)
            out.setdefault(tenant, []).append(scored.queue_ms + scored.model_ms)
        except QueueFull:
            out.setdefault(f"{tenant} refused", []).append(passes[0] - before)

    loop = asyncio.get_running_loop()
    start, tasks = loop.time(), []
    for at, tenant in events:
        await asyncio.sleep(max(0.0, start + at - loop.time()))
        tasks.append(asyncio.create_task(one(tenant)))
    await asyncio.gather(*tasks)
    await batcher.stop()
    return out


def quiet_p99(out: dict[str, list[float]]) -> float:
    latencies = sorted(x for tenant in QUIET for x in out.get(tenant, []))
    return latencies[int(0.99 * len(latencies))]


def test_noisy_neighbour_fair_share_keeps_the_others_p99_and_fcfs_does_not():
    async def scenario() -> list[dict[str, list[float]]]:
        share, flood = arrivals(0.2), arrivals(1.0)
        return list(await asyncio.gather(offer(share, True), offer(flood, True), offer(share, False),
                                         offer(flood, False)))

    fair_share, fair_flood, fcfs_share, fcfs_flood = run(scenario())
    quiet_refused = [t for t in QUIET if f"{t} refused" in fair_flood]
    assert not quiet_refused, "fair share: the quiet tenants are all admitted"
    refusals = fair_flood["noisy refused"]
    # Offered 250/s, admitted about one prompt a pass (~55/s): the excess is hundreds of requests (~290 over
    # 8 seeds), each refused by the submit call itself, with no pass completing in between.
    assert len(refusals) > 100 and max(refusals) == 0
    # Fair share: the noisy tenant waits in its own queue and puts at most one 4 ms prompt into a pass, about
    # what it puts there at its share (a pass is then ~(S + wait) / (1 - 0.6) ~ 15 ms either way); measured
    # over 8 seeds on a loaded 2-core machine the quiet p99 ratio is 0.86-1.20, under the 1.5 asserted.
    assert quiet_p99(fair_flood) <= 1.5 * quiet_p99(fair_share), (quiet_p99(fair_flood), quiet_p99(fair_share))
    # FCFS: offered 1.6x capacity, the shared 64-deep queue fills and stays full: a quiet request waits behind
    # ~64 prompts (4 passes of 16 prompts = 256 ms) or is refused; at its share the p99 is 60-190 ms (8 seeds,
    # measured 330-400 ms with the flood: ratio 2.1-5.0), and 20-33% of the quiet requests are refused.
    assert quiet_p99(fcfs_flood) > 1.5 * quiet_p99(fcfs_share), (quiet_p99(fcfs_flood), quiet_p99(fcfs_share))
    assert any(f"{t} refused" in fcfs_flood for t in QUIET), "FCFS refuses the quiet tenants too"
