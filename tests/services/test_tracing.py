"""Tracing through live services: one Search followed across the gateway, the retriever and the reranker into a
real OTLP/gRPC receiver (deploy.otlp_receiver) on 127.0.0.1; a receiver that is down costs no request."""

from __future__ import annotations

import json
import secrets
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.otlp_receiver import start as start_receiver
from deploy.trace import Span, by_trace, children, load_spans, render, roots
from services.gen.retrieval.v1 import search_pb2, search_pb2_grpc
from services.run import RERANK_BY_DEFAULT
from tests.conftest import Server, fixture_documents, free_port, ingest_fixture
from tests.services.live_stack import scrape, value

pytestmark = pytest.mark.integration

QUERY = "what makes kittens purr"
SEARCH = "/retrieval.v1.SearchService/Search"
RETRIEVE = "/retrieval.v1.RetrieverService/Retrieve"
RERANK = "/retrieval.v1.RerankerService/Rerank"
RETRIEVER_STAGES = {"embed", "dense_search", "lexical_search", "fusion", "fetch_texts"}
RERANKER_STAGES = {"build_prompt", "reranker_queue_wait", "forward_pass", "ranking"}
# Spans leave a process in batches: every 100 ms here (the SDK's default is 5 s).
FAST_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "100"}


@pytest.fixture(scope="module")
def traced(tmp_path_factory) -> Iterator[tuple[Path, Server, dict[str, int]]]:
    """A receiver, and the three services exporting to it; the gateway logs JSON lines."""
    tmp = tmp_path_factory.mktemp("traced")
    out = tmp / "spans.jsonl"
    receiver, port, _ = start_receiver("127.0.0.1", 0, out)
    env = {**FAST_EXPORT, "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}"}
    ports = {name: free_port() for name in ("retriever", "reranker", "gateway")}
    retriever = Server("services.retriever", ["--data-dir", str(tmp / "data"), "--metrics-port",
                                              str(ports["retriever"])], log_path=tmp / "retriever.log", env=env)
    reranker = Server("services.reranker", ["--block-tokens", "64", "--metrics-port", str(ports["reranker"]),
                                            *RERANK_BY_DEFAULT], log_path=tmp / "reranker.log", env=env)
    started = [retriever.start(), reranker.start()]
    ingest_fixture(retriever.target)
    gateway = Server("services.gateway", ["--retriever-target", retriever.target, "--reranker-target",
                                          reranker.target, "--metrics-port", str(ports["gateway"]),
                                          "--log-format", "json"], log_path=tmp / "gateway.log", env=env)
    started.append(gateway.start())
    try:
        yield out, gateway, ports
    finally:
        for server in started:
            server.stop()
        receiver.stop(1)


def search(gateway: Server, metadata: tuple[tuple[str, str], ...] = ()) -> search_pb2.SearchResponse:
    stub = search_pb2_grpc.SearchServiceStub(gateway.channel())
    return stub.Search(search_pb2.SearchRequest(collection="c", query=QUERY, top_k=3, rerank_depth=4),
                       timeout=120, metadata=metadata)


def wait_for_trace(out: Path, trace_id: str, services: set[str], timeout: float = 30.0) -> list[Span]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        spans = by_trace(load_spans([out])).get(trace_id, []) if out.exists() else []
        if services <= {s.service for s in spans} and RERANKER_STAGES <= {s.name for s in spans}:
            return spans
        time.sleep(0.2)
    raise AssertionError(f"trace {trace_id} did not reach the receiver from {services} in {timeout}s")


