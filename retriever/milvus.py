"""Milvus as a storage backend (`retriever.backend`): Milvus Lite in a file (uri ending `.db`) or a Milvus
standalone/cluster (`http://host:19530`), through pymilvus's MilvusClient.

One Milvus collection per collection of ours, named by `milvus_name` (Milvus allows only [A-Za-z0-9_],
starting with a letter or `_`, at most 255 characters; ours may hold `.` and `-` and start with a digit):
a `rt_` prefix, letters and digits as they are, and `_` as an escape: `__` `_d` `_h` for one `_` `.` `-`,
and `_A`..`_I` for a pair of them (so 128 characters of ours never exceed 132 of Milvus's). The encoding
is prefix-free, hence reversible and collision-free. Our CollectionSpec is a collection property
(`retriever.spec`, JSON); `load_all` opens the collections that carry it and ignores all others.

Schema, and why:
- `id` VARCHAR primary key, 2048 bytes: 512 characters of up to 4 UTF-8 bytes.
- `title`, `text`: ARRAY of VARCHAR chunks of at most 65,535 UTF-8 bytes (Milvus's VARCHAR limit), cut
  on character boundaries and joined on read: documents of up to 1,000,000 characters round-trip exactly.
- `metadata` JSON; `dense` FLOAT_VECTOR, metric IP: FLAT (exact, as FAISS IndexFlatIP) or HNSW with the
  spec's M / efConstruction and ef = max(ef_search, k) at search time.
- `content` VARCHAR: the BM25 input, already analysed here by the default backend's own analyzer
  (`retriever.lexical`: tantivy simple tokenizer, long-token filter, lower-case, English stemmer), tokens
  joined by spaces, with Milvus's `standard` tokenizer splitting them again. Milvus Lite has no English
  stemmer (its analyzers are a `\\w+` regex and jieba), and analysing in one place gives the same terms on
  both backends and on every Milvus. Milvus's BM25 Function turns it into `sparse` (SPARSE_FLOAT_VECTOR,
  BM25, k1 1.2, b 0.75 as tantivy). A document whose analysed text passes 65,535 bytes is indexed for BM25
  on its leading terms only (logged); title and text are still stored whole.

Every write and read is Strong consistency: an acknowledged upsert or delete is seen by the next search
and get. Filters are built here with each id escaped as a string literal (`quote`): pymilvus's own
`get(ids=)`, `delete(ids=)` and `query_iterator` paste ids between quotes unescaped, which breaks on (or
is steered by) an id holding `"` or `\\`; `export` therefore pages by primary key itself, as
query_iterator does. Writes to one collection are serialised in this process (delete reads then deletes).
A write larger than one request (about 32 MiB) goes in several, each atomic on its own: a crash between them
leaves the earlier ones applied (the local backend's writes are all or nothing).

Milvus Lite 3.2 (pure Python, in-process) differs from Milvus: its write-ahead log is flushed but not
fsynced per write (a process crash loses nothing, a power cut may); its BM25 statistics are per segment
(exact while a collection fits its 128 MB memtable and one segment); and every BM25 search rebuilds the
memtable's inverted index (0.8 s a query with SciFact's 5K documents unflushed, 33 ms after a restart).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from pymilvus import DataType, Function, FunctionType, MilvusClient  # type: ignore[import-untyped]

from common.types import Document
from retriever.backend import Ranked
from retriever.fusion import FusionSettings, RetrievalMode
from retriever.lexical import analyze, query_terms
from retriever.types import (
    CollectionExists,
    CollectionSpec,
    CollectionStats,
    IndexKind,
    spec_from_json,
    spec_to_json,
)

log = logging.getLogger(__name__)
SPEC_PROPERTY = "retriever.spec"
PREFIX = "rt_"
VARCHAR_MAX_BYTES = 65_535
ID_MAX_BYTES = 2048
MAX_CHUNKS = 4096  # Milvus's largest ARRAY capacity
MAX_TOP_K = 16_384  # Milvus's largest search limit and query page
_WRITE_BATCH_CHARS = 8 << 20  # per upsert request: at most 32 MiB of UTF-8, under gRPC's 64 MiB
_IDS_PER_FILTER = 1000
_FIELDS = ["id", "title", "text", "metadata"]
_STRONG = {"consistency_level": "Strong"}

_SPECIALS = "_.-"
_SINGLE = {"_": "_", ".": "d", "-": "h"}
_PAIR = {a + b: "ABCDEFGHI"[3 * i + j] for i, a in enumerate(_SPECIALS) for j, b in enumerate(_SPECIALS)}
_DECODE = {code: text for text, code in (_SINGLE | _PAIR).items()}


def milvus_name(name: str) -> str:
    """Our collection name as a Milvus collection name (see the module docstring)."""
    out, i = [PREFIX], 0
    while i < len(name):
        if name[i:i + 2] in _PAIR:
            out.append("_" + _PAIR[name[i:i + 2]])
            i += 2
        else:
            out.append("_" + _SINGLE[name[i]] if name[i] in _SINGLE else name[i])
            i += 1
    return "".join(out)


def our_name(milvus: str) -> str | None:
    """The inverse of `milvus_name`; None for a name it cannot have produced."""
    if not milvus.startswith(PREFIX):
        return None
    out, i, body = [], 0, milvus[len(PREFIX):]
    while i < len(body):
        if body[i] == "_":
            if body[i + 1:i + 2] not in _DECODE:
                return None
            out.append(_DECODE[body[i + 1]])
            i += 2
        elif body[i].isascii() and body[i].isalnum():
            out.append(body[i])
            i += 1
        else:
            return None
    return "".join(out) or None


_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def quote(value: str) -> str:
    """`value` as a double-quoted Milvus string literal (the escapes both Milvus and Milvus Lite read)."""
    return '"' + "".join(_ESCAPES.get(c, c) for c in value) + '"'


def ids_filter(ids: Sequence[str]) -> str:
    return f"id in [{', '.join(quote(i) for i in ids)}]"


def split_utf8(text: str, max_bytes: int = VARCHAR_MAX_BYTES) -> list[str]:
    """`text` in pieces of at most `max_bytes` UTF-8 bytes, cut between characters."""
    data, parts, start = text.encode("utf-8"), [], 0
    while start < len(data):
        end = min(start + max_bytes, len(data))
        while end < len(data) and data[end] & 0xC0 == 0x80:  # a continuation byte: back to a boundary
            end -= 1
        parts.append(data[start:end].decode("utf-8"))
        start = end
    return parts


def lexical_content(doc: Document) -> str:
    """The analysed terms of title + text, space-joined, cut to fit one VARCHAR (at a term boundary)."""
    content = " ".join(analyze(doc.embedding_text()))
    data = content.encode("utf-8")
    if len(data) <= VARCHAR_MAX_BYTES:
        return content
    log.warning("document %r: BM25 indexes its first %d bytes of terms of %d", doc.id, VARCHAR_MAX_BYTES,
                len(data))
    return data[:VARCHAR_MAX_BYTES + 1].decode("utf-8", "ignore").rsplit(" ", 1)[0]


def _schema(spec: CollectionSpec) -> Any:
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=ID_MAX_BYTES)
    for name in ("title", "text"):
        schema.add_field(name, DataType.ARRAY, element_type=DataType.VARCHAR, max_capacity=MAX_CHUNKS,
                         max_length=VARCHAR_MAX_BYTES)
    schema.add_field("metadata", DataType.JSON)
    schema.add_field("dense", DataType.FLOAT_VECTOR, dim=spec.dimension)
    schema.add_field("content", DataType.VARCHAR, max_length=VARCHAR_MAX_BYTES, enable_analyzer=True,
                     analyzer_params={"tokenizer": "standard"})
    schema.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
    schema.add_function(Function(name="bm25", function_type=FunctionType.BM25, input_field_names=["content"],
                                 output_field_names=["sparse"]))
    return schema


def _index_params(spec: CollectionSpec) -> Any:
    """Build parameters go nested under "params": pymilvus 3 sends them flattened, which Milvus reads but
    Milvus Lite 3.2 silently ignores (BM25 would run with k1 1.5, HNSW with its own M). Milvus documents the
    nested form as well; not verified against a Milvus server here (none runs on these machines)."""
    params = MilvusClient.prepare_index_params()
    if spec.index is IndexKind.HNSW:
        params.add_index("dense", index_type="HNSW", metric_type="IP",
                         params={"params": {"M": spec.hnsw.m, "efConstruction": spec.hnsw.ef_construction}})
    else:
        params.add_index("dense", index_type="FLAT", metric_type="IP")
    params.add_index("sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="BM25",
                     params={"params": {"bm25_k1": 1.2, "bm25_b": 0.75}})
    return params


def _row(doc: Document, vector: np.ndarray) -> dict[str, Any]:
    return {"id": doc.id, "title": split_utf8(doc.title), "text": split_utf8(doc.text),
            "metadata": dict(doc.metadata), "dense": vector.astype(np.float32).tolist(),
            "content": lexical_content(doc)}


def _document(row: dict[str, Any]) -> Document:
    return Document(id=row["id"], title="".join(row["title"] or []), text="".join(row["text"] or []),
                    metadata={str(k): str(v) for k, v in (row["metadata"] or {}).items()})


def _batches(rows: list[dict[str, Any]], max_chars: int = _WRITE_BATCH_CHARS) -> Iterator[list[dict[str, Any]]]:
    """Rows in requests of about `max_chars` characters of text (and the vectors' bytes)."""
    batch: list[dict[str, Any]] = []
    size = 0
    for row in rows:
        row_size = len(row["content"]) + sum(map(len, row["title"])) + sum(map(len, row["text"])) + 4 * len(row["dense"])
        if batch and size + row_size > max_chars:
            yield batch
            batch, size = [], 0
        batch.append(row)
        size += row_size
    if batch:
        yield batch


def _chunks(ids: Sequence[str], size: int = _IDS_PER_FILTER) -> Iterator[Sequence[str]]:
    for start in range(0, len(ids), size):
        yield ids[start:start + size]


class MilvusCollection:
    """`retriever.backend.StoredCollection` over one Milvus collection."""

    def __init__(self, client: Any, spec: CollectionSpec) -> None:
        self.client = client
        self.spec = spec
        self.milvus_name = milvus_name(spec.name)
        self._write_lock = threading.Lock()

    def stats(self) -> CollectionStats:
        rows = self.client.query(self.milvus_name, filter="", output_fields=["count(*)"], **_STRONG)
        return CollectionStats(spec=self.spec, document_count=int(rows[0]["count(*)"]))

    def upsert(self, documents: Sequence[Document], vectors: np.ndarray) -> None:
        if len(documents) != len(vectors):
            raise ValueError(f"{len(documents)} documents but {len(vectors)} vectors")
        latest = {doc.id: i for i, doc in enumerate(documents)}  # one row per id per request: the last wins
        rows = [_row(documents[i], vectors[i]) for i in sorted(latest.values())]
        with self._write_lock:
            for batch in _batches(rows):
                self.client.upsert(self.milvus_name, batch)

    def delete(self, ids: Sequence[str]) -> list[str]:
        wanted = list(dict.fromkeys(ids))
        with self._write_lock:
            present = {row["id"] for row in self._query_ids(wanted, ["id"])}
            found = [i for i in wanted if i in present]
            for chunk in _chunks(found):
                self.client.delete(self.milvus_name, filter=ids_filter(chunk))
        return found

    def get(self, ids: Sequence[str]) -> list[Document]:
        wanted = list(dict.fromkeys(ids))
        rows = {row["id"]: row for row in self._query_ids(wanted, _FIELDS)}
        return [_document(rows[i]) for i in wanted if i in rows]

    def search_dense(self, query_vectors: np.ndarray, k: int) -> list[Ranked]:
        if len(query_vectors) == 0:
            return []
        if k < 1:
            return [[] for _ in range(len(query_vectors))]
        k = min(k, MAX_TOP_K)
        params: dict[str, Any] = {"metric_type": "IP"}
        if self.spec.index is IndexKind.HNSW:
            params["params"] = {"ef": max(self.spec.hnsw.ef_search, k)}
        results = self.client.search(self.milvus_name, data=np.asarray(query_vectors, np.float32).tolist(),
                                     anns_field="dense", limit=k, search_params=params, output_fields=["id"],
                                     **_STRONG)
        return [[(hit["id"], float(hit["distance"])) for hit in hits] for hits in results]

    def search_lexical(self, query: str, k: int) -> Ranked:
        """abs(): Milvus returns the BM25 score, Milvus Lite 3.2 its negation (scores are never negative)."""
        terms = query_terms(query)
        if not terms or k < 1:
            return []
        results = self.client.search(self.milvus_name, data=[" ".join(terms)], anns_field="sparse",
                                     limit=min(k, MAX_TOP_K), search_params={"metric_type": "BM25"},
                                     output_fields=["id"], **_STRONG)
        return [(hit["id"], abs(float(hit["distance"]))) for hit in results[0]]

    def update_settings(self, default_mode: RetrievalMode | None, fusion: FusionSettings | None) -> None:
        with self._write_lock:
            spec = replace(self.spec, default_mode=default_mode or self.spec.default_mode,
                           fusion=fusion or self.spec.fusion)
            self.client.alter_collection_properties(self.milvus_name, properties=_spec_property(spec))
            self.spec = spec

    def export(self, batch_size: int) -> Iterator[tuple[list[Document], np.ndarray]]:
        """Pages in primary-key order, each after the last id seen (query_iterator's protocol, escaped)."""
        last: str | None = None
        while True:
            rows = self.client.query(self.milvus_name, filter="" if last is None else f"id > {quote(last)}",
                                     output_fields=[*_FIELDS, "dense"], limit=min(max(1, batch_size), MAX_TOP_K),
                                     iterator="True", **_STRONG)
            if not rows or rows[-1]["id"] == last:
                return
            last = rows[-1]["id"]
            vectors = np.asarray([row["dense"] for row in rows], dtype=np.float32).reshape(-1, self.spec.dimension)
            yield [_document(row) for row in rows], vectors

    def close(self) -> None:
        """Nothing held per collection: the backend owns the connection."""

    def _query_ids(self, ids: Sequence[str], fields: list[str]) -> Iterable[dict[str, Any]]:
        for chunk in _chunks(ids):
            yield from self.client.query(self.milvus_name, filter=ids_filter(chunk), output_fields=fields,
                                         **_STRONG)


def _spec_property(spec: CollectionSpec) -> dict[str, str]:
    return {SPEC_PROPERTY: json.dumps(spec_to_json(spec), sort_keys=True)}


class MilvusBackend:
    """`retriever.backend.Backend` on one Milvus database. A Milvus Lite file is served by an in-process
    server that `close` stops (one backend per file per process: Lite locks its data directory)."""

    name = "milvus"

    def __init__(self, uri: str, token: str = "") -> None:
        self.uri = uri
        self.lite = uri.endswith(".db")
        if self.lite:
            Path(uri).parent.mkdir(parents=True, exist_ok=True)
        self.client = MilvusClient(uri=uri, token=token)

    def load_all(self) -> list[MilvusCollection]:
        opened = []
        for name in sorted(self.client.list_collections()):
            spec = self._stored_spec(name)
            if spec is not None:
                self.client.load_collection(name)  # a no-op when loaded; a server may have released it
                opened.append(MilvusCollection(self.client, spec))
        return opened

    def create(self, spec: CollectionSpec) -> MilvusCollection:
        name = milvus_name(spec.name)
        if self.client.has_collection(name):
            raise CollectionExists(f"Milvus collection {name} (for {spec.name!r}) already exists")
        self.client.create_collection(name, schema=_schema(spec), index_params=_index_params(spec),
                                      properties=_spec_property(spec), **_STRONG)
        return MilvusCollection(self.client, spec)

    def drop(self, collection: Any) -> None:
        assert isinstance(collection, MilvusCollection)
        collection.close()
        self.client.drop_collection(collection.milvus_name)

    def close(self) -> None:
        self.client.close()
        if self.lite:
            from milvus_lite import server_manager_instance  # type: ignore[import-untyped]

            server_manager_instance.release_server(self.uri)

    def _stored_spec(self, name: str) -> CollectionSpec | None:
        """The spec a collection of ours carries; None for any other collection (left alone)."""
        ours = our_name(name)
        if ours is None:
            return None
        stored = self.client.describe_collection(name).get("properties", {}).get(SPEC_PROPERTY)
        if not stored:
            return None
        spec = spec_from_json(json.loads(stored))
        if spec.name != ours:
            log.warning("Milvus collection %s carries the spec of %r: ignored", name, spec.name)
            return None
        return spec
