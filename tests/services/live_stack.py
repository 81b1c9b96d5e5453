"""A live retriever, reranker and gateway on 127.0.0.1 with their metrics ports, and reading those metrics: the
stack the operations and reranking-path tests share (one per test module)."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.run import RERANK_BY_DEFAULT
from tests.conftest import Server, free_port, ingest_fixture


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics page: (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def reranks_answered(metrics_port: int) -> float:
    """Rerank calls a reranker answered OK (no series before the first)."""
    labels = {"grpc_code": "OK", "grpc_method": "Rerank", "grpc_service": "retrieval.v1.RerankerService"}
    return scrape(metrics_port).get(("grpc_server_handled_total", tuple(sorted(labels.items()))), 0.0)


@dataclass
class Stack:
    retriever: Server
    reranker: Server
    gateway: Server
    ports: dict[str, int]  # metrics ports


@pytest.fixture(scope="module", name="stack")
def stack_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Import it into a test module to use `stack` there (each module starts its own)."""
    tmp = tmp_path_factory.mktemp("stack")
    ports = {name: free_port() for name in ("retriever", "reranker", "gateway")}
    retriever = Server("services.retriever", ["--data-dir", str(tmp / "data"), "--metrics-port",
                                              str(ports["retriever"])], log_path=tmp / "retriever.log").start()
    ingest_fixture(retriever.target)
    reranker = Server("services.reranker", ["--block-tokens", "64", "--metrics-port", str(ports["reranker"]),
                                            *RERANK_BY_DEFAULT],
                      log_path=tmp / "reranker.log").start()
    gateway = Server("services.gateway", ["--retriever-target", retriever.target, "--reranker-target",
                                          reranker.target, "--metrics-port", str(ports["gateway"])],
                     log_path=tmp / "gateway.log").start()
    yield Stack(retriever, reranker, gateway, ports)
    for server in (gateway, reranker, retriever):
        server.stop()