def test_one_search_is_one_connected_trace_across_the_three_services(traced) -> None:
    out, gateway, ports = traced
    trace_id, caller_span = secrets.token_hex(16), secrets.token_hex(8)
    response = search(gateway, (("traceparent", f"00-{trace_id}-{caller_span}-01"),))
    assert response.reranked and len(response.results) == 3
    spans = wait_for_trace(out, trace_id, {"gateway", "retriever", "reranker"})

    # One tree: the gateway's server span is the child of the caller's span and the root of everything else.
    (root,) = roots(spans)
    assert (root.service, root.name, root.kind, root.parent_id) == ("gateway", SEARCH, "server", caller_span)
    below = descendants(spans, root)
    assert {s.span_id for s in below} | {root.span_id} == {s.span_id for s in spans}
    servers = {(s.service, s.name) for s in spans if s.kind == "server"}
    assert {("retriever", RETRIEVE), ("reranker", RERANK)} <= servers
    assert {"admission_wait"} <= names_in(spans, "gateway")
    assert RETRIEVER_STAGES <= names_in(spans, "retriever")
    assert RERANKER_STAGES <= names_in(spans, "reranker")

    # Plausible times: every span inside its parent, the forward pass inside the reranker's server span.
    by_id = {s.span_id: s for s in spans}
    for span in below:
        parent = by_id[span.parent_id]
        assert parent.start_ns <= span.start_ns and span.end_ns <= parent.end_ns + 1_000_000, (span.name, parent.name)
    (rerank,) = [s for s in spans if s.service == "reranker" and s.name == RERANK]
    (forward,) = [s for s in spans if s.name == "forward_pass"]
    assert rerank.start_ns <= forward.start_ns < forward.end_ns <= rerank.end_ns
    assert forward.attributes["documents"] == 4 and forward.attributes["batch_requests"] >= 1
    assert forward.attributes["tokens"] > 4 * 8

    # No query, no document text anywhere in a span (the metrics labels' rule).
    texts = [QUERY, *(d.text[:40] for d in fixture_documents())]
    values = [str(v) for s in spans for v in s.attributes.values()]
    assert not [v for v in values for t in texts if t in v]
    assert render(spans)[0].split()[:2] == ["gateway", SEARCH]

    # The latency histogram carries this trace as an exemplar (OpenMetrics): a slow bucket leads to it.
    assert f'trace_id="{trace_id}"' in openmetrics(ports["gateway"])


def test_logs_are_json_lines_with_the_service_named(traced) -> None:
    out, gateway, _ = traced
    assert gateway.log_path is not None
    lines = [json.loads(line) for line in gateway.log_path.read_text().splitlines() if line.startswith("{")]
    assert lines and all({"time", "level", "service", "logger", "message"} <= set(line) for line in lines)
    assert {line["service"] for line in lines} == {"gateway"}
    assert any("tracing on" in line["message"] for line in lines)


def test_searches_succeed_while_the_receiver_is_down(traced, server_factory) -> None:
    """A gateway whose receiver is gone: every Search answers, and the spans it could not export are counted."""
    _, gateway, _ = traced
    dead, metrics = free_port(), free_port()
    downstream = [a for pair in zip(("--retriever-target", "--reranker-target"),
                                    gateway.args[1:4:2], strict=True) for a in pair]
    orphan = server_factory("services.gateway", [*downstream, "--metrics-port", str(metrics)],
                            env={**FAST_EXPORT, "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{dead}"}).start()
    for _ in range(3):
        assert search(orphan).reranked
    deadline = time.monotonic() + 30  # the exporter gives up on a batch after its 5 s timeout
    while time.monotonic() < deadline:
        failed = scrape(metrics).get(("otel_spans_dropped_total", (("reason", "export_failed"),)), 0.0)
        if failed > 0:
            break
        time.sleep(0.5)
    samples = scrape(metrics)
    assert value(samples, "otel_spans_dropped_total", reason="export_failed") > 0
    assert value(samples, "otel_spans_exported_total") == 0
    # Nor does it hold the exit: the queued spans get SHUTDOWN_TIMEOUT_S (3 s), then the process ends; the bound
    # leaves room for the drain (nothing in flight), the channels' close and a slow core.
    started = time.monotonic()
    search(orphan)  # a batch of spans queued again
    assert orphan.stop() == 0 and time.monotonic() - started < 12


def descendants(spans: list[Span], root: Span) -> list[Span]:
    kids, found, todo = children(spans), [], [root]
    while todo:
        for kid in kids.get(todo.pop().span_id, []):
            found.append(kid)
            todo.append(kid)
    return found


def names_in(spans: list[Span], service: str) -> set[str]:
    return {s.name for s in spans if s.service == service}


def openmetrics(port: int) -> str:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics",
                                     headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    with urllib.request.urlopen(request, timeout=10) as reply:
        return str(reply.read().decode())
