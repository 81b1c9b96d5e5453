"""Crash trials: a retriever killed with SIGKILL at random moments during ingest, restarted, and checked.

Each trial runs a writer that upserts batches (new ids, new versions of earlier ids) and deletes some, keeping a
model of every acknowledged write; the process is killed at a random moment, then restarted on the same data
directory. After each restart:
- every acknowledged id is present (GetDocuments) with its latest acknowledged text, every acknowledged delete
  is gone, and the collection's count is the model's;
- the one write in flight at the kill is all there or not at all (never half a batch);
- the dense and the lexical index agree with the documents: each sampled live document is found by both its
  dense and its lexical query, and a deleted one by neither;
- the server serves (health SERVING, and the next trial writes to it).

    CRASH_TRIALS=20 python -m pytest tests/services/test_crash.py -q -s      # make crash-test
The suite runs CRASH_TRIALS=3 (the default).
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field

import grpc
import pytest

from services.gen.retrieval.v1 import document_pb2, retriever_pb2, retriever_pb2_grpc
from tests.conftest import Server

pytestmark = [pytest.mark.integration, pytest.mark.slow]
TRIALS = int(os.environ.get("CRASH_TRIALS", "3"))
BATCH = 16
SAMPLE = 8  # live and deleted documents whose index entries are checked per trial
WORDS = [f"w{i:03d}" for i in range(400)]
DENSE, LEXICAL = document_pb2.RETRIEVAL_MODE_DENSE, document_pb2.RETRIEVAL_MODE_LEXICAL


def text_of(doc_id: str, version: int) -> str:
    """A version's text: a token no other document or version has (lexical), and a bag of words (dense)."""
    rng = random.Random(f"{doc_id}/{version}")
    return f"tok{abs(hash((doc_id, version))) % 10**9}x{version} " + " ".join(rng.sample(WORDS, 12))


@dataclass
class Write:
    upserts: dict[str, str] = field(default_factory=dict)  # id -> text
    deletes: list[str] = field(default_factory=list)


@dataclass
class Model:
    """What the server acknowledged: id -> latest text (deleted ids absent), and the write in flight."""

    live: dict[str, str] = field(default_factory=dict)
    deleted: set[str] = field(default_factory=set)
    in_flight: Write | None = None
    versions: dict[str, int] = field(default_factory=dict)

    def apply(self, write: Write) -> None:
        for doc_id, text in write.upserts.items():
            self.live[doc_id] = text
            self.deleted.discard(doc_id)
        for doc_id in write.deletes:
            self.live.pop(doc_id, None)
            self.deleted.add(doc_id)


def next_write(model: Model, rng: random.Random, trial: int, batch: int) -> Write:
    write = Write()
    fresh = [f"t{trial}b{batch}d{i}" for i in range(BATCH - 4)]
    again = rng.sample(sorted(model.live), min(4, len(model.live)))  # new versions of acknowledged documents
    for doc_id in [*fresh, *again]:
        version = model.versions.get(doc_id, 0) + 1
        model.versions[doc_id] = version
        write.upserts[doc_id] = text_of(doc_id, version)
    if batch % 3 == 2 and len(model.live) > 8:
        write.deletes = rng.sample(sorted(set(model.live) - set(write.upserts)), 3)
    return write


def send(stub: retriever_pb2_grpc.RetrieverServiceStub, write: Write) -> None:
    if write.upserts:
        stub.UpsertDocuments(retriever_pb2.UpsertDocumentsRequest(collection="c", documents=[
            document_pb2.Document(id=i, text=t) for i, t in write.upserts.items()]), timeout=60)
    if write.deletes:
        stub.DeleteDocuments(retriever_pb2.DeleteDocumentsRequest(collection="c", ids=write.deletes), timeout=60)


def writer(stub: retriever_pb2_grpc.RetrieverServiceStub, model: Model, rng: random.Random, trial: int,
           stop: threading.Event) -> None:
    """Writes until the server dies; a write counts only once acknowledged."""
    batch = 0
    while not stop.is_set():
        write = next_write(model, rng, trial, batch)
        model.in_flight = write
        try:
            send(stub, write)
        except grpc.RpcError:
            return  # killed mid-write: stays in flight
        model.apply(write)
        model.in_flight = None
        batch += 1


