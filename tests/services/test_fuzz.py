"""Property-based fuzzing of live servers (hypothesis): malformed, oversized, random-unicode and boundary requests
to every public RPC of a retriever, a reranker and a gateway on 127.0.0.1. Every answer must be one of the codes
the API promises for bad input (never INTERNAL, UNKNOWN, UNAVAILABLE: a crash), the servers keep serving, and
their resident memory stays flat after a warm-up.

    FUZZ_EXAMPLES=10000 python -m pytest tests/services/test_fuzz.py -q -s      # make fuzz
The suite runs FUZZ_EXAMPLES=300 (the default; its memory figures are printed, not bounded: too short a run).
The figures go to FUZZ_REPORT (a JSON file) when it is set.
"""

from __future__ import annotations

import collections
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.gen.retrieval.v1 import (
    adapter_pb2,
    adapter_pb2_grpc,
    document_pb2,
    reranker_pb2,
    reranker_pb2_grpc,
    retriever_pb2,
    retriever_pb2_grpc,
    search_pb2,
    search_pb2_grpc,
)
from services.limits import MAX_DOCUMENT_BYTES, MAX_QUERY_CHARS
from services.server import GRPC_OPTIONS
from tests.conftest import Server

pytestmark = [pytest.mark.integration, pytest.mark.slow]
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))
WARMUP_FRACTION = 0.3  # RSS is measured after this share of the requests, and again at the end
MAX_RSS_GROWTH = 0.10
RSS_CHECK_EXAMPLES = 2000  # the memory bound is checked on runs at least this long (make fuzz)
Code = grpc.StatusCode
# What bad input may get: refused (INVALID_ARGUMENT), a name that is not there, already there (create), or
# capacity (a queue full). Anything else, INTERNAL above all, is a bug.
EXPECTED = {Code.OK, Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.ALREADY_EXISTS, Code.RESOURCE_EXHAUSTED}
COLLECTIONS = ["fz", "fz2", "missing"]  # a few names, so valid writes stay small (each write rewrites one)

# ---- strategies ------------------------------------------------------------------------------------------

unicode = st.text(st.characters(exclude_categories=["Cs"]), max_size=64)  # protobuf strings: no surrogates
edges = st.sampled_from(["", " ", "\x00", "..", "../../etc/passwd", "a" * 129, "é", "\u202e", "🦀", "a b", "A.b"])
huge = st.sampled_from([1, MAX_QUERY_CHARS, MAX_QUERY_CHARS + 1, MAX_DOCUMENT_BYTES + 1]).map(lambda n: "x" * n)
strings = st.one_of(unicode, edges, huge.filter(lambda _: True))
names = st.one_of(st.sampled_from(COLLECTIONS), edges, unicode)
ints = st.one_of(st.integers(-3, 1002), st.sampled_from([0, 1, 1000, 1001, 2**31 - 1, -(2**31)]))
enums = st.integers(-2, 6)
metadata = st.dictionaries(st.one_of(unicode, st.sampled_from(["k", "source:url"])), strings, max_size=3)
ids = st.one_of(st.sampled_from(["d1", "d2", "d3", "d4"]), edges, unicode)
documents = st.lists(st.builds(document_pb2.Document, id=ids, title=strings, text=strings, metadata=metadata),
                     max_size=4)


@dataclass
class Target:
    name: str
    call: Callable[..., object]  # a stub's method: call(request, timeout=...)
    request: st.SearchStrategy


# ---- the stack -------------------------------------------------------------------------------------------


@dataclass
class Stack:
    servers: list[Server]
    targets: list[Target]
    codes: collections.Counter = field(default_factory=collections.Counter)
    sent: int = 0
    rss_after_warmup: dict[str, int] = field(default_factory=dict)
    rss_course: list[dict[str, float]] = field(default_factory=list)  # MB, every tenth of the run


