"""Every input limit of the public API, in one place, checked at the gRPC boundary before any handler runs
(`ValidationInterceptor`): a request outside them is INVALID_ARGUMENT with a message that names the field
(`documents[3].metadata: 65 entries, at most 64`). The engines keep their own checks behind these (they are
used without gRPC too); their configurable limits (the reranker's documents per request and tokens per
document, the retriever's documents per upsert) stay in their configs and are listed in docs/security.md's table
beside these.

Names reach disk paths (collections are directories; tenants prefix them; adapters are directories under the
adapters root), so they take a small character set. Ids are the caller's own, so any printable text without
whitespace. Enums are open in proto3: a number the schema does not define is refused here, by field.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

import grpc
from google.protobuf.message import Message

from common.names import is_adapter_name, is_tenant_name
from retriever.types import InvalidArgument
from services.errors import rewrapped
from services.gen.retrieval.v1 import document_pb2

MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # transport: set on every server and client channel
MAX_REQUEST_BYTES = 32 * 1024 * 1024  # one request's serialized size
MAX_QUERY_CHARS = 8192
MAX_TOP_K = 1000
MAX_RERANK_DEPTH = 1000
MAX_DOCUMENTS_PER_REQUEST = 10_000  # upsert and rerank (the engines' configured limits are lower by default)
MAX_IDS_PER_REQUEST = 10_000  # DeleteDocuments, GetDocuments
MAX_ID_CHARS = 256
MAX_DOCUMENT_BYTES = 1024 * 1024  # title + text + metadata, UTF-8
MAX_METADATA_ENTRIES = 64
MAX_METADATA_KEY_CHARS = 128
MAX_METADATA_VALUE_CHARS = 4096
METADATA_KEY = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


def invalid(field: str, problem: str) -> InvalidArgument:
    return InvalidArgument(f"{field}: {problem}")


def check_request(request: Message) -> None:
    """Everything here applies to every request; the per-message checks below add the rest."""
    size = request.ByteSize()
    if size > MAX_REQUEST_BYTES:
        raise invalid("request", f"{size} bytes, at most {MAX_REQUEST_BYTES}")
    check_enums(request, "")
    checker = CHECKS.get(request.DESCRIPTOR.full_name)
    if checker is not None:
        checker(request)


def check_enums(message: Message, prefix: str) -> None:
    """Every enum field (nested messages included) holds a value its enum defines."""
    for field, value in message.ListFields():
        path = f"{prefix}{field.name}"
        values: Iterable[Any] = value if field.is_repeated else [value]
        if field.enum_type is not None:
            for v in values:
                if field.enum_type.values_by_number.get(v) is None:
                    raise invalid(path, f"unknown {field.enum_type.name} value {v}")
        elif field.message_type is not None and not field.message_type.GetOptions().map_entry:
            for i, v in enumerate(values):
                check_enums(v, f"{path}[{i}]." if field.is_repeated else f"{path}.")


def check_name(field: str, name: str) -> None:
    if not is_adapter_name(name):  # collections follow the adapters' rule (common.names)
        raise invalid(field, f"1-128 of A-Z, a-z, 0-9, '_', '.', '-' (no '..'), starting with a letter or digit; "
                             f"got {_shown(name)}")


def check_tenant(field: str, tenant: str, required: bool = False) -> None:
    if (tenant or required) and not is_tenant_name(tenant):
        raise invalid(field, f"1-32 of a-z, 0-9, '_', '-', starting with a letter or digit; got {_shown(tenant)}")


def check_query(query: str) -> None:
    if not query.strip():
        raise invalid("query", "must not be empty")
    if len(query) > MAX_QUERY_CHARS:
        raise invalid("query", f"{len(query)} characters, at most {MAX_QUERY_CHARS}")


def check_range(field: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise invalid(field, f"must be in {low}..{high}, got {value}")


def check_id(field: str, value: str, required: bool = True) -> None:
    if not value:
        if required:
            raise invalid(field, "must be set")
        return
    if len(value) > MAX_ID_CHARS:
        raise invalid(field, f"{len(value)} characters, at most {MAX_ID_CHARS}")
    if not value.isprintable() or any(c.isspace() for c in value):
        raise invalid(field, "printable characters without whitespace only")


def check_documents(documents: Iterable[document_pb2.Document], ids_required: bool) -> None:
    documents = list(documents)
    if len(documents) > MAX_DOCUMENTS_PER_REQUEST:
        raise invalid("documents", f"{len(documents)} documents, at most {MAX_DOCUMENTS_PER_REQUEST}")
    for i, doc in enumerate(documents):
        field = f"documents[{i}]"
        check_id(f"{field}.id", doc.id, ids_required)
        size = doc.ByteSize()
        if size > MAX_DOCUMENT_BYTES:
            raise invalid(field, f"{size} bytes, at most {MAX_DOCUMENT_BYTES}")
        if len(doc.metadata) > MAX_METADATA_ENTRIES:
            raise invalid(f"{field}.metadata", f"{len(doc.metadata)} entries, at most {MAX_METADATA_ENTRIES}")
        for key, value in doc.metadata.items():
            if not METADATA_KEY.match(key):
                raise invalid(f"{field}.metadata", f"keys are 1-{MAX_METADATA_KEY_CHARS} of A-Z, a-z, 0-9, "
                                                   f"'_', '.', ':', '-'; got {_shown(key)}")
            if len(value) > MAX_METADATA_VALUE_CHARS:
                raise invalid(f"{field}.metadata[{key}]", f"{len(value)} characters, at most "
                                                          f"{MAX_METADATA_VALUE_CHARS}")


def _shown(value: str) -> str:
    """A bad value, quoted and cut short (an error message is no place for a megabyte of input)."""
    return repr(value[:40] + ("..." if len(value) > 40 else ""))


def _collection(request: Any) -> None:
    check_name("collection", request.collection)


def _search(request: Any) -> None:
    check_name("collection", request.collection)
    check_query(request.query)
    check_range("top_k", request.top_k, 1, MAX_TOP_K)
    check_range("rerank_depth", request.rerank_depth, 0, MAX_RERANK_DEPTH)
    check_tenant("tenant", request.tenant)
    check_weight(request, "rerank_weight")


def check_weight(request: Any, field: str) -> None:
    """An optional weight, when set, is in 0..1 (NaN is not)."""
    if request.HasField(field) and not 0.0 <= getattr(request, field) <= 1.0:
        raise invalid(field, f"must be in 0..1, got {getattr(request, field)}")


def _retrieve(request: Any) -> None:
    check_name("collection", request.collection)
    check_query(request.query)
    check_range("top_k", request.top_k, 1, MAX_TOP_K)


def _upsert(request: Any) -> None:
    check_name("collection", request.collection)
    if not request.documents:
        raise invalid("documents", "must not be empty")
    check_documents(request.documents, ids_required=True)


def _ids(request: Any) -> None:
    check_name("collection", request.collection)
    if not request.ids:
        raise invalid("ids", "must not be empty")
    if len(request.ids) > MAX_IDS_PER_REQUEST:
        raise invalid("ids", f"{len(request.ids)} ids, at most {MAX_IDS_PER_REQUEST}")
    for i, value in enumerate(request.ids):
        check_id(f"ids[{i}]", value)


def _rerank(request: Any) -> None:
    check_query(request.query)
    if not request.documents:
        raise invalid("documents", "must not be empty")
    check_documents(request.documents, ids_required=False)
    check_tenant("tenant", request.tenant)
    check_range("top_n", request.top_n, 0, MAX_DOCUMENTS_PER_REQUEST)
    if request.first_stage_scores and len(request.first_stage_scores) != len(request.documents):
        raise invalid("first_stage_scores", "must be empty or one per document")
    check_weight(request, "fusion_weight")


def _load_adapter(request: Any) -> None:
    if not request.tenant:
        raise invalid("tenant", "must not be empty (the empty tenant is the server's default)")
    check_tenant("tenant", request.tenant, required=True)
    check_name("adapter", request.adapter)


def _unload_adapter(request: Any) -> None:
    check_tenant("tenant", request.tenant, required=True)


CHECKS: dict[str, Callable[[Any], None]] = {
    "retrieval.v1.SearchRequest": _search,
    "retrieval.v1.RetrieveRequest": _retrieve,
    "retrieval.v1.CreateCollectionRequest": _collection,
    "retrieval.v1.UpdateCollectionRequest": _collection,
    "retrieval.v1.DeleteCollectionRequest": _collection,
    "retrieval.v1.UpsertDocumentsRequest": _upsert,
    "retrieval.v1.DeleteDocumentsRequest": _ids,
    "retrieval.v1.GetDocumentsRequest": _ids,
    "retrieval.v1.RerankRequest": _rerank,
    "retrieval.v1.LoadAdapterRequest": _load_adapter,
    "retrieval.v1.UnloadAdapterRequest": _unload_adapter,
}


class ValidationInterceptor(grpc.aio.ServerInterceptor):
    """check_request on every call's request before its handler (inside the error mapping, after
    authentication: an unauthenticated caller learns nothing about the limits)."""

    async def intercept_service(self, continuation: Callable[[Any], Any], handler_call_details: grpc.HandlerCallDetails
                                ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        behavior = handler.unary_unary

        async def validated(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, Message):
                check_request(request)
            return await behavior(request, context)

        return rewrapped(handler, validated)
