"""Admission control: a bounded number of requests worked on at once and a bounded queue in front of them;
past both, RESOURCE_EXHAUSTED at once with a retry hint, instead of a queue that grows until every request
misses its deadline. A queued request still honours its deadline (DEADLINE_EXCEEDED naming the queue).

The hint is the trailing metadata `grpc-retry-pushback-ms`, the key gRPC's own retry policy reads.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import grpc
from prometheus_client import Counter, Gauge

from common.tracing import stage
from services.errors import ServiceError
from services.server import Context, within_deadline

RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"

IN_FLIGHT = Gauge("admission_in_flight", "Requests admitted and being worked on.")
QUEUED = Gauge("admission_queued", "Requests waiting for admission.")
REJECTED = Counter("admission_rejected_total", "Requests refused because both the work slots and the queue were full.")


@dataclass(frozen=True)
class AdmissionConfig:
    max_in_flight: int = 32  # requests worked on at once; 0: no limit
    max_queued: int = 64  # requests waiting for a slot; beyond it RESOURCE_EXHAUSTED at once
    retry_after_ms: int = 100  # the retry hint sent with a refusal


class Overloaded(ServiceError):
    """RESOURCE_EXHAUSTED with a retry hint in the trailing metadata."""

    def __init__(self, message: str, retry_after_ms: int) -> None:
        super().__init__(grpc.StatusCode.RESOURCE_EXHAUSTED, message)
        self.trailers = ((RETRY_PUSHBACK_KEY, str(retry_after_ms)),)


class Admission:
    """One per service process, used from its event loop."""

    def __init__(self, config: AdmissionConfig, what: str) -> None:
        self.config = config
        self.what = what
        self._slots = asyncio.Semaphore(config.max_in_flight) if config.max_in_flight > 0 else None
        self._queued = 0

    @asynccontextmanager
    async def admit(self, context: Context | None) -> AsyncIterator[None]:
        if self._slots is None:
            yield
            return
        with stage("admission_wait", queued=self._slots.locked()):
            await self._acquire(context)
        IN_FLIGHT.inc()
        try:
            yield
        finally:
            IN_FLIGHT.dec()
            self._slots.release()

    async def _acquire(self, context: Context | None) -> None:
        """A slot: at once, after waiting in the queue, or RESOURCE_EXHAUSTED when the queue is full too."""
        assert self._slots is not None
        if self._slots.locked():
            if self._queued >= self.config.max_queued:
                REJECTED.inc()
                raise Overloaded(f"{self.what} is overloaded: {self.config.max_in_flight} requests in flight and "
                                 f"{self._queued} queued; retry after {self.config.retry_after_ms} ms",
                                 self.config.retry_after_ms)
            self._queued += 1
            QUEUED.inc()
            try:
                await within_deadline(context, self._slots.acquire(), f"queued for admission to the {self.what}")
            finally:
                self._queued -= 1
                QUEUED.dec()
        else:
            await self._slots.acquire()
