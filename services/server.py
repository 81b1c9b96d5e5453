"""What every service here shares: an aio server with health, reflection,
error mapping, Prometheus metrics, TLS or mutual TLS (reloaded on SIGHUP), a bounded worker pool for blocking work,
readiness after a background load (and, for the gateway, while its
downstreams serve), deadlines honoured, and graceful shutdown on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from common.allocator import keep_freed_memory, limit_malloc_arenas
from services.auth import AuthInterceptor
from services.config import ServerConfig, describe
from services.errors import ErrorMappingInterceptor, ServiceError
from services.health import HealthServicer
from services.keys import KeysFile
from services.limits import MAX_MESSAGE_BYTES, ValidationInterceptor
from services.metrics import MetricsInterceptor, start_metrics_server
from services.tls import ServerTls, server_tls
from services.tracing import server_interceptors, setup_logging, setup_tracing, shutdown_tracing

log = logging.getLogger(__name__)
T = TypeVar("T")
Context = grpc.aio.ServicerContext[Any, Any]
GRPC_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
# A server gives up this long before the caller's deadline, so its DEADLINE_EXCEEDED (saying which stage
# ran out of time) reaches the caller before the caller's own timer fires with a bare "Deadline Exceeded".
DEADLINE_SLACK_S = 0.05
HEALTH_PROBE_S = 2.0
# The health service name that says only that the process runs and its event loop answers (a liveness probe's):
# SERVING from start-up, while the models load and while downstreams are down (which readiness, "", reflects).
LIVENESS_SERVICE = "liveness"


def time_budget(context: Context | None) -> float | None:
    """Seconds left for work on this call (None: no deadline); DEADLINE_EXCEEDED when none is left."""
    remaining = context.time_remaining() if context is not None else None
    if remaining is None:
        return None
    budget = remaining - DEADLINE_SLACK_S
    if budget <= 0:
        raise ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline expired before work started")
    return budget


async def within_deadline(context: Context | None, awaitable: Awaitable[T], stage: str) -> T:
    """Await `awaitable`, answering DEADLINE_EXCEEDED (naming the stage) when the call's time runs out."""
    try:
        return await asyncio.wait_for(awaitable, timeout=time_budget(context))
    except TimeoutError:
        raise ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, f"deadline exceeded while {stage}") from None


