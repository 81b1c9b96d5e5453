"""Protobuf <-> engine dataclass conversions (the only place that knows both)."""

from __future__ import annotations

from common.types import Document
from retriever.types import CollectionStats, HnswSettings, IndexKind
from services.gen.retrieval.v1 import document_pb2, retriever_pb2

_INDEX_TO_PB = {IndexKind.FLAT: retriever_pb2.INDEX_TYPE_FLAT, IndexKind.HNSW: retriever_pb2.INDEX_TYPE_HNSW}


def document_from_pb(doc: document_pb2.Document) -> Document:
    return Document(id=doc.id, title=doc.title, text=doc.text, metadata=dict(doc.metadata))


def document_to_pb(doc: Document) -> document_pb2.Document:
    return document_pb2.Document(id=doc.id, title=doc.title, text=doc.text, metadata=doc.metadata)


def index_kind_from_pb(value: int) -> IndexKind:
    return IndexKind.HNSW if value == retriever_pb2.INDEX_TYPE_HNSW else IndexKind.FLAT


def hnsw_from_pb(params: retriever_pb2.HnswParams) -> HnswSettings:
    default = HnswSettings()
    return HnswSettings(m=params.m or default.m, ef_construction=params.ef_construction or default.ef_construction,
                        ef_search=params.ef_search or default.ef_search)


def collection_info_to_pb(stats: CollectionStats) -> retriever_pb2.CollectionInfo:
    spec = stats.spec
    hnsw = retriever_pb2.HnswParams(m=spec.hnsw.m, ef_construction=spec.hnsw.ef_construction,
                                    ef_search=spec.hnsw.ef_search)
    return retriever_pb2.CollectionInfo(name=spec.name, index_type=_INDEX_TO_PB[spec.index],
                                        document_count=stats.document_count, dimension=spec.dimension,
                                        hnsw=hnsw if spec.index is IndexKind.HNSW else None)
