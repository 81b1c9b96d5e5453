"""Admission control: a bounded number of requests worked on at once and a bounded queue in front of them;
past it, RESOURCE_EXHAUSTED at once with a retry hint, instead of a queue that grows until every request
misses its deadline.

The queue is bounded twice. By count (`max_queued`), and by time: the service keeps a running estimate of how
long a request holds its slot, and refuses at once a request that, at the back of the queue, would take more than
`deadline_share` of the time left before its deadline (or would wait longer than `max_queue_wait_ms`). A count
alone has to be sized by hand for one service time (in flight + queued, times the service time, under the SLO)
and is wrong as soon as the service gets faster or slower; the time bound follows the service. A queued request
still honours its deadline (DEADLINE_EXCEEDED naming the queue) when the estimate was too hopeful.

The hint is the trailing metadata `grpc-retry-pushback-ms`, the key gRPC's own retry policy reads.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import grpc
from prometheus_client import Counter, Gauge

from common.running import RunningMean
from common.tracing import stage
from services.errors import ServiceError
from services.server import Context, time_budget, within_deadline

RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"

IN_FLIGHT = Gauge("admission_in_flight", "Requests admitted and being worked on.")
QUEUED = Gauge("admission_queued", "Requests waiting for admission.")
REJECTED = Counter("admission_rejected_total", "Requests refused at once: the queue full (queue_full), or the "
                   "expected wait past the call's deadline or the wait bound (expected_wait).", ["reason"])
for _reason in ("queue_full", "expected_wait"):  # both series exist, at 0, before the first refusal
    REJECTED.labels(_reason)
SERVICE_SECONDS = Gauge("admission_service_seconds", "Running estimate of the time a request holds its work slot.")
# The running estimate's weight on each new request: it follows a change of service time within ~10 requests
# and one slow request moves it by a fifth.
SERVICE_TIME_WEIGHT = 0.2


@dataclass(frozen=True)
class AdmissionConfig:
    max_in_flight: int = 32  # requests worked on at once; 0: no limit
    max_queued: int = 64  # requests waiting for a slot; beyond it RESOURCE_EXHAUSTED at once
    max_queue_wait_ms: int = 0  # refuse at once a request expected to wait longer for a slot; 0: only its deadline
    deadline_share: float = 0.5  # of a call's remaining time, what its expected wait and service may take; 0: off
    retry_after_ms: int = 100  # the retry hint sent with a refusal


class Overloaded(ServiceError):
    """RESOURCE_EXHAUSTED with a retry hint in the trailing metadata."""

    def __init__(self, message: str, retry_after_ms: int) -> None:
        super().__init__(grpc.StatusCode.RESOURCE_EXHAUSTED, message)
        self.trailers = ((RETRY_PUSHBACK_KEY, str(retry_after_ms)),)


class ServiceTime:
    """Running mean of the seconds a request holds its slot (None before the first)."""

    def __init__(self, weight: float = SERVICE_TIME_WEIGHT) -> None:
        self._mean = RunningMean(weight)

    @property
    def seconds(self) -> float | None:
        return self._mean.value

    def add(self, seconds: float) -> None:
        SERVICE_SECONDS.set(self._mean.add(seconds))

    def expected_finish(self, ahead: int, slots: int) -> float | None:
        """Seconds until a request with `ahead` requests queued before it is done: it waits for ahead + 1 slots
        to free (slots free at `slots` per service time), then holds one for a service time."""
        if self.seconds is None:
            return None
        return (ahead + 1) * self.seconds / slots + self.seconds


class Admission:
    """One per service process, used from its event loop."""

    def __init__(self, config: AdmissionConfig, what: str) -> None:
        self.config = config
        self.what = what
        self._slots = asyncio.Semaphore(config.max_in_flight) if config.max_in_flight > 0 else None
        self._queued = 0
        self.service_time = ServiceTime()

    @asynccontextmanager
    async def admit(self, context: Context | None) -> AsyncIterator[None]:
        if self._slots is None:
            yield
            return
        with stage("admission_wait", queued=self._slots.locked()):
            await self._acquire(context)
        IN_FLIGHT.inc()
        started = time.perf_counter()
        try:
            yield
        finally:
            self.service_time.add(time.perf_counter() - started)
            IN_FLIGHT.dec()
            self._slots.release()

    async def _acquire(self, context: Context | None) -> None:
        """A slot: at once, after waiting in the queue, or RESOURCE_EXHAUSTED when the queue is full or too long
        to wait in."""
        assert self._slots is not None
        if not self._slots.locked():
            await self._slots.acquire()
            return
        self._refuse_if_overloaded(context)
        self._queued += 1
        QUEUED.inc()
        try:
            await within_deadline(context, self._slots.acquire(), f"queued for admission to the {self.what}")
        finally:
            self._queued -= 1
            QUEUED.dec()

    def _refuse_if_overloaded(self, context: Context | None) -> None:
        if self._queued >= self.config.max_queued:
            self._refuse("queue_full", f"{self.config.max_in_flight} requests in flight and {self._queued} queued")
        finish = self.service_time.expected_finish(self._queued, self.config.max_in_flight)
        if finish is None:
            return
        service = self.service_time.seconds or 0.0
        wait_bound = self.config.max_queue_wait_ms / 1000
        if wait_bound > 0 and finish - service > wait_bound:
            self._refuse("expected_wait", f"{self._queued} queued, an expected wait of {(finish - service) * 1000:.0f} "
                                          f"ms is past the {self.config.max_queue_wait_ms} ms bound")
        budget = time_budget(context)
        share = self.config.deadline_share
        # Only a share of the time left: the estimate is a mean, and under sustained overload the queue sits at
        # this bound, so every admitted request is a marginal one; with the whole budget about half of them would
        # wait their deadline out and fail anyway (measured: a gateway past capacity served a third of its load).
        if budget is not None and share > 0 and finish > share * budget:
            self._refuse("expected_wait", f"{self._queued} queued, the call would finish in about {finish * 1000:.0f} "
                                          f"ms, past {share:g} of the {budget * 1000:.0f} ms it has left")

    def _refuse(self, reason: str, why: str) -> None:
        REJECTED.labels(reason).inc()
        raise Overloaded(f"{self.what} is overloaded: {why}; retry after {self.config.retry_after_ms} ms",
                         self.config.retry_after_ms)
