"""Protobuf <-> engine dataclass conversions (the only place that knows both)."""

from __future__ import annotations

from typing import Any

from common.types import Document
from retriever.fusion import FusionMethod, FusionSettings, RetrievalMode
from retriever.types import CollectionStats, Hit, HnswSettings, IndexKind, InvalidArgument, Retrieved
from services.gen.retrieval.v1 import document_pb2, retriever_pb2

_INDEX_TO_PB = {IndexKind.FLAT: retriever_pb2.INDEX_TYPE_FLAT, IndexKind.HNSW: retriever_pb2.INDEX_TYPE_HNSW}
_MODE_TO_PB = {RetrievalMode.DENSE: document_pb2.RETRIEVAL_MODE_DENSE,
               RetrievalMode.LEXICAL: document_pb2.RETRIEVAL_MODE_LEXICAL,
               RetrievalMode.HYBRID: document_pb2.RETRIEVAL_MODE_HYBRID}
_MODE_FROM_PB = {v: k for k, v in _MODE_TO_PB.items()}
_METHOD_TO_PB = {FusionMethod.CONVEX: retriever_pb2.FUSION_METHOD_CONVEX, FusionMethod.RRF: retriever_pb2.FUSION_METHOD_RRF}


def optional(message: Any, field: str) -> Any:
    """A proto3 `optional` field's value, or None when the sender left it unset."""
    return getattr(message, field) if message.HasField(field) else None


def document_from_pb(doc: document_pb2.Document) -> Document:
    return Document(id=doc.id, title=doc.title, text=doc.text, metadata=dict(doc.metadata))


def document_to_pb(doc: Document) -> document_pb2.Document:
    return document_pb2.Document(id=doc.id, title=doc.title, text=doc.text, metadata=doc.metadata)


def index_kind_from_pb(value: int) -> IndexKind:
    return IndexKind.HNSW if value == retriever_pb2.INDEX_TYPE_HNSW else IndexKind.FLAT


def mode_from_pb(value: int) -> RetrievalMode | None:
    """None for RETRIEVAL_MODE_UNSPECIFIED (the collection's default)."""
    if value == document_pb2.RETRIEVAL_MODE_UNSPECIFIED:
        return None
    if value not in _MODE_FROM_PB:
        raise InvalidArgument(f"unknown retrieval mode {value}")
    return _MODE_FROM_PB[value]  # type: ignore[index]


def mode_to_pb(mode: RetrievalMode) -> document_pb2.RetrievalMode:
    return _MODE_TO_PB[mode]


def hnsw_from_pb(params: retriever_pb2.HnswParams) -> HnswSettings:
    default = HnswSettings()
    return HnswSettings(m=params.m or default.m, ef_construction=params.ef_construction or default.ef_construction,
                        ef_search=params.ef_search or default.ef_search)


def fusion_from_pb(params: retriever_pb2.FusionParams) -> FusionSettings:
    """Unset fields take the server defaults; out-of-range values are INVALID_ARGUMENT."""
    default = FusionSettings()
    try:
        return FusionSettings(
            method=FusionMethod.RRF if params.method == retriever_pb2.FUSION_METHOD_RRF else FusionMethod.CONVEX,
            dense_weight=params.dense_weight if params.HasField("dense_weight") else default.dense_weight,
            candidate_depth=params.candidate_depth or default.candidate_depth,
            rrf_k=params.rrf_k or default.rrf_k,
            rerank_weight=optional(params, "rerank_weight"))
    except ValueError as err:
        raise InvalidArgument(f"fusion: {err}") from None


def fusion_to_pb(settings: FusionSettings) -> retriever_pb2.FusionParams:
    return retriever_pb2.FusionParams(method=_METHOD_TO_PB[settings.method], dense_weight=settings.dense_weight,
                                      candidate_depth=settings.candidate_depth, rrf_k=settings.rrf_k,
                                      rerank_weight=settings.rerank_weight)


def collection_info_to_pb(stats: CollectionStats) -> retriever_pb2.CollectionInfo:
    spec = stats.spec
    hnsw = retriever_pb2.HnswParams(m=spec.hnsw.m, ef_construction=spec.hnsw.ef_construction,
                                    ef_search=spec.hnsw.ef_search)
    return retriever_pb2.CollectionInfo(name=spec.name, index_type=_INDEX_TO_PB[spec.index],
                                        document_count=stats.document_count, dimension=spec.dimension,
                                        hnsw=hnsw if spec.index is IndexKind.HNSW else None,
                                        default_mode=mode_to_pb(spec.default_mode), fusion=fusion_to_pb(spec.fusion))


def hit_to_pb(hit: Hit) -> retriever_pb2.ScoredDocument:
    return retriever_pb2.ScoredDocument(document=document_to_pb(hit.document), score=hit.score,
                                        dense_score=hit.dense_score, lexical_score=hit.lexical_score)


def retrieved_to_pb(retrieved: Retrieved) -> retriever_pb2.RetrieveResponse:
    return retriever_pb2.RetrieveResponse(results=[hit_to_pb(h) for h in retrieved.hits],
                                          mode=mode_to_pb(retrieved.mode),
                                          rerank_weight=retrieved.fusion.rerank_weight)
