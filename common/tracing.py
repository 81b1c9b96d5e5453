"""Stage spans for the engines (OpenTelemetry's API only: no exporter, no gRPC). Until the process turns
tracing on (services.tracing calls `enable`), a stage is a shared do-nothing context manager: the API's own no-op
span costs ~17 us on a slow core (context attach and detach), which a Search would pay for every stage.

Attributes follow the metrics' rule: counts, sizes and names an operator chose (collections, stages); never a
query, a document's text, a key or a tenant's name.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

from opentelemetry import trace
from opentelemetry.util.types import AttributeValue

TRACER = trace.get_tracer("blockrank-retrieval")
_OFF: AbstractContextManager[Any] = nullcontext()
_enabled = False


def enable() -> None:
    """Stages become spans from now on (called once, when the process's tracer provider is set)."""
    global _enabled
    _enabled = True


def stage(name: str, **attributes: AttributeValue) -> AbstractContextManager[Any]:
    """A child span of whatever span is current, while it runs (tracing on); nothing otherwise."""
    if not _enabled:
        return _OFF
    return TRACER.start_as_current_span(name, attributes=attributes, record_exception=False)


def record_stage(name: str, start_ns: int, end_ns: int, **attributes: AttributeValue) -> None:
    """A finished stage whose times were measured elsewhere (a batch's forward pass, shared by the requests in
    it): a child of the current span with those start and end times."""
    if not _enabled:
        return
    span = TRACER.start_span(name, start_time=start_ns, attributes=attributes)
    span.end(end_time=end_ns)
