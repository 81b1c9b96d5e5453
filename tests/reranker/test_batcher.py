"""The dynamic batcher (reranker.batcher) on its own: token cap, carry-over, a full queue, cancelled
requests and shutdown. The score function records what it is given, so batches can be inspected."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest

from reranker.batcher import BatcherConfig, RerankBatcher, prompt_tokens
from reranker.errors import QueueFull
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


def test_token_cap_splits_batches_and_carries_the_overflow_in_order():
    assert prompt_tokens(prompt(0)) == 40

    async def scenario() -> tuple[list[list[int]], list[float]]:
        recorder = Recorder()
        batcher = RerankBatcher(recorder, BatcherConfig(max_queue=16, max_batch_tokens=100, max_wait_ms=50))
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
