"""RetrieverService: a thin gRPC layer over `retriever.engine.RetrieverEngine`.

    python -m services.retriever --port 50051 --data-dir var/retriever [--model DIR] [--dtype auto]
    python -m services.retriever --port 50051 --backend milvus --milvus-uri http://milvus:19530
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from prometheus_client.core import GaugeMetricFamily

from common.device import set_cpu_threads
from retriever.backends import BackendKind, open_backend
from retriever.embedder import Embedder, EmbedderConfig
from retriever.engine import Limits, RetrieverEngine
from retriever.fusion import RetrievalMode
from services.config import Secret, ServerConfig, option, parse_config
from services.convert import (
    document_from_pb,
    document_to_pb,
    fusion_from_pb,
    hnsw_from_pb,
    index_kind_from_pb,
    mode_from_pb,
    retrieved_to_pb,
)
from services.errors import NotReady
from services.gen.retrieval.v1 import document_pb2, retriever_pb2, retriever_pb2_grpc
from services.metrics import Families, counter, register_engine
from services.namespaces import Namespace
from services.server import Context, Hosted, ServiceSpec, Worker, elapsed_ms, run_service

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class RetrieverServiceConfig:
    server: ServerConfig = option(factory=lambda: ServerConfig(port=50051))
    data_dir: str = option("var/retriever", "where collections persist (one directory each; faiss backend)")
    backend: BackendKind = option(BackendKind.FAISS, "where collections live: faiss (local SQLite + FAISS + "
                                                     "tantivy under --data-dir) or milvus (--milvus-uri)")
    milvus_uri: str = option("", "with --backend milvus: a Milvus Lite file (path ending .db) or a Milvus "
                                 "standalone/cluster (http://host:19530)")
    milvus_token: Secret = option(factory=Secret, help="Milvus credentials (user:password or an API key)")
    checkpoint_fraction: float = option(0.1, "faiss backend: write the dense index to disk once the writes "
                                             "since the last checkpoint reach this fraction of the collection "
                                             "(a restart replays at most about that much)")
    embedder: EmbedderConfig = option(factory=EmbedderConfig)
    limits: Limits = option(factory=Limits)


class RetrieverServicer(retriever_pb2_grpc.RetrieverServiceServicer):
    def __init__(self, config: RetrieverServiceConfig) -> None:
        self.config = config
        self.worker = Worker(config.server.worker_threads)
        self._engine: RetrieverEngine | None = None

    def load(self) -> None:
        log.info("torch CPU threads: %d", set_cpu_threads(self.config.server.cpu_threads))
        config = self.config
        backend = open_backend(config.backend, Path(config.data_dir), config.milvus_uri,
                               config.milvus_token.reveal(), config.checkpoint_fraction)
        engine = RetrieverEngine(backend, Embedder(config.embedder), config.limits)
        engine.load()
        self._engine = engine

    @property
    def engine(self) -> RetrieverEngine:
        if self._engine is None:
            raise NotReady()
        return self._engine

    def metrics(self) -> Families:
        """Read at scrape time: documents per collection, what the embedder has done."""
        if self._engine is None:
            return
        documents = GaugeMetricFamily("retriever_collection_documents", "Documents in a collection.",
                                      labels=["collection"])
        for stats in self._engine.list_collections():
            documents.add_metric([stats.spec.name], stats.document_count)
        yield documents
        embedded = self._engine.embedder.stats
        yield counter("retriever_embedded_texts_total", "Texts embedded (documents and queries).", embedded.texts)
        yield counter("retriever_embedding_seconds_total", "Seconds spent embedding.", embedded.seconds)

    async def stop(self) -> None:
        self.worker.stop()
        if self._engine is not None:
            self._engine.close()

    async def _on_collection(self, context: Context, collection: str, fn: Callable[..., T], *args: Any
                             ) -> tuple[T, Namespace]:
        """fn(stored collection name, *args) on the worker, in the caller's namespace (services.namespaces): its
        result, and the namespace to name collections in the reply."""
        names = Namespace.of_caller()  # on the loop: the caller is a context variable
        with names.errors(collection):
            return await self.worker.run(context, fn, names.stored(collection), *args), names

    async def CreateCollection(self, request: retriever_pb2.CreateCollectionRequest, context: Context
                               ) -> retriever_pb2.CreateCollectionResponse:
        stats, names = await self._on_collection(
            context, request.collection, self.engine.create_collection, index_kind_from_pb(request.index_type),
            hnsw_from_pb(request.hnsw), mode_from_pb(request.default_mode) or RetrievalMode.HYBRID,
            fusion_from_pb(request.fusion))
        return retriever_pb2.CreateCollectionResponse(collection=names.info(stats))

    async def UpdateCollection(self, request: retriever_pb2.UpdateCollectionRequest, context: Context
                               ) -> retriever_pb2.UpdateCollectionResponse:
        fusion = fusion_from_pb(request.fusion) if request.HasField("fusion") else None
        stats, names = await self._on_collection(context, request.collection, self.engine.update_collection,
                                                 mode_from_pb(request.default_mode), fusion)
        return retriever_pb2.UpdateCollectionResponse(collection=names.info(stats))

    async def DeleteCollection(self, request: retriever_pb2.DeleteCollectionRequest, context: Context
                               ) -> retriever_pb2.DeleteCollectionResponse:
        await self._on_collection(context, request.collection, self.engine.delete_collection)
        return retriever_pb2.DeleteCollectionResponse()

    async def ListCollections(self, request: retriever_pb2.ListCollectionsRequest, context: Context
                              ) -> retriever_pb2.ListCollectionsResponse:
        names = Namespace.of_caller()
        stats = await self.worker.run(context, self.engine.list_collections)
        return retriever_pb2.ListCollectionsResponse(collections=[names.info(s) for s in stats if names.owns(s)])

    async def UpsertDocuments(self, request: retriever_pb2.UpsertDocumentsRequest, context: Context
                              ) -> retriever_pb2.UpsertDocumentsResponse:
        start = time.perf_counter()
        documents = [document_from_pb(d) for d in request.documents]
        result, _ = await self._on_collection(context, request.collection, self.engine.upsert, documents)
        return retriever_pb2.UpsertDocumentsResponse(upserted_count=result.upserted, skipped_ids=result.skipped,
                                                     timings=_timings(start))

    async def DeleteDocuments(self, request: retriever_pb2.DeleteDocumentsRequest, context: Context
                              ) -> retriever_pb2.DeleteDocumentsResponse:
        (deleted, missing), _ = await self._on_collection(context, request.collection, self.engine.delete,
                                                          list(request.ids))
        return retriever_pb2.DeleteDocumentsResponse(deleted_count=len(deleted), not_found_ids=missing)

    async def GetDocuments(self, request: retriever_pb2.GetDocumentsRequest, context: Context
                           ) -> retriever_pb2.GetDocumentsResponse:
        (found, missing), _ = await self._on_collection(context, request.collection, self.engine.get,
                                                        list(request.ids))
        return retriever_pb2.GetDocumentsResponse(documents=[document_to_pb(d) for d in found], missing_ids=missing)

    async def Retrieve(self, request: retriever_pb2.RetrieveRequest, context: Context
                       ) -> retriever_pb2.RetrieveResponse:
        start = time.perf_counter()
        retrieved, _ = await self._on_collection(context, request.collection, self.engine.search, request.query,
                                                 request.top_k, mode_from_pb(request.mode))
        response = retrieved_to_pb(retrieved)
        response.timings.CopyFrom(_timings(start))
        return response


def _timings(start: float) -> document_pb2.Timings:
    return document_pb2.Timings(total_ms=elapsed_ms(start))


def parse_args(argv: list[str] | None = None) -> RetrieverServiceConfig:
    return parse_config(RetrieverServiceConfig(), "RETRIEVER", argv, __doc__ or "")


def build(config: RetrieverServiceConfig) -> Hosted:
    servicer = RetrieverServicer(config)
    register_engine(servicer.metrics)
    spec = ServiceSpec.of(retriever_pb2, "RetrieverService", retriever_pb2_grpc.add_RetrieverServiceServicer_to_server,
                          servicer)
    return Hosted([spec], load=servicer.load, on_stop=[servicer.stop])


def main(argv: list[str] | None = None) -> None:
    run_service("retriever", parse_args(argv), build)


if __name__ == "__main__":
    main()