def rss_bytes(server: Server) -> int:
    assert server.popen is not None
    for line in Path(f"/proc/{server.popen.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("fuzz")
    retriever = Server("services.retriever", ["--data-dir", str(tmp / "data")], log_path=tmp / "retriever.log")
    reranker = Server("services.reranker", ["--max-documents", "4", "--max-document-tokens", "64"],
                      log_path=tmp / "reranker.log")
    servers = [retriever.start(wait=False), reranker.start(wait=False)]
    try:
        for s in servers:
            s.wait_serving()
        gateway = Server("services.gateway", ["--retriever-target", retriever.target, "--reranker-target",
                                              reranker.target], log_path=tmp / "gateway.log").start()
        servers.append(gateway)
        channels = {s.module: grpc.insecure_channel(s.target, options=GRPC_OPTIONS) for s in servers}
        r = retriever_pb2_grpc.RetrieverServiceStub(channels["services.retriever"])
        r.CreateCollection(retriever_pb2.CreateCollectionRequest(collection="fz"), timeout=30)
        r.UpsertDocuments(retriever_pb2.UpsertDocumentsRequest(collection="fz", documents=[
            document_pb2.Document(id="d1", text="kittens purr"), document_pb2.Document(id="d2", text="lava")]),
            timeout=60)
        yield Stack(servers, targets(r, reranker_pb2_grpc.RerankerServiceStub(channels["services.reranker"]),
                                     adapter_pb2_grpc.AdapterServiceStub(channels["services.reranker"]),
                                     search_pb2_grpc.SearchServiceStub(channels["services.gateway"])))
    finally:
        for s in servers:
            s.stop()


def targets(r: retriever_pb2_grpc.RetrieverServiceStub, rr: reranker_pb2_grpc.RerankerServiceStub,
            adapters: adapter_pb2_grpc.AdapterServiceStub, gateway: search_pb2_grpc.SearchServiceStub) -> list[Target]:
    fusion = st.builds(retriever_pb2.FusionParams, method=enums)
    return [
        Target("Search", gateway.Search, st.builds(search_pb2.SearchRequest, collection=names, query=strings,
                                                   top_k=ints, rerank_depth=st.integers(-1, 5), tenant=names,
                                                   mode=enums)),
        Target("Retrieve", r.Retrieve, st.builds(retriever_pb2.RetrieveRequest, collection=names, query=strings,
                                                  top_k=ints, mode=enums)),
        Target("CreateCollection", r.CreateCollection, st.builds(
            retriever_pb2.CreateCollectionRequest, collection=names, index_type=enums, default_mode=enums,
            fusion=fusion)),
        Target("UpdateCollection", r.UpdateCollection, st.builds(
            retriever_pb2.UpdateCollectionRequest, collection=names, default_mode=enums, fusion=fusion)),
        Target("DeleteCollection", r.DeleteCollection, st.builds(retriever_pb2.DeleteCollectionRequest,
                                                                  collection=st.sampled_from(["fz2", "missing"]))),
        Target("ListCollections", r.ListCollections, st.just(retriever_pb2.ListCollectionsRequest())),
        Target("UpsertDocuments", r.UpsertDocuments, st.builds(retriever_pb2.UpsertDocumentsRequest, collection=names,
                                                                documents=documents)),
        Target("DeleteDocuments", r.DeleteDocuments, st.builds(retriever_pb2.DeleteDocumentsRequest, collection=names,
                                                                ids=st.lists(ids, max_size=4))),
        Target("GetDocuments", r.GetDocuments, st.builds(retriever_pb2.GetDocumentsRequest, collection=names,
                                                          ids=st.lists(ids, max_size=4))),
        Target("Rerank", rr.Rerank, st.builds(reranker_pb2.RerankRequest, query=strings, documents=documents,
                                              top_n=ints, tenant=names)),
        Target("LoadAdapter", adapters.LoadAdapter, st.builds(adapter_pb2.LoadAdapterRequest, tenant=names,
                                                              adapter=st.one_of(edges, unicode))),
        Target("UnloadAdapter", adapters.UnloadAdapter, st.builds(adapter_pb2.UnloadAdapterRequest, tenant=names)),
        Target("ListAdapters", adapters.ListAdapters, st.just(adapter_pb2.ListAdaptersRequest())),
    ]


# ---- the test --------------------------------------------------------------------------------------------


def test_fuzzed_requests_get_only_expected_codes(stack: Stack) -> None:
    chosen = st.integers(0, len(stack.targets) - 1).flatmap(
        lambda i: st.tuples(st.just(i), stack.targets[i].request))

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(chosen)
    def fuzz(pick: tuple[int, object]) -> None:
        target = stack.targets[pick[0]]
        try:
            target.call(pick[1], timeout=30)
            code = Code.OK
        except grpc.RpcError as err:
            code = err.code()
        stack.codes[(target.name, code.name)] += 1
        stack.sent += 1
        assert code in EXPECTED, f"{target.name} answered {code.name} to {str(pick[1])[:300]!r}"
        if stack.sent == int(EXAMPLES * WARMUP_FRACTION):
            stack.rss_after_warmup = {s.module: rss_bytes(s) for s in stack.servers}
        if stack.sent % max(1, EXAMPLES // 10) == 0:  # the memory's course, in the report
            stack.rss_course.append({s.module.split(".")[-1]: round(rss_bytes(s) / 2**20, 1) for s in stack.servers})

    start = time.perf_counter()
    fuzz()
    seconds = time.perf_counter() - start
    rss_end = {s.module: rss_bytes(s) for s in stack.servers}
    growth = {m: rss_end[m] / stack.rss_after_warmup[m] - 1 for m in rss_end}
    report = {"requests": stack.sent, "seconds": round(seconds, 1),
              "codes": {f"{rpc} {code}": n for (rpc, code), n in sorted(stack.codes.items())},
              "rss_after_warmup_mb": {m: round(v / 2**20, 1) for m, v in stack.rss_after_warmup.items()},
              "rss_end_mb": {m: round(v / 2**20, 1) for m, v in rss_end.items()},
              "rss_growth": {m: round(g, 4) for m, g in growth.items()}, "rss_course_mb": stack.rss_course}
    print(json.dumps(report, indent=1))
    if os.environ.get("FUZZ_REPORT"):
        Path(os.environ["FUZZ_REPORT"]).write_text(json.dumps(report, indent=1))
    assert stack.sent >= EXAMPLES * 0.9  # hypothesis may stop a little early when it runs out of new inputs
    for s in stack.servers:  # every server still serves
        assert s.popen is not None and s.popen.poll() is None, s.log_tail()
        s.wait_serving(timeout=10)
    if EXAMPLES >= RSS_CHECK_EXAMPLES:  # a few hundred requests are still warm-up (allocator, first code paths)
        assert all(g <= MAX_RSS_GROWTH for g in growth.values()), report
