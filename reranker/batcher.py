"""Dynamic batching for the reranker: callers `await submit(prompt, handle)`;
one worker drains a bounded queue into batches capped by tokens and runs them
off the event loop. Requests of different tenants share batches: each item
carries its tenant's handle, and the score function runs them together. A
full queue is refused at once (QueueFull), so overload shows up as an error
the caller can act on instead of as unbounded latency."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from reranker.errors import QueueFull
from reranker.prompt import Prompt

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatcherConfig:
    max_queue: int = 64  # waiting requests
    max_batch_tokens: int = 65_536  # document tokens per forward pass
    max_wait_ms: float = 2.0  # how long the first request waits for company


@dataclass
class Scored:
    scores: list[float]
    queue_ms: float
    model_ms: float
    batch_size: int


@dataclass
class _Item:
    prompt: Prompt
    handle: Any  # the tenant's handle (reranker.engine.TenantHandle), passed through to score_fn
    future: asyncio.Future
    enqueued: float

    @property
    def tokens(self) -> int:
        return sum(len(d) for d in self.prompt.docs) + len(self.prompt.prefix) + len(self.prompt.final)


class RerankBatcher:
    def __init__(self, score_fn: Callable[[Sequence[Prompt], Sequence[Any]], list[list[float]]],
                 config: BatcherConfig = BatcherConfig()) -> None:
        self.score_fn = score_fn
        self.config = config
        self._queue: asyncio.Queue[_Item] | None = None
        self._worker: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rerank")
        self._carry: _Item | None = None

    def start(self) -> None:
        self._queue = asyncio.Queue(maxsize=self.config.max_queue)
        self._worker = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        self._executor.shutdown(wait=False, cancel_futures=True)

    @property
    def queued(self) -> int:
        return self._queue.qsize() if self._queue else 0

    async def submit(self, prompt: Prompt, handle: Any = None) -> Scored:
        assert self._queue is not None, "start() the batcher first"
        item = _Item(prompt, handle, asyncio.get_running_loop().create_future(), time.perf_counter())
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            raise QueueFull(f"reranker queue is full ({self.config.max_queue} waiting)") from None
        return await item.future  # cancelled by the caller's deadline: the worker then skips it

    async def _run(self) -> None:
        while True:
            batch = await self._next_batch()
            live = [item for item in batch if not item.future.done()]
            if not live:
                continue
            start = time.perf_counter()
            try:
                results = await asyncio.get_running_loop().run_in_executor(
                    self._executor, self.score_fn, [item.prompt for item in live], [item.handle for item in live])
            except Exception as exc:  # noqa: BLE001 - every waiting caller must hear of it
                log.exception("rerank batch of %d failed", len(live))
                for item in live:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            model_ms = (time.perf_counter() - start) * 1000
            for item, scores in zip(live, results, strict=True):
                if not item.future.done():
                    queue_ms = (start - item.enqueued) * 1000
                    item.future.set_result(Scored(scores, queue_ms, model_ms, len(live)))

    async def _next_batch(self) -> list[_Item]:
        assert self._queue is not None
        first = self._carry or await self._queue.get()
        self._carry = None
        batch, tokens = [first], first.tokens
        deadline = time.perf_counter() + self.config.max_wait_ms / 1000
        while True:
            remaining = deadline - time.perf_counter()
            try:
                item = self._queue.get_nowait() if remaining <= 0 else \
                    await asyncio.wait_for(self._queue.get(), remaining)
            except (asyncio.QueueEmpty, TimeoutError):
                return batch
            if tokens + item.tokens > self.config.max_batch_tokens:
                self._carry = item  # starts the next batch
                return batch
            batch.append(item)
            tokens += item.tokens
