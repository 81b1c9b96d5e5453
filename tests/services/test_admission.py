"""The gateway's admission control on its own: slots, the queue's count bound, and its time bound (the running
estimate of a request's service time against the call's deadline and --max-queue-wait-ms)."""

from __future__ import annotations

import asyncio
import time
from typing import cast

import grpc
import pytest

from services.admission import Admission, AdmissionConfig, Overloaded, ServiceTime
from services.errors import ServiceError
from services.server import DEADLINE_SLACK_S, Context


class Deadline:
    """The part of a servicer context admission reads: the seconds left before the call's deadline."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def time_remaining(self) -> float:
        return self.deadline - time.monotonic()


def call(seconds: float) -> Context:
    return cast(Context, Deadline(seconds))


async def hold(admission: Admission, context: Context | None, seconds: float) -> None:
    async with admission.admit(context):
        await asyncio.sleep(seconds)


def test_service_time_is_a_running_mean_and_predicts_by_position() -> None:
    estimate = ServiceTime(weight=0.5)
    assert estimate.expected_finish(0, 1) is None, "no estimate before the first request"
    estimate.add(1.0)
    estimate.add(2.0)
    assert estimate.seconds == pytest.approx(1.5)
    # Third in line (two ahead) behind 2 slots: three slot releases at 2 per 1.5 s, then its own 1.5 s.
    assert estimate.expected_finish(2, 2) == pytest.approx(3 * 1.5 / 2 + 1.5)


def test_the_count_bound_alone_before_any_request_has_been_timed() -> None:
    """With no estimate yet, one slot and two queued: a burst of five gets two refused at once, whatever their
    deadlines, and the three admitted all finish."""
    admission = Admission(AdmissionConfig(max_in_flight=1, max_queued=2, retry_after_ms=7), "test")

    async def burst() -> list[BaseException | None]:
        return await asyncio.gather(*[hold(admission, call(10), 0.05) for _ in range(5)], return_exceptions=True)

    outcomes = asyncio.run(burst())
    refused = [o for o in outcomes if isinstance(o, Overloaded)]
    assert outcomes.count(None) == 3 and len(refused) == 2
    assert refused[0].code == grpc.StatusCode.RESOURCE_EXHAUSTED and refused[0].trailers == (("grpc-retry-pushback-ms", "7"),)
    assert "1 requests in flight and 2 queued" in str(refused[0])


def test_a_call_that_cannot_finish_before_its_deadline_is_refused_without_waiting() -> None:
    """Requests that take 0.2 s, one slot: behind one in flight, a call would finish in about 0.4 s, so one with
    0.6 s left is refused at once (0.4 s is past half its time) and one with 2 s left is queued and served."""
    admission = Admission(AdmissionConfig(max_in_flight=1, max_queued=8), "test")
    admission.service_time.add(0.2)

    async def behind_one(seconds_left: float) -> tuple[BaseException | None, float]:
        first = asyncio.ensure_future(hold(admission, None, 0.2))
        await asyncio.sleep(0.01)
        started = time.monotonic()
        outcome = (await asyncio.gather(hold(admission, call(seconds_left), 0.01), return_exceptions=True))[0]
        waited = time.monotonic() - started
        await first
        return outcome, waited

    async def both() -> list[tuple[BaseException | None, float]]:  # one event loop: the semaphore is bound to it
        return [await behind_one(0.6), await behind_one(2.0)]

    (refused, waited), (served, _) = asyncio.run(both())
    assert isinstance(refused, Overloaded) and "would finish in about 400 ms, past 0.5 of the" in str(refused)
    assert waited < 0.1, "refused at once, not after queueing"
    assert served is None


def test_the_wait_bound_refuses_a_queue_longer_than_it_whatever_the_deadline() -> None:
    """--max-queue-wait-ms 300 with requests of 0.2 s and one slot: first in line (wait ~0.2 s) is queued,
    second in line (~0.4 s) is refused, though both have a minute left."""
    admission = Admission(AdmissionConfig(max_in_flight=1, max_queued=8, max_queue_wait_ms=300), "test")
    admission.service_time.add(0.2)

    async def three() -> list[BaseException | None]:
        first = asyncio.ensure_future(hold(admission, None, 0.2))
        await asyncio.sleep(0.01)
        second = asyncio.ensure_future(hold(admission, call(60), 0.01))
        await asyncio.sleep(0.01)
        third = (await asyncio.gather(hold(admission, call(60), 0.01), return_exceptions=True))[0]
        return [*(await asyncio.gather(first, second, return_exceptions=True)), third]

    first, second, third = asyncio.run(three())
    assert first is None and second is None
    assert isinstance(third, Overloaded) and "past the 300 ms bound" in str(third)


def test_a_queued_call_still_honours_its_deadline_when_the_estimate_was_too_hopeful() -> None:
    """The estimate says 0.05 s, the request in flight takes 1 s: a call with 0.5 s left is queued (it would
    finish in ~0.1 s), then answered DEADLINE_EXCEEDED naming the queue, before its deadline."""
    admission = Admission(AdmissionConfig(max_in_flight=1, max_queued=8), "test")
    admission.service_time.add(0.05)

    async def behind_a_slow_one() -> tuple[BaseException | None, float]:
        slow = asyncio.ensure_future(hold(admission, None, 1.0))
        await asyncio.sleep(0.01)
        started = time.monotonic()
        outcome = (await asyncio.gather(hold(admission, call(0.5), 0.01), return_exceptions=True))[0]
        waited = time.monotonic() - started
        await slow
        return outcome, waited

    late, waited = asyncio.run(behind_a_slow_one())
    assert isinstance(late, ServiceError) and late.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "queued for admission to the test" in str(late)
    assert waited < 0.5, f"gave up {DEADLINE_SLACK_S} s before the deadline"
