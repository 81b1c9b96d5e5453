"""A small OTLP/gRPC trace receiver: takes the spans the services export and appends each export to a file as
one JSON line, in the OpenTelemetry collector's file-exporter layout (OTLP/JSON: `resourceSpans`, hex ids), so
`python -m deploy.trace` reads either. For local debugging and the tests; a deployment runs a collector.

    python -m deploy.otlp_receiver --port 4317 --out spans.jsonl
    GATEWAY_OTLP_ENDPOINT=http://127.0.0.1:4317 python -m services.gateway ...
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import signal
import threading
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

log = logging.getLogger(__name__)
ID_FIELDS = ("traceId", "spanId", "parentSpanId")


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Appends every export to `out` (a lock keeps lines whole when exports arrive at once)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self._lock = threading.Lock()
        self.spans = 0

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
               ) -> trace_service_pb2.ExportTraceServiceResponse:
        line = json.dumps(otlp_json(request), separators=(",", ":"))
        with self._lock, self.out.open("a", encoding="utf-8") as sink:
            sink.write(line + "\n")
            self.spans += sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
        return trace_service_pb2.ExportTraceServiceResponse()


def otlp_json(request: trace_service_pb2.ExportTraceServiceRequest) -> dict[str, Any]:
    """OTLP/JSON: protobuf's JSON mapping, except that trace and span ids are hex, not base64."""
    exported = MessageToDict(request)
    for resource in exported.get("resourceSpans", []):
        for scope in resource.get("scopeSpans", []):
            for span in scope.get("spans", []):
                for key in ID_FIELDS:
                    if span.get(key):
                        span[key] = base64.b64decode(span[key]).hex()
    return exported


def start(host: str, port: int, out: Path) -> tuple[grpc.Server, int, Receiver]:
    """A running receiver and the port it bound (0: any free one)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    receiver = Receiver(out)
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    server.start()
    return server, bound, receiver


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4317)
    parser.add_argument("--out", type=Path, required=True, help="JSON lines, appended")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server, bound, receiver = start(args.host, args.port, args.out)
    log.info("OTLP/gRPC traces on %s:%d -> %s", args.host, bound, args.out)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(2).wait()
    log.info("received %d spans", receiver.spans)


if __name__ == "__main__":
    main()
