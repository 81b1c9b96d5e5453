"""What one request is: real queries (and documents) from a BEIR directory, as Search or Rerank calls."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import grpc
from google.protobuf.message import Message

from common.beir import iter_corpus, load_queries
from deploy.loadtest.target import LoadTestError
from services.convert import document_to_pb
from services.gen.retrieval.v1 import (
    document_pb2,
    reranker_pb2,
    reranker_pb2_grpc,
    search_pb2,
    search_pb2_grpc,
)

SEARCH_TIMINGS = ("retrieve_ms", "rerank_ms", "total_ms")
RERANK_TIMINGS = ("queue_ms", "model_ms", "total_ms")


@dataclasses.dataclass(frozen=True)
class Workload:
    """What one request is: the RPC to call, how to build request i, which server timings to average."""

    name: str
    rpc: Callable[..., Awaitable[Message]]
    make_request: Callable[[int], Message]
    timing_fields: tuple[str, ...]


def read_queries(path: Path, limit: int = 0) -> list[str]:
    """Query texts from a BEIR directory (or its queries.jsonl), in file order."""
    data_dir = _beir_dir(path, "queries.jsonl")
    texts = [q for q in load_queries(data_dir).values() if q.strip()]
    if not texts:
        raise LoadTestError(f"no queries in {data_dir / 'queries.jsonl'}")
    return texts[:limit] if limit > 0 else texts


def read_documents(path: Path, count: int) -> list[document_pb2.Document]:
    """The first `count` documents of a BEIR corpus.jsonl."""
    data_dir = _beir_dir(path, "corpus.jsonl")
    docs = [document_to_pb(d) for d in itertools.islice(iter_corpus(data_dir), count)]
    if not docs:
        raise LoadTestError(f"no documents in {data_dir / 'corpus.jsonl'}")
    return docs


def _beir_dir(path: Path, file_name: str) -> Path:
    if path.is_file():
        if path.name != file_name:
            raise LoadTestError(f"{path}: expected a BEIR directory or its {file_name}")
        return path.parent
    if not (path / file_name).is_file():
        raise LoadTestError(f"{path / file_name} not found")
    return path


def search_workload(channel: grpc.aio.Channel, queries: Sequence[str], collection: str, top_k: int,
                    rerank_depth: int, tenants: Sequence[str] = ("",)) -> Workload:
    stub = search_pb2_grpc.SearchServiceStub(channel)

    def make(i: int) -> search_pb2.SearchRequest:
        return search_pb2.SearchRequest(collection=collection, query=queries[i % len(queries)], top_k=top_k,
                                        rerank_depth=rerank_depth, tenant=tenants[i % len(tenants)])

    return Workload("search", stub.Search, make, SEARCH_TIMINGS)


def rerank_workload(channel: grpc.aio.Channel, queries: Sequence[str], documents: Sequence[document_pb2.Document],
                    docs_per_request: int, tenants: Sequence[str] = ("",)) -> Workload:
    """Request i reranks a window of `docs_per_request` documents that rotates through `documents`;
    requests cycle through `tenants` (a mixed-tenant stream when there are several)."""
    stub = reranker_pb2_grpc.RerankerServiceStub(channel)
    n = len(documents)

    def make(i: int) -> reranker_pb2.RerankRequest:
        start = (i * docs_per_request) % n
        window = [documents[(start + j) % n] for j in range(min(docs_per_request, n))]
        return reranker_pb2.RerankRequest(query=queries[i % len(queries)], documents=window,
                                          tenant=tenants[i % len(tenants)])

    return Workload("reranker", stub.Rerank, make, RERANK_TIMINGS)
