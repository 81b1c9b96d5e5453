"""Dynamic batching for the reranker: callers `await submit(prompt, handle)`;
one worker drains a bounded queue into batches capped by tokens and runs them
off the event loop. Requests of different tenants share batches: each item
carries its tenant's handle, and the score function runs them together. A
full queue is refused at once (QueueFull), so overload shows up as an error
the caller can act on instead of as unbounded latency. A request that does
not fit the current batch's token cap is carried over to start the next one."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

from reranker.errors import QueueFull
from reranker.prompt import Prompt

log = logging.getLogger(__name__)
H = TypeVar("H")  # whatever the score function needs per request (reranker.tenants.TenantHandle)


@dataclass(frozen=True)
class BatcherConfig:
    max_queue: int = 64  # waiting requests; more are refused with RESOURCE_EXHAUSTED
    max_batch_tokens: int = 65_536  # prompt tokens per forward pass
    max_wait_ms: float = 2.0  # how long the first request of a batch waits for company


@dataclass
class Scored:
    scores: list[float]
    queue_ms: float
    model_ms: float


@dataclass
class _Item(Generic[H]):
    prompt: Prompt
    handle: H
    future: asyncio.Future[Scored]
    enqueued: float

    @property
    def tokens(self) -> int:
        return prompt_tokens(self.prompt)


def prompt_tokens(prompt: Prompt) -> int:
    return sum(len(d) for d in prompt.docs) + len(prompt.prefix) + len(prompt.final)


class RerankBatcher(Generic[H]):
    def __init__(self, score_fn: Callable[[Sequence[Prompt], Sequence[H]], list[list[float]]],
                 config: BatcherConfig = BatcherConfig(),
                 on_batch: Callable[[int, int], None] | None = None) -> None:
        self.score_fn = score_fn
        self.config = config
        self.on_batch = on_batch  # (requests, prompt tokens) of every batch scored: the service's metrics
        self._queue: asyncio.Queue[_Item[H]] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rerank")
        self._carry: _Item[H] | None = None

    def start(self) -> None:
        """Start the worker; call inside the running event loop."""
        self._queue = asyncio.Queue(maxsize=self.config.max_queue)
        self._worker = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Stop the worker; a batch being scored finishes, requests still queued are cancelled."""
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            self._worker = None
        for item in self._drain():
            item.future.cancel()
        await asyncio.to_thread(self._executor.shutdown, True)

    @property
    def depth(self) -> int:
        """Requests waiting for a batch."""
        return (self._queue.qsize() if self._queue is not None else 0) + (self._carry is not None)

    async def submit(self, prompt: Prompt, handle: H) -> Scored:
        if self._queue is None:
            raise RuntimeError("start() the batcher first")
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
            if live:
                await self._score(live)

    async def _score(self, live: list[_Item[H]]) -> None:
        start = time.perf_counter()
        try:
            results = await asyncio.get_running_loop().run_in_executor(
                self._executor, self.score_fn, [item.prompt for item in live], [item.handle for item in live])
        except Exception as exc:  # noqa: BLE001 - every waiting caller must hear of it
            log.exception("rerank batch of %d failed", len(live))
            for item in live:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        model_ms = (time.perf_counter() - start) * 1000
        if self.on_batch is not None:
            self.on_batch(len(live), sum(item.tokens for item in live))
        for item, scores in zip(live, results, strict=True):
            if not item.future.done():
                item.future.set_result(Scored(scores, (start - item.enqueued) * 1000, model_ms))

    async def _next_batch(self) -> list[_Item[H]]:
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

    def _drain(self) -> list[_Item[H]]:
        items = [self._carry] if self._carry is not None else []
        self._carry = None
        while self._queue is not None and not self._queue.empty():
            items.append(self._queue.get_nowait())
        return items
