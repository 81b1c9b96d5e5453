"""services.limits: every limit answers INVALID_ARGUMENT naming its field (checked here on the messages; the fuzz
test throws the same at live servers)."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf.message import Message

from retriever.types import InvalidArgument
from services import limits
from services.gen.retrieval.v1 import (
    adapter_pb2,
    document_pb2,
    reranker_pb2,
    retriever_pb2,
    search_pb2,
)

Doc = document_pb2.Document


def search(**fields: Any) -> search_pb2.SearchRequest:
    return search_pb2.SearchRequest(**{"collection": "c", "query": "q", "top_k": 10, **fields})


def unknown(value: int) -> Any:
    """An enum number the schema does not define (what a client built against another version may send)."""
    return value


def upsert(*docs: document_pb2.Document) -> retriever_pb2.UpsertDocumentsRequest:
    return retriever_pb2.UpsertDocumentsRequest(collection="c", documents=list(docs))


BAD: list[tuple[Message, str]] = [
    (search(collection=""), "collection:"),
    (search(collection="../etc"), "collection:"),
    (search(collection="a..b"), "collection:"),
    (search(collection="x" * 129), "collection:"),
    (search(query="  "), "query: must not be empty"),
    (search(query="q" * (limits.MAX_QUERY_CHARS + 1)), "query: 8193 characters"),
    (search(top_k=0), "top_k: must be in 1..1000"),
    (search(top_k=1001), "top_k:"),
    (search(rerank_depth=-1), "rerank_depth:"),
    (search(tenant="Acme"), "tenant:"),
    (search(mode=unknown(7)), "mode: unknown RetrievalMode value 7"),
    (retriever_pb2.RetrieveRequest(collection="c", query="q", top_k=5, mode=unknown(-3)), "mode: unknown"),
    (retriever_pb2.CreateCollectionRequest(collection="c", index_type=unknown(9)), "index_type: unknown IndexType value 9"),
    (retriever_pb2.CreateCollectionRequest(collection="c", fusion=retriever_pb2.FusionParams(method=unknown(5))),
     "fusion.method: unknown"),
    (upsert(), "documents: must not be empty"),
    (upsert(Doc(id="", text="x")), "documents[0].id: must be set"),
    (upsert(Doc(id="a", text="x"), Doc(id="b c", text="x")), "documents[1].id: printable characters without"),
    (upsert(Doc(id="a\x00", text="x")), "documents[0].id:"),
    (upsert(Doc(id="i" * 257, text="x")), "documents[0].id: 257 characters"),
    (upsert(Doc(id="a", text="x" * limits.MAX_DOCUMENT_BYTES)), "documents[0]: 10"),
    (upsert(Doc(id="a", text="x", metadata={str(i): "v" for i in range(65)})), "documents[0].metadata: 65 entries"),
    (upsert(Doc(id="a", text="x", metadata={"bad key": "v"})), "documents[0].metadata: keys are"),
    (upsert(Doc(id="a", text="x", metadata={"k": "v" * 4097})), "documents[0].metadata[k]: 4097 characters"),
    (retriever_pb2.DeleteDocumentsRequest(collection="c"), "ids: must not be empty"),
    (retriever_pb2.DeleteDocumentsRequest(collection="c", ids=["ok", ""]), "ids[1]: must be set"),
    (reranker_pb2.RerankRequest(query="q"), "documents: must not be empty"),
    (reranker_pb2.RerankRequest(query="q", documents=[Doc(text="x")], top_n=-1), "top_n:"),
    (reranker_pb2.RerankRequest(query="q", documents=[Doc(text="x")], tenant="a/b"), "tenant:"),
    (reranker_pb2.RerankRequest(query="q", documents=[Doc(text="x")], first_stage_scores=[1.0, 2.0]),
     "first_stage_scores: must be empty or one per document"),
    (reranker_pb2.RerankRequest(query="q", documents=[Doc(text="x")], fusion_weight=1.5), "fusion_weight: must be in"),
    (adapter_pb2.LoadAdapterRequest(tenant="acme", adapter="../../etc"), "adapter:"),
    (adapter_pb2.LoadAdapterRequest(tenant="", adapter="scifact-lora"), "tenant:"),
    (adapter_pb2.UnloadAdapterRequest(tenant="x" * 33), "tenant:"),
]


@pytest.mark.parametrize("request_, field", BAD, ids=[f"{type(r).__name__}-{f.split(':')[0]}" for r, f in BAD])
def test_each_limit_names_its_field(request_: Message, field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        limits.check_request(request_)
    assert str(err.value).startswith(field), str(err.value)


def test_requests_inside_the_limits_pass() -> None:
    for request in (search(tenant="acme", rerank_depth=20, mode=document_pb2.RETRIEVAL_MODE_HYBRID),
                    upsert(Doc(id="MED-10/ü", title="t", text="x" * 1000, metadata={"source:url": "v" * 4096})),
                    retriever_pb2.DeleteDocumentsRequest(collection="scifact.v2", ids=["1", "2"]),
                    reranker_pb2.RerankRequest(query="q", documents=[Doc(text="x")] * 3, top_n=2),
                    adapter_pb2.LoadAdapterRequest(tenant="acme", adapter="scifact-lora")):
        limits.check_request(request)


def test_a_long_bad_value_is_cut_short_in_the_message() -> None:
    with pytest.raises(InvalidArgument) as err:
        limits.check_request(search(collection="/" * 100_000))
    assert len(str(err.value)) < 300
