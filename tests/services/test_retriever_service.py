"""RetrieverService against a real server process on 127.0.0.1."""

import time
from typing import Any, cast

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from services.gen.retrieval.v1 import document_pb2, retriever_pb2, retriever_pb2_grpc
from services.gen.retrieval.v1.document_pb2 import (
    RETRIEVAL_MODE_DENSE,
    RETRIEVAL_MODE_HYBRID,
    RETRIEVAL_MODE_LEXICAL,
    RETRIEVAL_MODE_UNSPECIFIED,
    RetrievalMode,
)
from tests.conftest import fixture_documents

pytestmark = pytest.mark.integration


def stub(server):
    return retriever_pb2_grpc.RetrieverServiceStub(server.channel())


def top_ids(s, query: str, k: int = 1, collection: str = "c") -> list[str]:
    reply = s.Retrieve(retriever_pb2.RetrieveRequest(collection=collection, query=query, top_k=k), timeout=30)
    return [r.document.id for r in reply.results]


def code_of(call, *args) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, timeout=30)
    return info.value.code()


def storage_args(backend: str, tmp_path) -> list[str]:
    if backend == "milvus":
        pytest.importorskip("milvus_lite", reason="the milvus extra is not installed")
        return ["--backend", "milvus", "--milvus-uri", str(tmp_path / "milvus.db")]
    return ["--data-dir", str(tmp_path / "data")]


@pytest.mark.parametrize("backend", ["faiss", "milvus"])
def test_ingest_search_replace_delete_restart(server_factory, tmp_path, backend):
    """The same API and the same answers on both backends (Milvus Lite in a file for the milvus one)."""
    args = storage_args(backend, tmp_path)
    server = server_factory("services.retriever", args).start()
    s = stub(server)
    created = s.CreateCollection(retriever_pb2.CreateCollectionRequest(
        collection="c", index_type=retriever_pb2.INDEX_TYPE_HNSW), timeout=30)
    assert created.collection.dimension == 384
    assert created.collection.index_type == retriever_pb2.INDEX_TYPE_HNSW
    upserted = s.UpsertDocuments(retriever_pb2.UpsertDocumentsRequest(collection="c", documents=fixture_documents()),
                                 timeout=60)
    assert upserted.upserted_count == 8
    reply = s.Retrieve(retriever_pb2.RetrieveRequest(collection="c", query="kitten chasing a mouse", top_k=3),
                       timeout=30)
    assert reply.results[0].document.id == "cats"
    assert reply.results[0].document.metadata["topic"] == "cats"
    assert reply.results[0].score > reply.results[1].score

    # Upsert replaces: "cats" now holds text about bread; the count does not change.
    s.UpsertDocuments(retriever_pb2.UpsertDocumentsRequest(collection="c", documents=[
        document_pb2.Document(id="cats", title="Sourdough", text="A sourdough starter leavens rye bread.")]),
        timeout=30)
    assert "cats" in top_ids(s, "sourdough starter for rye bread", 2)
    deleted = s.DeleteDocuments(retriever_pb2.DeleteDocumentsRequest(collection="c", ids=["volcano", "ghost"]),
                                timeout=30)
    assert deleted.deleted_count == 1 and list(deleted.not_found_ids) == ["ghost"]
    assert "volcano" not in top_ids(s, "lava and magma", 7)

    # Graceful SIGTERM, then a new process loads the same state from disk.
    assert server.stop() == 0
    restarted = server_factory("services.retriever", args).start()
    s = stub(restarted)
    listed = s.ListCollections(retriever_pb2.ListCollectionsRequest(), timeout=10).collections
    assert [(c.name, c.document_count) for c in listed] == [("c", 7)]
    assert listed[0].index_type == retriever_pb2.INDEX_TYPE_HNSW
    assert "cats" in top_ids(s, "sourdough starter for rye bread", 2)
    assert "volcano" not in top_ids(s, "lava and magma", 7)
    assert top_ids(s, "Qubits and superposition")[0] == "quantum"
    # GetDocuments: the latest version of each id, in the order asked, each once; the rest missing.
    got = s.GetDocuments(retriever_pb2.GetDocumentsRequest(collection="c", ids=["quantum", "cats", "volcano",
                                                                                  "cats", "ghost"]), timeout=30)
    assert [d.id for d in got.documents] == ["quantum", "cats"] and got.documents[1].title == "Sourdough"
    assert list(got.missing_ids) == ["volcano", "ghost"]
    for mode in (RETRIEVAL_MODE_LEXICAL, RETRIEVAL_MODE_HYBRID):
        reply = s.Retrieve(retriever_pb2.RetrieveRequest(collection="c", query="aqueducts of Rome", top_k=3,
                                                         mode=mode), timeout=60)
        assert reply.results[0].document.id == "rome" and reply.results[0].lexical_score > 0
    s.DeleteCollection(retriever_pb2.DeleteCollectionRequest(collection="c"), timeout=30)
    assert not s.ListCollections(retriever_pb2.ListCollectionsRequest(), timeout=10).collections


