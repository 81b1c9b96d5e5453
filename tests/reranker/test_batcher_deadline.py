"""The batcher's time bound (reranker.batcher, BatcherConfig.deadline_share): a request that behind the queued work
would take more than its share of the caller's time left is refused at once with ExpectedLate; the estimate counts
only what deficit round-robin serves before it, so a noisy neighbour's backlog does not refuse a light tenant."""

from __future__ import annotations

import asyncio
import re

import pytest

from reranker.batcher import BatcherConfig, RerankBatcher, _FairQueues, _Item, prompt_tokens
from reranker.errors import ExpectedLate, QueueFull
from tests.reranker.test_batcher import Recorder, prompt, run

TOKENS = 40  # prompt(i): 10 prefix + 25 document + 5 final tokens
SECONDS_PER_TOKEN = 0.01  # a 40-token prompt is expected to take 0.4 s


def queues_with(waiting: dict[str, int]) -> _FairQueues[str]:
    """Fair queues holding `waiting[tenant]` 40-token requests of each tenant, quantum 50 tokens."""
    fair: _FairQueues[str] = _FairQueues(quantum=50)
    loop = asyncio.new_event_loop()
    try:
        for tenant, count in waiting.items():
            for i in range(count):
                fair.push(_Item(prompt(i), "h", tenant, TOKENS, loop.create_future(), 0.0), 100, 0, 100)
    finally:
        loop.close()
    return fair


def test_tokens_before_count_only_what_fair_share_serves_first() -> None:
    assert prompt_tokens(prompt(0)) == TOKENS
    fair = queues_with({"noisy": 20, "light": 1})
    # light's own queue and request (80), then of noisy's 800 queued at most 80 + one quantum of 50.
    assert fair.tokens_before("light", TOKENS) == 80 + 130
    # noisy's new request is behind its own 800 and light's 40 (all of it: less than noisy's share).
    assert fair.tokens_before("noisy", TOKENS) == 840 + 40
    assert queues_with({}).tokens_before("new", TOKENS) == TOKENS, "an empty batcher: only its own tokens"


async def held_batcher(share: float = 0.5) -> tuple[RerankBatcher[str], Recorder, asyncio.Task]:
    """A started batcher that knows 0.01 s per token (quantum 50 tokens), its worker busy with request 0 until
    released."""
    recorder = Recorder(hold=True)
    batcher = RerankBatcher(recorder, BatcherConfig(max_wait_ms=1, deadline_share=share, tenant_quantum_tokens=50))
    batcher.token_seconds.add(SECONDS_PER_TOKEN)
    batcher.start()
    busy = asyncio.create_task(batcher.submit(prompt(0), "h", "t"))
    await asyncio.to_thread(recorder.started.wait, 30)
    return batcher, recorder, busy


def test_a_request_that_would_finish_past_its_share_is_refused_at_once_and_one_in_time_is_served() -> None:
    """Behind the forward in progress (0.4 s expected, just started), a new 40-token request expects ~0.8 s."""

    async def scenario() -> tuple[str, list[float]]:
        batcher, recorder, busy = await held_batcher()
        with pytest.raises(ExpectedLate) as refused:  # 0.8 s > 0.5 of 1 s
            await asyncio.wait_for(batcher.submit(prompt(1), "h", "t", time_left_s=1.0), timeout=0.5)
        assert isinstance(refused.value, QueueFull), "the service answers it as RESOURCE_EXHAUSTED"
        served = asyncio.create_task(batcher.submit(prompt(2), "h", "t", time_left_s=2.0))  # 0.8 s < 1 s
        no_deadline = asyncio.create_task(batcher.submit(prompt(3), "h", "t"))
        await asyncio.sleep(0)
        recorder.release.set()
        scores = [s.scores[0] for s in await asyncio.gather(busy, served, no_deadline)]
        await batcher.stop()
        return str(refused.value), scores

    message, scores = run(scenario())
    estimate = re.search(r"would finish in about (\d+) ms", message)
    assert estimate and 700 < int(estimate.group(1)) <= 800 and "of the 1000 ms" in message, message
    assert scores == [0.0, 2.0, 3.0]


def test_nothing_ahead_admits_whatever_the_estimate_and_share_zero_turns_the_bound_off() -> None:
    async def idle() -> float:
        batcher = RerankBatcher(Recorder(), BatcherConfig(max_wait_ms=1))
        batcher.token_seconds.add(SECONDS_PER_TOKEN)  # 0.4 s expected for a request with 0.01 s left
        batcher.start()
        scored = await batcher.submit(prompt(5), "h", "t", time_left_s=0.01)
        await batcher.stop()
        return scored.scores[0]

    async def off() -> float:
        batcher, recorder, busy = await held_batcher(share=0)
        waiting = asyncio.create_task(batcher.submit(prompt(6), "h", "t", time_left_s=0.01))
        await asyncio.sleep(0)
        recorder.release.set()
        scored = await waiting
        await busy
        await batcher.stop()
        return scored.scores[0]

    assert run(idle()) == 5.0
    assert run(off()) == 6.0


def test_a_light_tenant_is_admitted_behind_a_noisy_backlog_that_refuses_the_noisy_one() -> None:
    """20 of noisy's requests queued (8 s of work): noisy's next expects ~8.8 s, light's ~1.7 s (the forward in
    progress, its own 40 tokens and 90 of noisy's, its own plus a quantum)."""

    async def scenario() -> list[float]:
        batcher, recorder, busy = await held_batcher()
        noisy = [asyncio.create_task(batcher.submit(prompt(10 + i), "h", "noisy")) for i in range(20)]
        await asyncio.sleep(0)
        with pytest.raises(ExpectedLate):
            await batcher.submit(prompt(40), "h", "noisy", time_left_s=4.0)
        light = asyncio.create_task(batcher.submit(prompt(50), "h", "light", time_left_s=4.0))
        await asyncio.sleep(0)
        recorder.release.set()
        scores = [s.scores[0] for s in await asyncio.gather(busy, light, *noisy)]
        await batcher.stop()
        return scores

    scores = run(scenario())
    assert scores[:2] == [0.0, 50.0]


def test_each_forward_updates_the_seconds_per_token() -> None:
    async def scenario() -> float | None:
        batcher = RerankBatcher(Recorder(), BatcherConfig(max_wait_ms=1))
        batcher.start()
        assert batcher.token_seconds.value is None and batcher.expected_finish("t", TOKENS) is None
        await batcher.submit(prompt(0), "h", "t")
        await batcher.stop()
        return batcher.token_seconds.value

    per_token = run(scenario())
    assert per_token is not None and per_token > 0
