"""Dynamic batching for the reranker, fair across tenants: callers `await submit(prompt, handle, tenant, limits)`;
one worker forms batches capped by prompt tokens and scores them off the event loop. Requests of different
tenants share batches: each item carries its tenant's handle, and the score function runs them together.

Scheduling. Each tenant has its own FIFO queue, and a batch is filled by deficit round-robin over the tenants
with waiting requests, counted in prompt tokens (DRR: M. Shreedhar and G. Varghese, "Efficient fair queuing
using deficit round robin", SIGCOMM 1995). A visit adds one quantum of tokens to the tenant's deficit; the
tenant's requests are taken in order while the deficit covers the next one's tokens, each spending its tokens;
a tenant whose queue empties leaves the round and forgets its deficit (no credit is saved up while idle). The
round-robin position, and the visit in progress, carry over from one batch to the next: the service order is
DRR's, cut into batches, so no tenant is always first. While two tenants stay backlogged, the prompt tokens
each has been served differ by less than one quantum plus one longest prompt, whatever their prompt lengths
or rates. Tokens, not requests, because a forward pass costs about its tokens: first come first served (one
queue, as before) gives a tenant a share of the model in proportion to what it offers, so one tenant's flood
delays every other. Work-conserving: a tenant whose neighbours are idle, or a lone one, takes whole batches.

Limits per tenant (reranker.limits.TenantLimits; None falls back to BatcherConfig's defaults): `max_queued` of
its requests may wait, more are refused at once with TenantQueueFull (a QueueFull: RESOURCE_EXHAUSTED with the
retry hint) while other tenants are still admitted; `max_inflight` of its requests may share one forward pass,
so a flood cannot fill, and stretch, every pass the others run in. The global `max_queue` still bounds all
that waits (QueueFull), so overload shows up as an error the caller can act on, not as unbounded latency.

Time, too: a caller that says how long it has left (`time_left_s`, its deadline) is refused at once
(ExpectedLate, also RESOURCE_EXHAUSTED) when, behind what is already queued, its rerank is expected to take more
than `deadline_share` of that time. The estimate is the forward in progress, then the prompt tokens DRR serves
before the request (all of its own tenant's queue, and of each other tenant's at most as much again plus a quantum:
a noisy neighbour's backlog does not count against a light tenant), then its own, at a running mean of the
seconds per prompt token of recent forwards. A count bound alone must be sized for one forward time and is wrong
as soon as prompts grow or the model gets faster; the time bound follows them. A request with nothing ahead of it
is always admitted: waiting cannot be what makes it late.

Batches hold at most `max_batch_tokens` (by default the scorer's own best size); a request is never split: the
one DRR picks next that does not fit starts the next batch (one larger than the cap runs alone). The worker
waits up to `max_wait_ms` for company unless a full batch is already waiting. Requests cancelled while queued
(deadlines) are skipped."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

from common.running import RunningMean
from reranker.errors import ExpectedLate, QueueFull, TenantQueueFull
from reranker.limits import TenantLimits
from reranker.prompt import Prompt

log = logging.getLogger(__name__)
H = TypeVar("H")  # whatever the score function needs per request (reranker.tenants.TenantHandle)
# The batch cap for a scorer with no better size of its own: on a GPU, the larger the batch the better.
LARGE_BATCH_TOKENS = 65_536
# The running mean's weight on each forward's seconds per token: it follows a change within ~10 forwards.
TOKEN_SECONDS_WEIGHT = 0.2


@dataclass(frozen=True)
class BatcherConfig:
    max_queue: int = 64  # waiting requests; more are refused with RESOURCE_EXHAUSTED
    # Prompt tokens per forward pass; 0: the reranker's own (Reranker.batch_tokens: 65,536 on a GPU, the packed
    # limit on a CPU: 8,192 in bf16, 4,096 in fp32).
    max_batch_tokens: int = 0
    max_wait_ms: float = 2.0  # how long the first request of a batch waits for company
    # Half, as the gateway's admission: under sustained overload every admitted request is a marginal one, and an
    # estimate that is a mean leaves about half of those late with the whole time allowed.
    deadline_share: float = 0.5  # of a caller's time left, what its expected wait and forward may take; 0: off
    # Defaults for tenants whose TenantLimits leave a field None. Both change nothing for a lone tenant (one
    # tenant may fill the queue and every batch, as before fair share); set them, or per-tenant limits in the
    # registry, for a noisy neighbour to be refused instead of filling the shared queue.
    tenant_max_queued: int = 0  # a tenant's waiting requests; 0: max_queue
    tenant_max_inflight: int = 0  # a tenant's requests per forward pass; 0: no cap
    tenant_quantum_tokens: int = 0  # prompt tokens a tenant's turn adds to its deficit; 0: max_batch_tokens // 8


@dataclass
class Scored:
    scores: list[float]
    queue_ms: float
    model_ms: float
    batch_requests: int = 1  # requests in the forward pass that scored it
    batch_tokens: int = 0  # their prompt tokens together


@dataclass
class _Item(Generic[H]):
    prompt: Prompt
    handle: H
    tenant: str
    tokens: int
    future: asyncio.Future[Scored]
    enqueued: float


def prompt_tokens(prompt: Prompt) -> int:
    return sum(len(d) for d in prompt.docs) + len(prompt.prefix) + len(prompt.final)


class _FairQueues(Generic[H]):
    """Per-tenant FIFO queues and the DRR state; synchronous, so it runs on the event loop without locks."""

    def __init__(self, quantum: int) -> None:
        self.quantum = max(1, quantum)
        self.waiting = 0  # requests queued, including cancelled ones not yet dropped
        self.tokens = 0  # their prompt tokens
        self._queues: dict[str, deque[_Item[H]]] = {}
        self._ring: deque[str] = deque()  # tenants with a queue, in round-robin order; _ring[0] is visited
        self._deficit: dict[str, int] = {}
        self._inflight_cap: dict[str, int] = {}  # 0: none; the latest submit's limit
        self._in_visit = False  # _ring[0] already had its quantum for this visit (a batch was cut mid-visit)

    def depths(self) -> dict[str, int]:
        return {tenant: len(queue) for tenant, queue in self._queues.items() if queue}

    def push(self, item: _Item[H], max_queued: int, max_inflight: int, max_total: int) -> None:
        """Queue `item`, or refuse it at once (TenantQueueFull before QueueFull: the more specific reason)."""
        queue = self._queues.get(item.tenant)
        if queue is not None and len(queue) >= max_queued and self._purge(queue) >= max_queued:
            raise TenantQueueFull(f"tenant {item.tenant!r} has {len(queue)} reranks waiting, its limit "
                                  f"(max_queued={max_queued}); other tenants are still admitted")
        if self.waiting >= max_total and sum(self._purge(q) for q in self._queues.values()) >= max_total:
            raise QueueFull(f"reranker queue is full ({max_total} waiting)")
        if queue is None:
            queue = self._queues[item.tenant] = deque()
            self._ring.append(item.tenant)
            self._deficit[item.tenant] = 0
        queue.append(item)
        self._inflight_cap[item.tenant] = max_inflight
        self.waiting += 1
        self.tokens += item.tokens

    def take(self, cap: int) -> list[_Item[H]]:
        """The next batch in DRR order: at most `cap` tokens (or one request larger than that), each tenant at
        most its in-flight cap. Empty only when nothing live waits."""
        batch: list[_Item[H]] = []
        tokens, idle_visits = 0, 0
        taken: Counter[str] = Counter()
        capped: set[str] = set()  # tenants at their in-flight cap: skipped for the rest of this batch
        while len(capped) < len(self._ring):
            tenant = self._ring[0]
            queue = self._queues[tenant]
            self._drop_cancelled(queue)
            if not queue:
                capped.discard(tenant)
                self._leave(tenant)
                continue
            if tenant in capped:
                self._ring.rotate(-1)
                continue
            if not self._in_visit:
                self._deficit[tenant] += self.quantum
                self._in_visit = True
            limit, served = self._inflight_cap[tenant], False
            while queue and queue[0].tokens <= self._deficit[tenant] and not (limit and taken[tenant] >= limit):
                if batch and tokens + queue[0].tokens > cap:
                    return batch  # starts the next batch, in this same visit
                item = self._pop(queue)
                batch.append(item)
                tokens += item.tokens
                taken[tenant] += 1
                self._deficit[tenant] -= item.tokens
                served = True
                self._drop_cancelled(queue)
            idle_visits = 0 if served else idle_visits + 1
            self._end_visit(tenant, capped if queue and limit and taken[tenant] >= limit else None)
            if idle_visits and idle_visits >= len(self._ring) - len(capped):
                self._skip_idle_rounds(capped)
                idle_visits = 0
        return batch

    def _end_visit(self, tenant: str, capped: set[str] | None) -> None:
        self._in_visit = False
        queue = self._queues[tenant]
        if not queue:
            self._leave(tenant)
            return
        if capped is not None:  # stopped by its cap, not its deficit: keep no more credit than DRR would
            self._deficit[tenant] = min(self._deficit[tenant], queue[0].tokens - 1)
            capped.add(tenant)
        self._ring.rotate(-1)

    def _skip_idle_rounds(self, capped: set[str]) -> None:
        """Every tenant had a visit that could not pay for its next request: add at once the quanta of the
        rounds in which none could (what visiting them one by one would do, with long prompts and a small
        quantum, in many turns of the loop)."""
        for tenant in self._ring:
            self._drop_cancelled(self._queues[tenant])
        eligible = [t for t in self._ring if t not in capped and self._queues[t]]
        if not eligible:
            return
        rounds = min(math.ceil((self._queues[t][0].tokens - self._deficit[t]) / self.quantum) for t in eligible) - 1
        for tenant in eligible:
            self._deficit[tenant] += max(0, rounds) * self.quantum

    def _leave(self, tenant: str) -> None:
        """An emptied queue leaves the round and forgets its deficit."""
        if self._ring and self._ring[0] == tenant:
            self._in_visit = False
        self._ring.remove(tenant)
        del self._queues[tenant], self._deficit[tenant], self._inflight_cap[tenant]

    def _pop(self, queue: deque[_Item[H]]) -> _Item[H]:
        item = queue.popleft()
        self.waiting -= 1
        self.tokens -= item.tokens
        return item

    def _drop_cancelled(self, queue: deque[_Item[H]]) -> None:
        while queue and queue[0].future.done():
            self._pop(queue)

    def _purge(self, queue: deque[_Item[H]]) -> int:
        """Drop every cancelled request of `queue` (only when a limit is reached); its length after. An emptied
        queue stays in the round until its next visit."""
        live = [item for item in queue if not item.future.done()]
        for item in queue:
            if item.future.done():
                self.waiting -= 1
                self.tokens -= item.tokens
        queue.clear()
        queue.extend(live)
        return len(queue)

    def tokens_before(self, tenant: str, tokens: int) -> int:
        """Prompt tokens DRR serves before a new request of `tenant` with `tokens` is done: its own tenant's queue
        and the request, and of each other tenant's queue at most that much plus a quantum (while both are
        backlogged, their served tokens differ by less than a quantum plus one prompt)."""
        own = sum(item.tokens for item in self._queues.get(tenant, ())) + tokens
        return own + sum(min(own + self.quantum, sum(item.tokens for item in queue))
                         for other, queue in self._queues.items() if other != tenant)

    def drain(self) -> Iterator[_Item[H]]:
        while self._ring:
            tenant = self._ring[0]
            yield from self._queues[tenant]
            self._queues[tenant].clear()
            self._leave(tenant)
        self.waiting = self.tokens = 0


class RerankBatcher(Generic[H]):
    def __init__(self, score_fn: Callable[[Sequence[Prompt], Sequence[H]], list[list[float]]],
                 config: BatcherConfig = BatcherConfig(),
                 on_batch: Callable[[int, int], None] | None = None,
                 batch_tokens: int = LARGE_BATCH_TOKENS) -> None:
        self.score_fn = score_fn
        self.config = config
        self.on_batch = on_batch  # (requests, prompt tokens) of every batch scored: the service's metrics
        self.max_batch_tokens = config.max_batch_tokens or batch_tokens  # `batch_tokens`: the scorer's own best
        self._fair: _FairQueues[H] = _FairQueues(config.tenant_quantum_tokens or self.max_batch_tokens // 8)
        self._arrived = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rerank")
        self.token_seconds = RunningMean(TOKEN_SECONDS_WEIGHT)  # model seconds per prompt token of recent forwards
        self._forward: tuple[float, int] | None = None  # (start, prompt tokens) of the forward in progress

    def start(self) -> None:
        """Start the worker; call inside the running event loop."""
        self._worker = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Stop the worker; a batch being scored finishes, requests still queued are cancelled."""
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            self._worker = None
        for item in self._fair.drain():
            item.future.cancel()
        await asyncio.to_thread(self._executor.shutdown, True)

    @property
    def depth(self) -> int:
        """Requests waiting for a batch, all tenants together."""
        return self._fair.waiting

    def tenant_depths(self) -> dict[str, int]:
        """Requests waiting for a batch, per tenant that has any (a labelled gauge)."""
        return self._fair.depths()

    def resolve_limits(self, limits: TenantLimits | None) -> tuple[int, int]:
        """(max_queued, max_inflight) for a tenant's TenantLimits: its own, else the config's defaults; 0
        in-flight: no cap."""
        cfg, own = self.config, limits or TenantLimits()
        max_queued = own.max_queued or cfg.tenant_max_queued or cfg.max_queue
        return max_queued, own.max_inflight or cfg.tenant_max_inflight

    async def submit(self, prompt: Prompt, handle: H, tenant: str = "", limits: TenantLimits | None = None,
                     time_left_s: float | None = None) -> Scored:
        """Score `prompt` in a batch; TenantQueueFull / QueueFull at once when the tenant's or the shared queue
        is full, ExpectedLate when it would take more than its share of `time_left_s` (None: no deadline).
        `tenant` only groups requests for fair share ("" is a tenant like any other)."""
        if self._worker is None:
            raise RuntimeError("start() the batcher first")
        max_queued, max_inflight = self.resolve_limits(limits)
        future: asyncio.Future[Scored] = asyncio.get_running_loop().create_future()
        item = _Item(prompt, handle, tenant, prompt_tokens(prompt), future, time.perf_counter())
        self._refuse_if_late(item, time_left_s)
        self._fair.push(item, max_queued, max_inflight, self.config.max_queue)
        self._arrived.set()
        return await future  # cancelled by the caller's deadline: the worker then skips it

    def expected_finish(self, tenant: str, tokens: int) -> float | None:
        """Seconds until a new request of `tenant` with `tokens` prompt tokens would be scored: what remains of the
        forward in progress, then the tokens served before it and its own; None before the first forward."""
        per_token = self.token_seconds.value
        if per_token is None:
            return None
        busy = 0.0
        if self._forward is not None:
            started, forward_tokens = self._forward
            busy = max(0.0, started + forward_tokens * per_token - time.perf_counter())
        return busy + self._fair.tokens_before(tenant, tokens) * per_token

    def _refuse_if_late(self, item: _Item[H], time_left_s: float | None) -> None:
        share = self.config.deadline_share
        if time_left_s is None or share <= 0 or (self._forward is None and not self._fair.waiting):
            return
        finish = self.expected_finish(item.tenant, item.tokens)
        if finish is not None and finish > share * time_left_s:
            raise ExpectedLate(f"the rerank would finish in about {finish * 1000:.0f} ms behind {self._fair.waiting} "
                               f"queued, past {share:g} of the {time_left_s * 1000:.0f} ms its caller has left")

    async def _run(self) -> None:
        while True:
            batch = await self._next_batch()
            live = [item for item in batch if not item.future.done()]
            if live:
                await self._score(live)

    async def _score(self, live: list[_Item[H]]) -> None:
        start = time.perf_counter()
        tokens = sum(item.tokens for item in live)
        self._forward = (start, tokens)
        try:
            results = await asyncio.get_running_loop().run_in_executor(
                self._executor, self.score_fn, [item.prompt for item in live], [item.handle for item in live])
        except Exception as exc:  # noqa: BLE001 - every waiting caller must hear of it
            log.exception("rerank batch of %d failed", len(live))
            for item in live:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        finally:
            self._forward = None
        model_ms = (time.perf_counter() - start) * 1000
        self.token_seconds.add(model_ms / 1000 / max(1, tokens))
        if self.on_batch is not None:
            self.on_batch(len(live), tokens)
        for item, scores in zip(live, results, strict=True):
            if not item.future.done():
                item.future.set_result(Scored(scores, (start - item.enqueued) * 1000, model_ms, len(live), tokens))

    async def _next_batch(self) -> list[_Item[H]]:
        """Wait for a request, then up to max_wait_ms for company unless a full batch already waits."""
        while not self._fair.waiting:
            self._arrived.clear()
            await self._arrived.wait()
        deadline = time.perf_counter() + self.config.max_wait_ms / 1000
        while self._fair.tokens < self.max_batch_tokens:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                break
        return self._fair.take(self.max_batch_tokens)