def test_status_codes_health_and_reflection(server_factory, tmp_path):
    server = server_factory("services.retriever", ["--data-dir", str(tmp_path / "d")]).start()
    s = stub(server)
    s.CreateCollection(retriever_pb2.CreateCollectionRequest(collection="c"), timeout=30)
    s.UpsertDocuments(retriever_pb2.UpsertDocumentsRequest(collection="c", documents=fixture_documents()), timeout=60)
    invalid, not_found = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
    R = retriever_pb2
    cases = [
        (s.CreateCollection, R.CreateCollectionRequest(collection="c"), grpc.StatusCode.ALREADY_EXISTS),
        (s.CreateCollection, R.CreateCollectionRequest(collection="bad/name"), invalid),
        (s.Retrieve, R.RetrieveRequest(collection="c", query="", top_k=5), invalid),
        (s.Retrieve, R.RetrieveRequest(collection="c", query="q", top_k=0), invalid),
        (s.Retrieve, R.RetrieveRequest(collection="c", query="q", top_k=1001), invalid),
        (s.Retrieve, R.RetrieveRequest(collection="nope", query="q", top_k=5), not_found),
        (s.UpsertDocuments, R.UpsertDocumentsRequest(collection="c", documents=[document_pb2.Document(text="x")]),
         invalid),
        (s.UpsertDocuments, R.UpsertDocumentsRequest(collection="nope", documents=fixture_documents()), not_found),
        (s.DeleteDocuments, R.DeleteDocumentsRequest(collection="c", ids=[]), invalid),
        (s.DeleteDocuments, R.DeleteDocumentsRequest(collection="c", ids=[""]), invalid),
        (s.DeleteCollection, R.DeleteCollectionRequest(collection="nope"), not_found),
    ]
    for call, request, expected in cases:
        assert code_of(call, request) == expected, request
    # Bad input lost nothing and the server keeps serving.
    assert top_ids(s, "Qubits and superposition")[0] == "quantum"
    assert s.ListCollections(R.ListCollectionsRequest(), timeout=10).collections[0].document_count == 8

    health = health_pb2_grpc.HealthStub(server.channel())
    for name in ["", "retrieval.v1.RetrieverService"]:
        status = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    services = set(ProtoReflectionDescriptorDatabase(server.channel()).get_services())
    assert {"retrieval.v1.RetrieverService", "grpc.health.v1.Health"} <= services


def test_deadline_is_honoured(server_factory, tmp_path):
    server = server_factory("services.retriever", ["--data-dir", str(tmp_path / "d")]).start()
    s = stub(server)
    s.CreateCollection(retriever_pb2.CreateCollectionRequest(collection="c"), timeout=30)
    many = [document_pb2.Document(id=str(i), text="word " * 200) for i in range(400)]
    with pytest.raises(grpc.RpcError) as info:
        s.UpsertDocuments(retriever_pb2.UpsertDocumentsRequest(collection="c", documents=many), timeout=0.5)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # The server's answer (the client library's own timer would only say "Deadline Exceeded").
    assert info.value.details() == "deadline exceeded while working", info.value.details()
    assert top_ids(s, "anything") is not None  # still serving


def test_not_serving_until_loaded(server_factory, tmp_path):
    server = server_factory("services.retriever", ["--data-dir", str(tmp_path / "d")]).start(wait=False)
    seen = set()
    # Reconnect every 50 ms: a first attempt made before the server listens would otherwise back off ~1 s
    # (gRPC's default), long enough for the whole load to pass unseen.
    fast_reconnect = [("grpc.initial_reconnect_backoff_ms", 50), ("grpc.min_reconnect_backoff_ms", 50),
                      ("grpc.max_reconnect_backoff_ms", 100)]
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(server.target, options=fast_reconnect))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        time.sleep(0.05)
        try:
            seen.add(health.Check(health_pb2.HealthCheckRequest(), timeout=1).status)
        except grpc.RpcError:
            pass
        if health_pb2.HealthCheckResponse.SERVING in seen:
            break
        if health_pb2.HealthCheckResponse.NOT_SERVING in seen:
            # While loading, calls fail fast with UNAVAILABLE rather than hang.
            try:
                stub(server).ListCollections(retriever_pb2.ListCollectionsRequest(), timeout=5)
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert {health_pb2.HealthCheckResponse.NOT_SERVING, health_pb2.HealthCheckResponse.SERVING} <= seen