def documents(stub: retriever_pb2_grpc.RetrieverServiceStub, ids: list[str]) -> dict[str, str]:
    reply = stub.GetDocuments(retriever_pb2.GetDocumentsRequest(collection="c", ids=ids), timeout=60)
    return {d.id: d.text for d in reply.documents}


def resolve_in_flight(stub: retriever_pb2_grpc.RetrieverServiceStub, model: Model) -> None:
    """The write that was in flight at the kill: applied whole, or not at all."""
    write = model.in_flight
    if write is None:
        return
    upserted = documents(stub, list(write.upserts))
    applied = [upserted.get(i) == t for i, t in write.upserts.items()]
    assert all(applied) or not any(applied), f"half a batch survived: {sum(applied)}/{len(applied)}"
    if write.upserts and all(applied):
        model.apply(Write(upserts=write.upserts))
    if write.deletes:  # sent after its upserts: present means not applied
        still = documents(stub, write.deletes)
        assert len(still) in (0, len(write.deletes)), "half a delete survived"
        if not still:
            model.apply(Write(deletes=write.deletes))
    model.in_flight = None


def found(stub: retriever_pb2_grpc.RetrieverServiceStub, query: str, mode: document_pb2.RetrievalMode, doc_id: str
          ) -> bool:
    reply = stub.Retrieve(retriever_pb2.RetrieveRequest(collection="c", query=query, top_k=10, mode=mode), timeout=60)
    return doc_id in [r.document.id for r in reply.results]


def check(stub: retriever_pb2_grpc.RetrieverServiceStub, model: Model, rng: random.Random) -> None:
    resolve_in_flight(stub, model)
    stored = documents(stub, sorted(model.live | dict.fromkeys(model.deleted, "")))
    assert stored == model.live, "acknowledged documents lost, stale or resurrected"
    listed = stub.ListCollections(retriever_pb2.ListCollectionsRequest(), timeout=30).collections
    assert [c.document_count for c in listed if c.name == "c"] == [len(model.live)]
    for doc_id in rng.sample(sorted(model.live), min(SAMPLE, len(model.live))):
        text = model.live[doc_id]
        assert found(stub, text.split()[0], LEXICAL, doc_id), f"{doc_id} missing from the lexical index"
        assert found(stub, text, DENSE, doc_id), f"{doc_id} missing from the dense index"
    for doc_id in rng.sample(sorted(model.deleted), min(SAMPLE, len(model.deleted))):
        tokens = [t for v in range(1, model.versions[doc_id] + 1) for t in text_of(doc_id, v).split()[:1]]
        assert not any(found(stub, t, LEXICAL, doc_id) for t in tokens), f"deleted {doc_id} still in the lexical index"


def test_acknowledged_writes_survive_kill_9(tmp_path) -> None:
    data_dir = str(tmp_path / "data")
    rng = random.Random(20261126)
    model = Model()
    server = Server("services.retriever", ["--data-dir", data_dir], log_path=tmp_path / "retriever.log").start()
    retriever_pb2_grpc.RetrieverServiceStub(server.channel()).CreateCollection(
        retriever_pb2.CreateCollectionRequest(collection="c"), timeout=30)
    kills = 0
    try:
        for trial in range(TRIALS):
            stub = retriever_pb2_grpc.RetrieverServiceStub(server.channel())
            stop = threading.Event()
            thread = threading.Thread(target=writer, args=(stub, model, rng, trial, stop), daemon=True)
            thread.start()
            time.sleep(rng.uniform(0.3, 2.5))  # some writes acknowledged, one in flight (or between two)
            assert server.stop(signal.SIGKILL) == -signal.SIGKILL
            kills += 1
            stop.set()
            thread.join(timeout=60)
            server = Server("services.retriever", ["--data-dir", data_dir], port=server.port,
                            log_path=tmp_path / "retriever.log").start()
            check(retriever_pb2_grpc.RetrieverServiceStub(server.channel()), model, rng)
            print(f"trial {trial}: killed, restarted, {len(model.live)} live and {len(model.deleted)} deleted "
                  f"documents as acknowledged")
    finally:
        server.stop()
    assert kills == TRIALS and model.live
