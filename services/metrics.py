"""Prometheus metrics of every service process (prometheus-client), served on `--metrics-port` (0: off).

Conventions (https://prometheus.io/docs/practices/naming/): base units (`_seconds`, `_bytes`), counters end in
`_total`, labels bounded (RPC names, status codes, pipeline stages, collection names; never a query, a document
or a tenant name a client can invent). The RPC metrics use the names of go-grpc-prometheus / py-grpc-prometheus,
so existing dashboards read them. Engines know nothing of Prometheus: what they count is read at scrape time
through `EngineCollector`, and per-event figures (latencies, batch sizes) are observed here in services/.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc
from prometheus_client import Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector

from services.errors import rewrapped
from services.tracing import exemplar

log = logging.getLogger(__name__)

# Seconds: from a sub-millisecond BM25 lookup to a 500-document CPU rerank.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)  # requests per batch, documents per request
TOKEN_BUCKETS = (256, 1024, 4096, 8192, 16384, 32768, 65536, 131072)  # prompt tokens per forward

_RPC = ["grpc_service", "grpc_method"]
RPC_STARTED = Counter("grpc_server_started_total", "RPCs started on the server.", _RPC)
RPC_HANDLED = Counter("grpc_server_handled_total", "RPCs completed on the server, by status code.",
                      [*_RPC, "grpc_code"])
RPC_SECONDS = Histogram("grpc_server_handling_seconds", "Time from an RPC's arrival to its answer.", _RPC,
                        buckets=LATENCY_BUCKETS)

Families = Iterable[CounterMetricFamily | GaugeMetricFamily]


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts and times every unary RPC by service, method and final status code (the outermost interceptor,
    so the code is the one the caller gets)."""

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        service, _, method = handler_call_details.method.strip("/").rpartition("/")
        behavior = handler.unary_unary

        async def measured(request: Any, context: grpc.aio.ServicerContext) -> Any:
            RPC_STARTED.labels(service, method).inc()
            start = time.perf_counter()
            code = grpc.StatusCode.UNKNOWN
            try:
                response = await behavior(request, context)
                code = _code_of(context)  # OK, or the status the error mapping set (services.errors)
                return response
            except grpc.aio.AbortError:
                code = _code_of(context)
                raise
            except BaseException:  # cancelled by the client, or an error the mapping did not see
                code = grpc.StatusCode.CANCELLED if context.cancelled() else grpc.StatusCode.UNKNOWN
                raise
            finally:
                RPC_HANDLED.labels(service, method, code.name).inc()
                # The sampled trace's id rides along (OpenMetrics exemplar): a slow bucket leads to a trace.
                RPC_SECONDS.labels(service, method).observe(time.perf_counter() - start, exemplar())

        return rewrapped(handler, measured)


def _code_of(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    code = context.code()
    if code is None:  # never set: the handler returned normally
        return grpc.StatusCode.OK
    if isinstance(code, grpc.StatusCode):
        return code
    return next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)


class EngineCollector(Collector):
    """Metrics read from an engine at scrape time: `collect_fn` returns metric families, or nothing while the
    engine is still loading."""

    def __init__(self, collect_fn: Callable[[], Families]) -> None:
        self.collect_fn = collect_fn

    def collect(self) -> Families:
        try:
            yield from self.collect_fn()
        except Exception:  # noqa: BLE001 - a scrape must not fail because an engine is mid-change
            log.exception("collecting engine metrics failed")


def register_engine(collect_fn: Callable[[], Families]) -> None:
    REGISTRY.register(EngineCollector(collect_fn))


def gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def start_metrics_server(host: str, port: int) -> int:
    """Serve /metrics (0: off). Returns the port bound."""
    if port <= 0:
        return 0
    server, _ = start_http_server(port, addr=host)
    bound = int(server.server_address[1])
    log.info("metrics on http://%s:%d/metrics", host, bound)
    return bound
