"""Stage spans for the engines (OpenTelemetry's API only: no exporter, no gRPC). Without a configured tracer
provider (tracing off, the default) every span is the API's no-op and costs a function call.

Attributes follow the metrics' rule: counts, sizes and names an operator chose (collections, stages); never a
query, a document's text, a key or a tenant's name.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from opentelemetry import trace
from opentelemetry.util.types import AttributeValue

TRACER = trace.get_tracer("blockrank-retrieval")


@contextmanager
def stage(name: str, **attributes: AttributeValue) -> Iterator[trace.Span]:
    """A child span of whatever span is current (a server span, or nothing: then a root that is not sampled
    unless tracing is on)."""
    with TRACER.start_as_current_span(name, attributes=attributes) as span:
        yield span


def record_stage(name: str, start_ns: int, end_ns: int, **attributes: AttributeValue) -> None:
    """A finished stage whose times were measured elsewhere (a batch's forward pass, shared by the requests in
    it): a child of the current span with those start and end times."""
    span = TRACER.start_span(name, start_time=start_ns, attributes=attributes)
    span.end(end_time=end_ns)