class Worker:
    """Runs blocking engine calls off the event loop, bounded by the request deadline."""

    def __init__(self, threads: int, name: str = "engine") -> None:
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)

    async def run(self, context: Context | None, fn: Callable[..., T], *args: Any) -> T:
        # In the caller's context: the engine's stage spans are children of this call's span.
        future = asyncio.get_running_loop().run_in_executor(self.pool, contextvars.copy_context().run, fn, *args)
        return await within_deadline(context, future, "working")

    def stop(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def elapsed_ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


class ServicerAdder(Protocol):
    def __call__(self, servicer: Any, server: grpc.aio.Server) -> None: ...


@dataclass
class ServiceSpec:
    """One gRPC service to host: its full name and how to add its servicer."""

    full_name: str
    register: Callable[[grpc.aio.Server], None]

    @classmethod
    def of(cls, pb2_module: Any, service: str, add_to_server: ServicerAdder, servicer: Any) -> ServiceSpec:
        return cls(pb2_module.DESCRIPTOR.services_by_name[service].full_name,
                   lambda server: add_to_server(servicer, server))


@dataclass
class Hosted:
    """What a service process hosts, built inside the running event loop (aio channels need it).
    `load` runs in a thread before the process reports SERVING, then `after_load` on the loop;
    `on_stop` runs on the loop after the server has drained (engines stop their workers there)."""

    services: list[ServiceSpec]
    load: Callable[[], None] | None = None
    after_load: Callable[[], Awaitable[None]] | None = None
    on_stop: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    # Full method names only an admin key may call when authentication is on (services.auth).
    admin_methods: list[str] = field(default_factory=list)
    # After loading, polled every HEALTH_PROBE_S: health says SERVING only while it returns True (a gateway
    # whose downstreams cannot serve is not serving either).
    health_probe: Callable[[], Awaitable[bool]] | None = None


class HasServer(Protocol):
    @property
    def server(self) -> ServerConfig: ...


S = TypeVar("S", bound=HasServer)


def run_service(name: str, config: S, build: Callable[[S], Hosted]) -> None:
    """The whole life of a service process: log its config (secrets masked), serve until SIGTERM/SIGINT."""
    setup_logging(name, config.server.log_format)
    limit_malloc_arenas(config.server.malloc_arenas)  # before the server, the engines and their threads start
    keep_freed_memory(config.server.malloc_keep_mb)
    log.info("%s config: %s", name, describe(config))
    setup_tracing(name, config.server.otlp_endpoint, config.server.trace_sample_ratio)

    async def main() -> None:
        await serve(name, config.server, build(config))

    asyncio.run(main())


async def serve(name: str, config: ServerConfig, hosted: Hosted) -> None:
    """Serve until SIGTERM/SIGINT. Health says NOT_SERVING until `hosted.load` and `after_load` have
    returned (and then follows `hosted.health_probe` when there is one); on shutdown, NOT_SERVING again,
    in-flight calls get `grace_s`, then `on_stop` runs."""
    # Tracing outermost (its server span covers the whole call and is current for the rest); then metrics: the
    # status code it counts is the one the error mapping settled on; then authentication, then the input limits
    # (services.limits), both inside the error mapping.
    interceptors = [*server_interceptors(), MetricsInterceptor(), ErrorMappingInterceptor(),
                    *_authentication(config, hosted), ValidationInterceptor()]
    server = grpc.aio.server(interceptors=interceptors, options=GRPC_OPTIONS)
    health = HealthServicer()
    names = _register(server, health, hosted.services)
    tls = server_tls(config.tls_cert, config.tls_key, config.tls_client_ca)
    address = f"{config.host}:{config.port}"
    bound = server.add_secure_port(address, tls.credentials()) if tls else server.add_insecure_port(address)
    if bound == 0:
        raise SystemExit(f"{name}: cannot bind {config.host}:{config.port}")
    await _set_health(health, names, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.start()
    await health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    log.info("%s listening on %s:%d (%s)", name, config.host, bound,
             "plaintext" if tls is None else "mutual TLS" if tls.mutual else "TLS")
    probes = await _health_only_server(name, config, health)
    start_metrics_server(config.host, config.metrics_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if tls is not None:
        loop.add_signal_handler(signal.SIGHUP, _reload_on_hup(name, tls))
    loader = asyncio.create_task(_load_then_serve(name, hosted, health, names))
    waiter = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({loader, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if loader in done and loader.exception() is not None:
        log.error("%s failed to load: %s", name, loader.exception())
        await server.stop(0)
        raise SystemExit(1)
    await waiter
    log.info("%s shutting down (grace %.0fs)", name, config.grace_s)
    await health.enter_graceful_shutdown()
    await server.stop(config.grace_s)
    if probes is not None:
        await probes.stop(0)
    loader.cancel()
    for hook in hosted.on_stop:
        await hook()
    await asyncio.to_thread(shutdown_tracing)  # the spans still queued, within the export timeout
    log.info("%s stopped", name)


def _authentication(config: ServerConfig, hosted: Hosted) -> list[grpc.aio.ServerInterceptor]:
    forwarders = [n.strip() for n in config.trusted_forwarders.split(",") if n.strip()]
    if forwarders and not config.tls_client_ca:
        raise SystemExit("--trusted-forwarders needs --tls-client-ca (a forwarder is known by its certificate)")
    if not config.keys_file:
        return []
    return [AuthInterceptor(KeysFile(config.keys_file), hosted.admin_methods, forwarders)]


def _reload_on_hup(name: str, tls: ServerTls) -> Callable[[], None]:
    def reload() -> None:
        log.info("%s: SIGHUP, TLS files are read again at the next handshake", name)
        tls.request_reload()
    return reload


async def _health_only_server(name: str, config: ServerConfig, health: HealthServicer) -> grpc.aio.Server | None:
    """The same health statuses on a plaintext port of their own (--health-port), nothing else: a probe without
    a client certificate can read them while the service port demands one."""
    if config.health_port <= 0:
        return None
    probes = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health, probes)
    if probes.add_insecure_port(f"{config.host}:{config.health_port}") == 0:
        raise SystemExit(f"{name}: cannot bind {config.host}:{config.health_port} (--health-port)")
    await probes.start()
    log.info("%s health on %s:%d (plaintext, health service only)", name, config.host, config.health_port)
    return probes


def _register(server: grpc.aio.Server, health: HealthServicer, services: Sequence[ServiceSpec]) -> list[str]:
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    for spec in services:
        spec.register(server)
    names = [s.full_name for s in services]
    reflection.enable_server_reflection([*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                                         reflection.SERVICE_NAME], server)
    return names


async def _set_health(health: HealthServicer, names: Sequence[str], status: Any) -> None:
    for service_name in ["", *names]:
        await health.set(service_name, status)


async def _load_then_serve(name: str, hosted: Hosted, health: HealthServicer, names: Sequence[str]) -> None:
    if hosted.load is not None:
        start = time.perf_counter()
        await asyncio.to_thread(hosted.load)
        log.info("%s loaded in %.1fs", name, time.perf_counter() - start)
    if hosted.after_load is not None:
        await hosted.after_load()
    if hosted.health_probe is None:
        await _set_health(health, names, health_pb2.HealthCheckResponse.SERVING)
        log.info("%s SERVING", name)
        return
    serving: bool | None = None
    while True:  # cancelled at shutdown, with the loader task
        now = await hosted.health_probe()
        if now != serving:
            status = health_pb2.HealthCheckResponse.SERVING if now else health_pb2.HealthCheckResponse.NOT_SERVING
            await _set_health(health, names, status)
            log.info("%s %s", name, "SERVING" if now else "NOT_SERVING (its downstreams cannot serve)")
            serving = now
        await asyncio.sleep(HEALTH_PROBE_S)
