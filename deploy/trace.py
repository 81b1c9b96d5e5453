"""One trace as a tree, from OTLP/JSON lines: the collector's file exporter output or deploy.otlp_receiver's.

    python -m deploy.trace spans.jsonl                # the traces in the file, newest last, one line each
    python -m deploy.trace spans.jsonl --trace ID      # that trace: service, span, duration, attributes

    gateway    /retrieval.v1.SearchService/Search                    812.4 ms
      gateway    admission_wait                                        0.0 ms  queued=False
      gateway    /retrieval.v1.RetrieverService/Retrieve              41.0 ms
        retriever  /retrieval.v1.RetrieverService/Retrieve            38.2 ms
          retriever  embed                                             9.9 ms  queries=1
    ...
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KIND_NAMES = {1: "internal", 2: "server", 3: "client", 4: "producer", 5: "consumer"}


@dataclass
class Span:
    trace_id: str
    span_id: str
    parent_id: str
    name: str
    service: str
    kind: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any] = field(default_factory=dict)

    @property
    def duration_ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6


def load_spans(paths: Iterable[Path]) -> list[Span]:
    """Every span in the files (one OTLP/JSON export per line)."""
    spans: list[Span] = []
    for path in paths:
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                spans.extend(_spans_of(json.loads(line)))
    return spans


def _spans_of(export: dict[str, Any]) -> Iterator[Span]:
    for resource in export.get("resourceSpans", []):
        service = str(_attributes(resource.get("resource", {}).get("attributes", [])).get("service.name", "?"))
        for scope in resource.get("scopeSpans", []):
            for raw in scope.get("spans", []):
                yield Span(raw["traceId"], raw["spanId"], raw.get("parentSpanId", ""), raw["name"], service,
                           _kind(raw.get("kind", 1)), int(raw["startTimeUnixNano"]), int(raw["endTimeUnixNano"]),
                           _attributes(raw.get("attributes", [])))


def _kind(kind: int | str) -> str:
    """The collector writes enums as numbers, protobuf's JSON mapping as names (SPAN_KIND_SERVER)."""
    if isinstance(kind, int):
        return KIND_NAMES.get(kind, "internal")
    return kind.removeprefix("SPAN_KIND_").lower()


def _attributes(pairs: list[dict[str, Any]]) -> dict[str, Any]:
    """OTLP key/value pairs as a dict (`{"key": k, "value": {"intValue": "3"}}` -> {k: 3})."""
    out: dict[str, Any] = {}
    for pair in pairs:
        value = pair.get("value", {})
        if "intValue" in value:
            out[pair["key"]] = int(value["intValue"])
        elif value:
            out[pair["key"]] = next(iter(value.values()))
    return out


def by_trace(spans: Iterable[Span]) -> dict[str, list[Span]]:
    traces: dict[str, list[Span]] = defaultdict(list)
    for span in spans:
        traces[span.trace_id].append(span)
    return dict(traces)


def roots(spans: list[Span]) -> list[Span]:
    """Spans whose parent is not in the list (the trace's root, and orphans whose parent was not exported)."""
    ids = {s.span_id for s in spans}
    return sorted((s for s in spans if s.parent_id not in ids), key=lambda s: s.start_ns)


def children(spans: list[Span]) -> dict[str, list[Span]]:
    kids: dict[str, list[Span]] = defaultdict(list)
    for span in sorted(spans, key=lambda s: s.start_ns):
        kids[span.parent_id].append(span)
    return kids


def render(spans: list[Span]) -> list[str]:
    """The trace as indented lines: service, span name, duration, attributes (rpc.* left out)."""
    kids, lines = children(spans), []

    def walk(span: Span, depth: int) -> None:
        shown = " ".join(f"{k}={v}" for k, v in sorted(span.attributes.items()) if not k.startswith(("rpc.", "net.")))
        label = f"{'  ' * depth}{span.service:<10} {span.name}"
        lines.append(f"{label:<72} {span.duration_ms:9.1f} ms  {shown}".rstrip())
        for kid in kids.get(span.span_id, []):
            walk(kid, depth + 1)

    for root in roots(spans):
        walk(root, 0)
    return lines


def summary(traces: dict[str, list[Span]]) -> list[str]:
    """One line per trace, oldest first: id, root span, services, span count, duration."""
    lines = []
    for trace_id, spans in sorted(traces.items(), key=lambda t: min(s.start_ns for s in t[1])):
        root = roots(spans)[0]
        services = ",".join(sorted({s.service for s in spans}))
        lines.append(f"{trace_id}  {root.name:<44} {len(spans):3d} spans  {services:<28} {root.duration_ms:9.1f} ms")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spans", type=Path, nargs="+", help="OTLP/JSON lines files")
    parser.add_argument("--trace", default="", help="the trace to draw (hex id); default: list the traces")
    args = parser.parse_args(argv)
    traces = by_trace(load_spans(args.spans))
    if not args.trace:
        print("\n".join(summary(traces)))
        return
    if args.trace not in traces:
        raise SystemExit(f"trace {args.trace} is not in {', '.join(map(str, args.spans))}")
    print("\n".join(render(traces[args.trace])))


if __name__ == "__main__":
    main()
