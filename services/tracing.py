"""Distributed tracing (OpenTelemetry) and structured logs for every service process.

Off by default. On when `--otlp-endpoint` (or the standard `OTEL_EXPORTER_OTLP_ENDPOINT` /
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) names an OTLP/gRPC receiver: a server span per RPC (the gRPC
instrumentation, which also reads a caller's W3C `traceparent`), the trace context sent on to the downstreams in
the gateway's calls, stage spans from the engines (common.tracing). Sampling is parent-based: a request that
arrives with a sampled parent is traced; a root is traced with probability `--trace-sample-ratio`, unless
`OTEL_TRACES_SAMPLER` (and `_ARG`) choose another sampler. Spans leave through a batch processor with a bounded
queue on its own thread: a request never waits for the exporter, and spans that find the queue full or whose
export fails are counted (`otel_spans_dropped_total`), not retried forever.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor, filters
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import OTEL_TRACES_SAMPLER, ParentBased, Sampler, TraceIdRatioBased
from prometheus_client import Counter

from common.tracing import enable as enable_stages

log = logging.getLogger(__name__)

ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
SPANS_EXPORTED = Counter("otel_spans_exported_total", "Spans this process exported to the OTLP receiver.")
SPANS_DROPPED = Counter("otel_spans_dropped_total", "Spans this process did not export: the queue was full "
                        "(queue_full) or the receiver did not take them (export_failed).", ["reason"])
# Bounds that keep tracing from costing a request: the queue caps the memory spans may hold while the receiver is
# slow or down; an export gives up after EXPORT_TIMEOUT_S (the exporter's own retries included).
MAX_QUEUE_SPANS = 4096
EXPORT_TIMEOUT_S = 5.0
EXPORT_BATCH_SPANS = 512  # the SDK's default
SHUTDOWN_TIMEOUT_S = 3.0  # at exit, after the server has drained

# Health checks (probes every few seconds, the gateway's of its downstreams) would bury the requests' traces.
NOT_HEALTH = filters.negate(filters.health_check())

_provider: TracerProvider | None = None


def otlp_endpoint(flag: str) -> str:
    """The flag's endpoint, else the standard variables' (empty: tracing off)."""
    return flag or next((os.environ[v] for v in ENDPOINT_VARIABLES if os.environ.get(v)), "")


def setup_tracing(service: str, endpoint: str, sample_ratio: float) -> bool:
    """Export this process's spans to `endpoint` (empty: tracing stays off). Returns whether it is on."""
    global _provider
    endpoint = otlp_endpoint(endpoint)
    if not endpoint or _provider is not None:
        return _provider is not None
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME") or service})
    _provider = TracerProvider(resource=resource, sampler=trace_sampler(sample_ratio))
    exporter = CountingExporter(OTLPSpanExporter(endpoint=endpoint, timeout=EXPORT_TIMEOUT_S))
    _provider.add_span_processor(CountingBatchProcessor(exporter))
    trace.set_tracer_provider(_provider)
    enable_stages()
    log.info("tracing on: spans to %s (%s)", endpoint, _provider.sampler.get_description())
    return True


def trace_sampler(ratio: float) -> Sampler | None:
    """Parent-based ratio sampling, unless OTEL_TRACES_SAMPLER names a sampler (None: the SDK reads it)."""
    if os.environ.get(OTEL_TRACES_SAMPLER):
        return None
    return ParentBased(TraceIdRatioBased(ratio))


def tracing_on() -> bool:
    return _provider is not None


def shutdown_tracing() -> None:
    """Export what is queued (bounded by the export timeout), then stop."""
    global _provider
    if _provider is not None:
        _provider.shutdown()
        _provider = None


def server_interceptors() -> list[grpc.aio.ServerInterceptor]:
    """The server span of every RPC, a child of the caller's `traceparent` when it sends one (tracing on only)."""
    return [aio_server_interceptor(filter_=NOT_HEALTH)] if tracing_on() else []


def client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """A client span per downstream call, with the trace context in its metadata (tracing on only)."""
    return list(aio_client_interceptors(filter_=NOT_HEALTH)) if tracing_on() else []


def current_ids() -> tuple[str, str] | None:
    """The current span's trace and span ids (hex), when a sampled span is current."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid or not context.trace_flags.sampled:
        return None
    return trace.format_trace_id(context.trace_id), trace.format_span_id(context.span_id)


def exemplar() -> dict[str, str] | None:
    """An OpenMetrics exemplar that leads from a histogram bucket to the sampled trace being observed."""
    ids = current_ids()
    return {"trace_id": ids[0], "span_id": ids[1]} if ids else None


class CountingExporter(SpanExporter):
    """The OTLP exporter, counting what it exported and what it could not."""

    def __init__(self, inner: SpanExporter) -> None:
        self.inner = inner

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        result = self.inner.export(spans)
        if result is SpanExportResult.SUCCESS:
            SPANS_EXPORTED.inc(len(spans))
        else:
            SPANS_DROPPED.labels("export_failed").inc(len(spans))
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


class CountingBatchProcessor(BatchSpanProcessor):
    """The SDK's batch processor (bounded queue, export on its own thread), counting the spans it drops because
    the queue is full (the SDK drops the oldest and only logs)."""

    def __init__(self, exporter: SpanExporter, max_queue_size: int = MAX_QUEUE_SPANS) -> None:
        super().__init__(exporter, max_queue_size=max_queue_size,
                         max_export_batch_size=min(max_queue_size, EXPORT_BATCH_SPANS))
        self._capacity = max_queue_size

    def on_end(self, span: ReadableSpan) -> None:
        if span.context is not None and span.context.trace_flags.sampled and self.queued() >= self._capacity:
            SPANS_DROPPED.labels("queue_full").inc()
        super().on_end(span)

    def shutdown(self) -> None:
        """Export what is queued within SHUTDOWN_TIMEOUT_S, then stop: a receiver that is down must not hold a
        process's exit past its orchestrator's grace (the SDK would wait up to 30 s)."""
        self._batch_processor.shutdown(timeout_millis=int(SHUTDOWN_TIMEOUT_S * 1000))

    def queued(self) -> int:
        # The SDK keeps its queue private (a bounded deque); the version is pinned and a test checks the count.
        return len(self._batch_processor._queue)


# ---- structured logs -----------------------------------------------------------------------------------------

class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, service, logger, message, and inside a traced request its trace
    and span ids (so a log line leads to its trace)."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname, "service": self.service, "logger": record.name,
            "message": record.getMessage()}
        ids = current_ids()
        if ids:
            entry["trace_id"], entry["span_id"] = ids
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


LOG_FORMATS = ("text", "json")


def setup_logging(service: str = "", log_format: str = "text") -> None:
    """Text (for a terminal) or JSON lines (for a log pipeline) on stderr, at INFO."""
    if log_format not in LOG_FORMATS:
        raise SystemExit(f"--log-format must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}")
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter(service))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
