"""What every service here shares: an aio server with health, reflection,
error mapping, a bounded worker pool for blocking work, readiness after a
background load, and graceful shutdown on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from services.errors import ErrorMappingInterceptor, ServiceError

log = logging.getLogger(__name__)
T = TypeVar("T")
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
GRPC_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def print_config(service: str, config: Any) -> None:
    values = ", ".join(f"{f.name}={getattr(config, f.name)!r}" for f in fields(config))
    log.info("%s config: %s", service, values)


class Worker:
    """Runs blocking engine calls off the event loop, bounded by the request deadline."""

    def __init__(self, threads: int) -> None:
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="engine")

    async def run(self, context: grpc.aio.ServicerContext | None, fn: Callable[..., T], *args: Any) -> T:
        remaining = context.time_remaining() if context is not None else None
        if remaining is not None and remaining <= 0:
            raise ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline expired before work started")
        future = asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)
        try:
            return await asyncio.wait_for(future, timeout=remaining)
        except TimeoutError:
            raise ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded while working") from None


def elapsed_ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


@dataclass
class ServiceSpec:
    """One gRPC service to host: its full name and how to add its servicer."""

    full_name: str
    register: Callable[[grpc.aio.Server], None]

    @classmethod
    def of(cls, pb2_module: Any, service: str, add_to_server: Callable[[Any, grpc.aio.Server], None],
           servicer: Any) -> ServiceSpec:
        return cls(pb2_module.DESCRIPTOR.services_by_name[service].full_name,
                   lambda server: add_to_server(servicer, server))


@dataclass
class Hosted:
    """What a service process hosts, built inside the running event loop (aio channels need it)."""

    services: list[ServiceSpec]
    load: Callable[[], None] | None = None
    after_load: Callable[[], Awaitable[None]] | None = None


def run_service(name: str, config: Any, build: Callable[[Any], Hosted]) -> None:
    """The whole life of a service process: log its config, serve until SIGTERM/SIGINT."""
    print_config(name, config)

    async def main() -> None:
        hosted = build(config)
        await serve(name=name, host=config.host, port=config.port, services=hosted.services, load=hosted.load,
                    grace_s=config.grace_s, after_load=hosted.after_load)

    asyncio.run(main())


async def serve(*, name: str, host: str, port: int, services: Sequence[ServiceSpec],
                load: Callable[[], None] | None = None, grace_s: float = 10.0,
                after_load: Callable[[], Awaitable[None]] | None = None) -> None:
    """Serve until SIGTERM/SIGINT. Health says NOT_SERVING until `load` (run in a thread)
    and then `after_load` (run on the loop) have returned."""
    server = grpc.aio.server(interceptors=[ErrorMappingInterceptor()], options=GRPC_OPTIONS)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    for spec in services:
        spec.register(server)
    names = [s.full_name for s in services]
    reflection.enable_server_reflection([*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                                         reflection.SERVICE_NAME], server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise SystemExit(f"{name}: cannot bind {host}:{port}")
    for service_name in ["", *names]:
        await health.set(service_name, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.start()
    log.info("%s listening on %s:%d", name, host, bound)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def load_then_serve() -> None:
        if load is not None:
            start = time.perf_counter()
            await asyncio.to_thread(load)
            log.info("%s loaded in %.1fs", name, time.perf_counter() - start)
        if after_load is not None:
            await after_load()
        for service_name in ["", *names]:
            await health.set(service_name, health_pb2.HealthCheckResponse.SERVING)
        log.info("%s SERVING", name)

    loader = asyncio.create_task(load_then_serve())
    waiter = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({loader, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if loader in done and loader.exception() is not None:
        log.error("%s failed to load: %s", name, loader.exception())
        await server.stop(0)
        raise SystemExit(1)
    await waiter
    log.info("%s shutting down (grace %.0fs)", name, grace_s)
    await health.enter_graceful_shutdown()
    await server.stop(grace_s)
    loader.cancel()
    log.info("%s stopped", name)
