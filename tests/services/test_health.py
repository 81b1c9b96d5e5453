"""The health service: Check and Watch, and a shutdown that waits for calls in flight but not for watchers."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.health import HealthServicer
from tests.conftest import ROOT, free_port

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
SLOW_CALL_S = 1.0
# Far above the time a drained server takes to stop (milliseconds) and the slow call's 1 s, far below the grace:
# a shutdown that waited for the watchers would take the whole grace.
GRACE_S = 30.0
STOPPED_WITHIN_S = 10.0


def test_check_set_and_shutdown_statuses() -> None:
    async def main() -> None:
        health = HealthServicer()
        server, port = await _server(health)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            assert (await check(health_pb2.HealthCheckRequest(service=""))).status == SERVING
            await health.set("a.v1.A", NOT_SERVING)
            assert (await check(health_pb2.HealthCheckRequest(service="a.v1.A"))).status == NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as unknown:
                await check(health_pb2.HealthCheckRequest(service="b.v1.B"))
            assert unknown.value.code() == grpc.StatusCode.NOT_FOUND and "b.v1.B" in (unknown.value.details() or "")
            await health.set("a.v1.A", SERVING)
            await health.enter_graceful_shutdown()
            await health.set("a.v1.A", SERVING)  # ignored from now on
            for service in ("", "a.v1.A"):
                assert (await check(health_pb2.HealthCheckRequest(service=service))).status == NOT_SERVING
        await server.stop(0)

    asyncio.run(main())


def test_shutdown_ends_watches_and_waits_only_for_calls_in_flight() -> None:
    """A watcher hears each change, then NOT_SERVING and the end of its stream; the server stops as soon as the
    one real call in flight has finished, not after the grace."""

    async def main() -> None:
        health = HealthServicer()
        server, port = await _server(health)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service="a.v1.A"))
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
            await health.set("a.v1.A", SERVING)
            assert (await watch.read()).status == SERVING
            call: Any = channel.unary_unary("/test.Slow/Call")  # bytes in, bytes out
            slow = asyncio.ensure_future(call(b"x", timeout=60))
            await asyncio.sleep(0.2)  # the call is in flight
            started = time.monotonic()
            await health.enter_graceful_shutdown()
            await server.stop(GRACE_S)
            stopped_s = time.monotonic() - started
            assert await slow == b"done", "the call in flight finished within the grace"
            assert (await watch.read()).status == NOT_SERVING
            assert await watch.read() is grpc.aio.EOF and await watch.code() == grpc.StatusCode.OK
        assert SLOW_CALL_S * 0.5 < stopped_s < STOPPED_WITHIN_S, stopped_s

    asyncio.run(main())


def test_a_watched_service_process_stops_without_waiting_out_its_grace() -> None:
    """The services' own serve(): SIGTERM with a Watch open (as every gateway keeps on each reranker replica)."""
    port = free_port()
    script = ("import asyncio; from services.config import ServerConfig; from services.server import Hosted, serve; "
              f"asyncio.run(serve('probe', ServerConfig(port={port}, grace_s={GRACE_S}), Hosted(services=[])))")
    process = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=60)
            replies = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""),
                                                                timeout=120)
            seen = [next(replies).status]
            while seen[-1] != SERVING:  # NOT_SERVING until the (empty) load is done
                seen.append(next(replies).status)
            started = time.monotonic()
            process.send_signal(signal.SIGTERM)
            seen += [r.status for r in replies]  # ends when the stream does
            assert process.wait(timeout=GRACE_S + 30) == 0
        assert seen[-1] == NOT_SERVING, seen
        assert time.monotonic() - started < STOPPED_WITHIN_S
    finally:
        process.kill()
        process.wait()


async def _server(health: HealthServicer) -> tuple[grpc.aio.Server, int]:
    async def slow_call(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        await asyncio.sleep(SLOW_CALL_S)
        return b"done"

    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "test.Slow", {"Call": grpc.unary_unary_rpc_method_handler(slow_call)})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port
