"""RetrieverService: a thin gRPC layer over `retriever.engine.RetrieverEngine`.

    python -m services.retriever --port 50051 --data-dir var/retriever
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path

from retriever.embedder import Embedder, EmbedderConfig, set_cpu_threads
from retriever.engine import RetrieverEngine
from services.convert import (
    collection_info_to_pb,
    document_from_pb,
    document_to_pb,
    hnsw_from_pb,
    index_kind_from_pb,
)
from services.errors import NotReady
from services.gen.retrieval.v1 import document_pb2, retriever_pb2, retriever_pb2_grpc
from services.server import Hosted, ServiceSpec, Worker, elapsed_ms, run_service, setup_logging


@dataclass(frozen=True)
class RetrieverConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    data_dir: str = "var/retriever"
    model_path: str = ""
    device: str = "auto"
    precision: str = "auto"
    worker_threads: int = 2
    grace_s: float = 10.0


class RetrieverServicer(retriever_pb2_grpc.RetrieverServiceServicer):
    def __init__(self, config: RetrieverConfig) -> None:
        self.config = config
        self.worker = Worker(config.worker_threads)
        self._engine: RetrieverEngine | None = None

    def load(self) -> None:
        set_cpu_threads()
        embedder = Embedder(EmbedderConfig(model_path=self.config.model_path, device=self.config.device,
                                           precision=self.config.precision))
        engine = RetrieverEngine(Path(self.config.data_dir), embedder)
        engine.load()
        self._engine = engine

    @property
    def engine(self) -> RetrieverEngine:
        if self._engine is None:
            raise NotReady()
        return self._engine

    async def CreateCollection(self, request, context):
        stats = await self.worker.run(context, self.engine.create_collection, request.collection,
                                      index_kind_from_pb(request.index_type), hnsw_from_pb(request.hnsw))
        return retriever_pb2.CreateCollectionResponse(collection=collection_info_to_pb(stats))

    async def DeleteCollection(self, request, context):
        await self.worker.run(context, self.engine.delete_collection, request.collection)
        return retriever_pb2.DeleteCollectionResponse()

    async def ListCollections(self, request, context):
        stats = self.engine.list_collections()
        return retriever_pb2.ListCollectionsResponse(collections=[collection_info_to_pb(s) for s in stats])

    async def UpsertDocuments(self, request, context):
        start = time.perf_counter()
        documents = [document_from_pb(d) for d in request.documents]
        count = await self.worker.run(context, self.engine.upsert, request.collection, documents)
        return retriever_pb2.UpsertDocumentsResponse(upserted_count=count,
                                                     timings=document_pb2.Timings(total_ms=elapsed_ms(start)))

    async def DeleteDocuments(self, request, context):
        deleted, missing = await self.worker.run(context, self.engine.delete, request.collection,
                                                 list(request.ids))
        return retriever_pb2.DeleteDocumentsResponse(deleted_count=len(deleted), not_found_ids=missing)

    async def Retrieve(self, request, context):
        start = time.perf_counter()
        hits = await self.worker.run(context, self.engine.search, request.collection, request.query,
                                     request.top_k)
        results = [retriever_pb2.ScoredDocument(document=document_to_pb(h.document), score=h.score) for h in hits]
        return retriever_pb2.RetrieveResponse(results=results,
                                              timings=document_pb2.Timings(total_ms=elapsed_ms(start)))


def parse_args(argv: list[str] | None = None) -> RetrieverConfig:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default=os.environ.get("RETRIEVER_HOST", RetrieverConfig.host))
    parser.add_argument("--port", type=int, default=int(os.environ.get("RETRIEVER_PORT", RetrieverConfig.port)))
    parser.add_argument("--data-dir", default=os.environ.get("RETRIEVER_DATA_DIR", RetrieverConfig.data_dir))
    parser.add_argument("--model", dest="model_path", default=os.environ.get("EMBEDDER_MODEL", ""),
                        help="local Hugging Face encoder directory (default: bundled all-MiniLM-L6-v2)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--worker-threads", type=int, default=RetrieverConfig.worker_threads)
    parser.add_argument("--grace-s", type=float, default=RetrieverConfig.grace_s)
    return RetrieverConfig(**vars(parser.parse_args(argv)))


def build(config: RetrieverConfig) -> Hosted:
    servicer = RetrieverServicer(config)
    spec = ServiceSpec.of(retriever_pb2, "RetrieverService", retriever_pb2_grpc.add_RetrieverServiceServicer_to_server,
                          servicer)
    return Hosted([spec], load=servicer.load)


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    run_service("retriever", parse_args(argv), build)


if __name__ == "__main__":
    main()
