"""Property-based fuzzing of live servers (hypothesis): malformed, oversized, random-unicode and boundary requests
to every public RPC of a retriever, a reranker and a gateway on 127.0.0.1. Every answer must be one of the codes
the API promises for bad input (never INTERNAL, UNKNOWN, UNAVAILABLE: a crash), the servers keep serving, and
their resident memory does not grow beyond what they were asked to store.

Two phases. First every RPC, writes included (FUZZ_EXAMPLES requests); what the servers then hold (collections,
documents, tenants) is reported. Then a read-only phase: 30% as many requests to the RPCs that store nothing,
sent twice, the same requests in the same order (hypothesis, derandomized). The first pass reaches every
allocation high-water mark those requests can set (the largest batch, the longest text); in the second, stored
data cannot grow and no request is larger than one already served, so each server's RSS, sampled every 1% of
the pass, must not trend upward beyond three times its own noise and a 4 MiB floor (deploy.trend: a fitted
line, not a last/first ratio).

    FUZZ_EXAMPLES=10000 python -m pytest tests/services/test_fuzz.py -q -s      # make fuzz
The suite runs FUZZ_EXAMPLES=300 (the default; its memory figures are printed, not bounded: too short a run).
The figures go to FUZZ_REPORT (a JSON file) when it is set.
"""

from __future__ import annotations

import collections
import hashlib
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

from common.procstats import ProcessStats
from deploy.trend import fit_trend
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
READ_ONLY_FRACTION = 0.3  # each pass of the read-only phase sends this many requests per request of the first
RSS_FLOOR_MIB = 4.0  # a rise below this never fails: one allocator heap's growth step
RSS_CHECK_EXAMPLES = 2000  # the memory bound is checked on runs at least this long (make fuzz)
# RPCs that store nothing: the read-only phase sends only these.
READ_ONLY = {"Search", "Retrieve", "ListCollections", "GetDocuments", "Rerank", "ListAdapters"}
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
    retriever: retriever_pb2_grpc.RetrieverServiceStub
    adapters: adapter_pb2_grpc.AdapterServiceStub
    codes: collections.Counter = field(default_factory=collections.Counter)
    sent: int = 0

    def rss_mib(self) -> dict[str, float]:
        return {s.module.split(".")[-1]: ProcessStats.of(s.popen.pid).rss_mib
                for s in self.servers if s.popen is not None}

    def stored(self) -> dict[str, object]:
        """What the servers were asked to keep: collections and their documents, bound tenants."""
        listed = self.retriever.ListCollections(retriever_pb2.ListCollectionsRequest(), timeout=30).collections
        tenants = self.adapters.ListAdapters(adapter_pb2.ListAdaptersRequest(), timeout=30).adapters
        return {"collections": len(listed), "documents": sum(c.document_count for c in listed),
                "tenants": len([a for a in tenants if a.tenant])}


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
        adapters = adapter_pb2_grpc.AdapterServiceStub(channels["services.reranker"])
        yield Stack(servers, targets(r, reranker_pb2_grpc.RerankerServiceStub(channels["services.reranker"]), adapters,
                                     search_pb2_grpc.SearchServiceStub(channels["services.gateway"])), r, adapters)
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


def fuzz(stack: Stack, chosen_targets: list[Target], examples: int,
         on_request: Callable[[int], None] = lambda sent: None) -> list[str]:
    """`examples` requests drawn over `chosen_targets`; each answer's code checked and counted. Returns the
    requests sent (RPC and a hash of the message), in order: derandomized, so the same on every call with the
    same arguments."""
    sent: list[str] = []
    chosen = st.integers(0, len(chosen_targets) - 1).flatmap(
        lambda i: st.tuples(st.just(i), chosen_targets[i].request))

    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(chosen)
    def one(pick: tuple[int, object]) -> None:
        target = chosen_targets[pick[0]]
        message = pick[1].SerializeToString(deterministic=True)  # type: ignore[attr-defined]
        sent.append(f"{target.name} {hashlib.blake2b(message, digest_size=8).hexdigest()}")
        try:
            target.call(pick[1], timeout=30)
            code = Code.OK
        except grpc.RpcError as err:
            code = err.code()
        stack.codes[(target.name, code.name)] += 1
        stack.sent += 1
        assert code in EXPECTED, f"{target.name} answered {code.name} to {str(pick[1])[:300]!r}"
        on_request(stack.sent)

    one()
    return sent


def test_fuzzed_requests_get_only_expected_codes(stack: Stack) -> None:
    start = time.perf_counter()
    course: list[dict[str, float]] = []  # MiB, every tenth of the first phase
    fuzz(stack, stack.targets, EXAMPLES,
         lambda sent: course.append(stack.rss_mib()) if sent % max(1, EXAMPLES // 10) == 0 else None)
    first_phase = stack.sent
    stored, rss_after_writes = stack.stored(), stack.rss_mib()
    # The read-only phase: one pass to reach the high-water marks, then the same requests again with RSS
    # sampled every 1% of the pass (the request count as the clock).
    read_only = [t for t in stack.targets if t.name in READ_ONLY]
    phase_examples = int(EXAMPLES * READ_ONLY_FRACTION)
    first_pass = fuzz(stack, read_only, phase_examples)
    second_start, every = stack.sent, max(1, phase_examples // 100)
    samples: list[tuple[int, dict[str, float]]] = []
    second_pass = fuzz(stack, read_only, phase_examples, lambda sent: samples.append(
        (sent - second_start, stack.rss_mib())) if (sent - second_start) % every == 0 else None)
    assert second_pass == first_pass  # the same requests: nothing new for the allocator to make room for
    seconds = time.perf_counter() - start
    assert stack.stored() == stored  # the read-only phase stored nothing
    trends = {name: fit_trend([n for n, _ in samples], [rss[name] for _, rss in samples], RSS_FLOOR_MIB)
              for name in rss_after_writes}
    report = {"requests": stack.sent, "seconds": round(seconds, 1), "first_phase_requests": first_phase,
              "codes": {f"{rpc} {code}": n for (rpc, code), n in sorted(stack.codes.items())},
              "stored_after_writes": stored, "rss_course_mb": course, "rss_after_writes_mb": rss_after_writes,
              "read_only_requests_per_pass": len(second_pass),
              "read_only_rss_mb": [{"request": n, **rss} for n, rss in samples],
              "read_only_trend": {name: t.as_dict() for name, t in trends.items()}}
    print(json.dumps({k: v for k, v in report.items() if k != "read_only_rss_mb"}, indent=1))
    if os.environ.get("FUZZ_REPORT"):
        Path(os.environ["FUZZ_REPORT"]).write_text(json.dumps(report, indent=1))
    assert stack.sent >= (EXAMPLES + 2 * phase_examples) * 0.9  # hypothesis may stop a little early
    for s in stack.servers:  # every server still serves
        assert s.popen is not None and s.popen.poll() is None, s.log_tail()
        s.wait_serving(timeout=10)
    if EXAMPLES >= RSS_CHECK_EXAMPLES:  # a few hundred requests are still warm-up (allocator, first code paths)
        growing = {name: t.as_dict() for name, t in trends.items() if t.grows}
        assert not growing, f"resident memory trends upward while nothing is stored: {growing}"
