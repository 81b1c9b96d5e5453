"""The tracing pieces in one process: the bounded export queue and its drop count, the JSON log lines, the
sampler and endpoint settings, and reading OTLP/JSON as the collector's file exporter writes it."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased

from deploy.trace import by_trace, load_spans, render
from services.tracing import (
    SPANS_DROPPED,
    SPANS_EXPORTED,
    CountingBatchProcessor,
    CountingExporter,
    JsonFormatter,
    otlp_endpoint,
    trace_sampler,
)


class Held(SpanExporter):
    """An exporter that blocks until released: the receiver is slow."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.exported = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.release.wait(10)
        self.exported += len(spans)
        return SpanExportResult.SUCCESS


def test_a_full_queue_drops_spans_and_counts_every_one() -> None:
    """With the receiver stuck, ending spans never blocks; what the 4-span queue cannot hold is dropped and counted,
    and every span ended is either exported or counted as dropped."""
    held = Held()
    processor = CountingBatchProcessor(CountingExporter(held), max_queue_size=4)
    provider = TracerProvider()
    provider.add_span_processor(processor)
    dropped_before, exported_before = SPANS_DROPPED.labels("queue_full")._value.get(), SPANS_EXPORTED._value.get()
    tracer = provider.get_tracer("test")
    for i in range(50):
        tracer.start_span(f"s{i}").end()  # returns at once although nothing can be exported
    held.release.set()
    provider.shutdown()
    dropped = SPANS_DROPPED.labels("queue_full")._value.get() - dropped_before
    exported = SPANS_EXPORTED._value.get() - exported_before
    assert dropped >= 50 - 4 - 4  # at most the queue and one taken batch (<= the queue) got through
    assert exported == held.exported and exported + dropped == 50


def test_json_log_lines_carry_the_current_trace() -> None:
    formatter = JsonFormatter("reranker")
    record = logging.LogRecord("services.x", logging.WARNING, __file__, 1, "slow batch of %d", (3,), None)
    plain = json.loads(formatter.format(record))
    assert plain["service"] == "reranker" and plain["message"] == "slow batch of 3" and plain["level"] == "WARNING"
    assert "trace_id" not in plain
    with TracerProvider().get_tracer("test").start_as_current_span("work") as span:
        traced = json.loads(formatter.format(record))
    context = span.get_span_context()
    assert traced["trace_id"] == f"{context.trace_id:032x}" and traced["span_id"] == f"{context.span_id:016x}"


def test_settings_flag_over_standard_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_TRACES_SAMPLER", raising=False)
    assert otlp_endpoint("") == ""  # off by default
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317")
    assert otlp_endpoint("") == "http://collector:4317"
    assert otlp_endpoint("http://other:4317") == "http://other:4317"
    chosen = trace_sampler(0.25)
    assert isinstance(chosen, ParentBased) and "0.25" in chosen.get_description()
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    assert trace_sampler(0.25) is None  # the SDK reads the variable


COLLECTOR_LINE = {"resourceSpans": [{
    "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "gateway"}}]},
    "scopeSpans": [{"spans": [
        {"traceId": "ab" * 16, "spanId": "01" * 8, "name": "/retrieval.v1.SearchService/Search", "kind": 2,
         "startTimeUnixNano": "1000000", "endTimeUnixNano": "9000000"},
        {"traceId": "ab" * 16, "spanId": "02" * 8, "parentSpanId": "01" * 8, "name": "admission_wait", "kind": 1,
         "startTimeUnixNano": "1000000", "endTimeUnixNano": "1500000",
         "attributes": [{"key": "queued", "value": {"boolValue": False}},
                        {"key": "documents", "value": {"intValue": "20"}}]}]}]}]}


def test_collector_file_output_reads_as_a_tree(tmp_path: Path) -> None:
    path = tmp_path / "traces.json"
    path.write_text(json.dumps(COLLECTOR_LINE) + "\n")
    (spans,) = by_trace(load_spans([path])).values()
    assert spans[1].attributes == {"queued": False, "documents": 20}
    lines = render(spans)
    assert lines[0].split()[:3] == ["gateway", "/retrieval.v1.SearchService/Search", "8.0"]
    assert lines[1].startswith("  gateway") and "documents=20 queued=False" in lines[1]