def test_retrieval_modes_scores_and_collection_settings(server_factory, tmp_path):

    server = server_factory("services.retriever", ["--data-dir", str(tmp_path / "d")]).start()
    s = stub(server)
    info = s.CreateCollection(retriever_pb2.CreateCollectionRequest(
        collection="c", fusion=retriever_pb2.FusionParams(dense_weight=0.7, candidate_depth=50)), timeout=30).collection
    assert info.default_mode == RETRIEVAL_MODE_HYBRID and info.fusion.dense_weight == pytest.approx(0.7)
    assert info.fusion.candidate_depth == 50 and not info.fusion.HasField("rerank_weight")
    reply = s.UpsertDocuments(retriever_pb2.UpsertDocumentsRequest(collection="c", documents=[
        *fixture_documents(), document_pb2.Document(id="blank")]), timeout=60)
    assert reply.upserted_count == 8 and list(reply.skipped_ids) == ["blank"]

    def retrieve(mode: RetrievalMode) -> retriever_pb2.RetrieveResponse:
        return s.Retrieve(retriever_pb2.RetrieveRequest(collection="c", query="kittens purr", top_k=3, mode=mode),
                          timeout=30)

    dense, lexical, hybrid = (retrieve(m) for m in (RETRIEVAL_MODE_DENSE, RETRIEVAL_MODE_LEXICAL,
                                                    RETRIEVAL_MODE_UNSPECIFIED))
    assert hybrid.mode == RETRIEVAL_MODE_HYBRID, "unspecified: the collection's default"
    assert all(r.HasField("dense_score") and not r.HasField("lexical_score") for r in dense.results)
    assert [r.document.id for r in lexical.results] == ["cats"] and lexical.results[0].HasField("lexical_score")
    top = hybrid.results[0]
    assert top.document.id == "cats" and top.HasField("dense_score") and top.HasField("lexical_score")

    updated = s.UpdateCollection(retriever_pb2.UpdateCollectionRequest(
        collection="c", default_mode=RETRIEVAL_MODE_LEXICAL,
        fusion=retriever_pb2.FusionParams(rerank_weight=0.25)), timeout=30).collection
    assert updated.default_mode == RETRIEVAL_MODE_LEXICAL and updated.fusion.rerank_weight == pytest.approx(0.25)
    answered = retrieve(RETRIEVAL_MODE_UNSPECIFIED)
    assert answered.mode == RETRIEVAL_MODE_LEXICAL and answered.rerank_weight == pytest.approx(0.25)
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    for request in [retriever_pb2.UpdateCollectionRequest(collection="c", fusion=retriever_pb2.FusionParams(
                        dense_weight=1.5)),
                    retriever_pb2.UpdateCollectionRequest(collection="c", default_mode=cast(Any, 9))]:
        assert code_of(s.UpdateCollection, request) == invalid
    assert code_of(s.UpdateCollection, retriever_pb2.UpdateCollectionRequest(collection="nope")) == \
        grpc.StatusCode.NOT_FOUND


def test_kill_between_the_dense_and_the_lexical_write_is_repaired(server_factory, tmp_path):
    """The process dies (as kill -9 would) after the snapshot is committed and before the lexical index is:
    the write was not acknowledged; on restart both indexes hold the same documents."""
    data_dir = str(tmp_path / "d")
    doomed = server_factory("services.retriever", ["--data-dir", data_dir],
                            env={"FAILPOINTS": "collection.between_dense_and_lexical"}).start()
    s = stub(doomed)
    s.CreateCollection(retriever_pb2.CreateCollectionRequest(collection="c"), timeout=30)
    with pytest.raises(grpc.RpcError) as info:
        s.UpsertDocuments(retriever_pb2.UpsertDocumentsRequest(collection="c", documents=fixture_documents()),
                          timeout=60)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert doomed.popen is not None and doomed.popen.wait(timeout=30) == 137

    restarted = server_factory("services.retriever", ["--data-dir", data_dir]).start()
    s = stub(restarted)
    assert s.ListCollections(retriever_pb2.ListCollectionsRequest(), timeout=10).collections[0].document_count == 8
    lexical = s.Retrieve(retriever_pb2.RetrieveRequest(collection="c", query="aqueducts colosseum", top_k=8,
                                                       mode=RETRIEVAL_MODE_LEXICAL), timeout=30)
    assert [r.document.id for r in lexical.results] == ["rome"], "the lexical index was rebuilt from the snapshot"
    assert top_ids(s, "Qubits and superposition")[0] == "quantum"
