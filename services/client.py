"""Command-line gRPC client for the retrieval services.

    python -m services.client health --target 127.0.0.1:50050
    python -m services.client ingest --target 127.0.0.1:50051 --collection scifact \
        --corpus ../shared/data/scifact
    python -m services.client search --target 127.0.0.1:50050 --collection scifact \
        --query "..." --top-k 10 --rerank-depth 20 [--tenant acme]
    python -m services.client load-adapter --target 127.0.0.1:50052 --tenant acme --adapter scifact-lora
    python -m services.client get --target 127.0.0.1:50051 --collection scifact --ids 4983 5836
    python -m services.client adapters --target 127.0.0.1:50052   # a gateway's: the registry and every replica
    python -m services.client unload-adapter --target 127.0.0.1:50052 --tenant acme
Adapter commands take --admin-token (or env RERANKER_ADMIN_TOKEN) when the server requires one.
Over TLS, before the subcommand: --ca PEM (the servers' CA), and --cert PEM --key PEM for mutual TLS
(or env RETRIEVAL_CA, RETRIEVAL_CERT, RETRIEVAL_KEY); --server-name NAME when the target's host is not
a name in the server's certificate. With API keys (servers started with --keys-file): env RETRIEVAL_API_KEY
(or --api-key, before the subcommand).
Add --json (before the subcommand) for machine-readable output.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Set
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tqdm.auto import tqdm

from common.beir import count_corpus, iter_corpus
from services.convert import document_to_pb
from services.gen.retrieval.v1 import (
    adapter_pb2,
    adapter_pb2_grpc,
    document_pb2,
    retriever_pb2,
    retriever_pb2_grpc,
    search_pb2,
    search_pb2_grpc,
)
from services.server import GRPC_OPTIONS
from services.tls import ClientTls, add_tls_arguments, client_tls
from services.tls import channel as tls_channel

INDEX_TYPES = {"flat": retriever_pb2.INDEX_TYPE_FLAT, "hnsw": retriever_pb2.INDEX_TYPE_HNSW}


def channel(target: str, tls: ClientTls | None = None, api_key: str = "") -> grpc.Channel:
    return tls_channel(target, tls, GRPC_OPTIONS, api_key)


def health_status(target: str, service: str = "", timeout: float = 2.0, tls: ClientTls | None = None) -> str:
    """SERVING / NOT_SERVING / ... or UNREACHABLE (health needs no API key)."""
    with channel(target, tls) as ch:
        try:
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service),
                                                         timeout=timeout)
        except grpc.RpcError:
            return "UNREACHABLE"
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def wait_for_serving(target: str, timeout: float = 300.0, alive: Callable[[], bool] = lambda: True,
                     tls: ClientTls | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if health_status(target, tls=tls) == "SERVING":
            return
        if not alive():
            raise RuntimeError(f"server for {target} exited before it was SERVING")
        time.sleep(0.5)
    raise TimeoutError(f"{target} not SERVING after {timeout:.0f}s")


def _batched(items: Iterable[document_pb2.Document], size: int) -> Iterator[list[document_pb2.Document]]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


@dataclass
class Ingested:
    upserted: int
    skipped: list[str]  # ids of empty documents (neither title nor text), not stored


def ingest_corpus(target: str, collection: str, corpus: Path, batch_size: int = 256, create: bool = True,
                  index_type: str = "flat", progress: bool = True, timeout: float = 600.0,
                  tls: ClientTls | None = None, api_key: str = "") -> Ingested:
    """Upsert a BEIR corpus.jsonl (or the directory holding it) into a collection."""
    data_dir = corpus.parent if corpus.is_file() else corpus
    with channel(target, tls, api_key) as ch:
        stub = retriever_pb2_grpc.RetrieverServiceStub(ch)
        if create:
            try:
                stub.CreateCollection(retriever_pb2.CreateCollectionRequest(
                    collection=collection, index_type=INDEX_TYPES[index_type]), timeout=30)
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.ALREADY_EXISTS:
                    raise
        result = Ingested(0, [])
        bar = tqdm(total=count_corpus(data_dir), desc=f"ingest {collection}", unit="doc", disable=not progress)
        docs = (document_to_pb(d) for d in iter_corpus(data_dir))
        for batch in _batched(docs, batch_size):
            reply = stub.UpsertDocuments(retriever_pb2.UpsertDocumentsRequest(collection=collection,
                                                                              documents=batch), timeout=timeout)
            result.upserted += reply.upserted_count
            result.skipped += list(reply.skipped_ids)
            bar.update(len(batch))
        bar.close()
    return result


def collection_size(target: str, collection: str, tls: ClientTls | None = None, api_key: str = "") -> int | None:
    with channel(target, tls, api_key) as ch:
        reply = retriever_pb2_grpc.RetrieverServiceStub(ch).ListCollections(
            retriever_pb2.ListCollectionsRequest(), timeout=10)
    sizes = {c.name: c.document_count for c in reply.collections}
    return sizes.get(collection)


def search(target: str, collection: str, query: str, top_k: int = 10, rerank_depth: int = 0, tenant: str = "",
           timeout: float = 120.0, mode: document_pb2.RetrievalMode = document_pb2.RETRIEVAL_MODE_UNSPECIFIED,
           tls: ClientTls | None = None, api_key: str = "", rerank_weight: float | None = None
           ) -> search_pb2.SearchResponse:
    with channel(target, tls, api_key) as ch:
        return search_pb2_grpc.SearchServiceStub(ch).Search(search_pb2.SearchRequest(
            collection=collection, query=query, top_k=top_k, rerank_depth=rerank_depth, tenant=tenant, mode=mode,
            rerank_weight=rerank_weight), timeout=timeout)


def format_search(response: search_pb2.SearchResponse, query: str, relevant: Set[str] = frozenset()) -> str:
    t = response.timings
    mode = "reranked" if response.reranked else "first stage"
    lines = [f"query: {query}", f"{len(response.results)} results ({mode}; retrieve {t.retrieve_ms:.0f} ms, "
             f"rerank {t.rerank_ms:.0f} ms, total {t.total_ms:.0f} ms)"]
    if response.rerank_skipped_reason:
        lines.append(f"rerank skipped: {response.rerank_skipped_reason}")
    elif response.HasField("rerank_weight"):
        source = document_pb2.RerankWeightSource.Name(response.rerank_weight_source)
        lines.append(f"reranker weight {response.rerank_weight:.2f} "
                     f"({source.removeprefix('RERANK_WEIGHT_SOURCE_').lower()})")
    for rank, hit in enumerate(response.results, 1):
        mark = " *relevant*" if hit.document.id in relevant else ""
        rerank = f" rerank={hit.rerank_score:.3f}" if response.reranked else ""
        title = hit.document.title or hit.document.text[:80]
        lines.append(f"{rank:>3}. [{hit.document.id}] retrieval={hit.retrieval_score:.3f}{rerank}{mark}\n"
                     f"     {title[:100]}")
    return "\n".join(lines)


def _emit(args: argparse.Namespace, payload: Message | dict[str, object], text: str) -> None:
    if args.json:
        data = MessageToDict(payload, preserving_proto_field_name=True) if isinstance(payload, Message) \
            else payload
        print(json.dumps(data, indent=2, ensure_ascii=False))
    else:
        print(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    add_tls_arguments(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("health", help="health status of a server")
    p.add_argument("--target", required=True)
    p.add_argument("--service", default="")
    p = sub.add_parser("collections", help="list collections")
    p.add_argument("--target", required=True)
    p = sub.add_parser("get", help="documents of a collection by id")
    p.add_argument("--target", required=True)
    p.add_argument("--collection", required=True)
    p.add_argument("--ids", required=True, nargs="+")
    p = sub.add_parser("create", help="create a collection")
    p.add_argument("--target", required=True)
    p.add_argument("--collection", required=True)
    p.add_argument("--index", choices=sorted(INDEX_TYPES), default="flat")
    p = sub.add_parser("delete-collection", help="delete a collection")
    p.add_argument("--target", required=True)
    p.add_argument("--collection", required=True)
    p = sub.add_parser("ingest", help="upsert a BEIR corpus.jsonl")
    p.add_argument("--target", required=True)
    p.add_argument("--collection", required=True)
    p.add_argument("--corpus", required=True, type=Path, help="corpus.jsonl or the BEIR directory")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--index", choices=sorted(INDEX_TYPES), default="flat")
    p = sub.add_parser("search", help="search through the gateway")
    p.add_argument("--target", required=True)
    p.add_argument("--collection", required=True)
    p.add_argument("--query", required=True)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--rerank-depth", type=int, default=0)
    p.add_argument("--rerank-weight", type=float, default=None,
                   help="the reranker's weight against the first stage, 0..1 (default: the collection's, the "
                        "adapter's or the default model's)")
    p.add_argument("--tenant", default="")
    for command, text in [("adapters", "tenants, blocks and memory of a reranker"),
                          ("load-adapter", "serve an adapter (by name) for a tenant"),
                          ("unload-adapter", "stop serving a tenant")]:
        p = sub.add_parser(command, help=text)
        p.add_argument("--target", required=True, help="a reranker, or the gateway (the whole deployment)")
        p.add_argument("--admin-token", default=os.environ.get("RERANKER_ADMIN_TOKEN", ""))
        if command != "adapters":
            p.add_argument("--tenant", required=True)
        if command == "load-adapter":
            p.add_argument("--adapter", required=True, help="adapter name under the server's adapters root")
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except grpc.RpcError as err:
        print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    args.tls = client_tls(args)
    return COMMANDS[args.command](args)


def _health(args: argparse.Namespace) -> int:
    status = health_status(args.target, args.service, tls=args.tls)
    _emit(args, {"target": args.target, "status": status}, f"{args.target}: {status}")
    return 0 if status == "SERVING" else 1


def _search(args: argparse.Namespace) -> int:
    response = search(args.target, args.collection, args.query, args.top_k, args.rerank_depth, args.tenant,
                      tls=args.tls, api_key=args.api_key, rerank_weight=args.rerank_weight)
    _emit(args, response, format_search(response, args.query))
    return 0


def _ingest(args: argparse.Namespace) -> int:
    result = ingest_corpus(args.target, args.collection, args.corpus, args.batch_size,
                           index_type=args.index, progress=not args.json, tls=args.tls, api_key=args.api_key)
    skipped = f"; skipped {len(result.skipped)} empty documents: {', '.join(result.skipped)}" if result.skipped else ""
    _emit(args, {"collection": args.collection, "upserted": result.upserted, "skipped_empty": result.skipped},
          f"upserted {result.upserted} documents{skipped}")
    return 0


def _collections(args: argparse.Namespace) -> int:
    with channel(args.target, args.tls, args.api_key) as ch:
        reply = retriever_pb2_grpc.RetrieverServiceStub(ch).ListCollections(
            retriever_pb2.ListCollectionsRequest(), timeout=10)
    text = "\n".join(f"{c.name}: {c.document_count} docs, dim {c.dimension}, "
                     f"{retriever_pb2.IndexType.Name(c.index_type)}" for c in reply.collections)
    _emit(args, reply, text or "no collections")
    return 0


def _get(args: argparse.Namespace) -> int:
    with channel(args.target, args.tls, args.api_key) as ch:
        reply = retriever_pb2_grpc.RetrieverServiceStub(ch).GetDocuments(
            retriever_pb2.GetDocumentsRequest(collection=args.collection, ids=args.ids), timeout=30)
    lines = [f"[{d.id}] {d.title or d.text[:80]}" for d in reply.documents]
    lines += [f"missing: {', '.join(reply.missing_ids)}"] if reply.missing_ids else []
    _emit(args, reply, "\n".join(lines))
    return 0 if not reply.missing_ids else 1


def _create(args: argparse.Namespace) -> int:
    with channel(args.target, args.tls, args.api_key) as ch:
        reply = retriever_pb2_grpc.RetrieverServiceStub(ch).CreateCollection(retriever_pb2.CreateCollectionRequest(
            collection=args.collection, index_type=INDEX_TYPES[args.index]), timeout=30)
    _emit(args, reply, f"created {reply.collection.name}")
    return 0


def _delete_collection(args: argparse.Namespace) -> int:
    with channel(args.target, args.tls, args.api_key) as ch:
        reply = retriever_pb2_grpc.RetrieverServiceStub(ch).DeleteCollection(
            retriever_pb2.DeleteCollectionRequest(collection=args.collection), timeout=30)
    _emit(args, reply, f"deleted {args.collection}")
    return 0


def _admin_metadata(args: argparse.Namespace) -> tuple[tuple[str, str], ...]:
    """The reranker's admin token (servers without a keys file); an API key, when given, is sent instead."""
    return (("authorization", f"Bearer {args.admin_token}"),) if args.admin_token and not args.api_key else ()


def _load_adapter(args: argparse.Namespace) -> int:
    with channel(args.target, args.tls, args.api_key) as ch:
        reply = adapter_pb2_grpc.AdapterServiceStub(ch).LoadAdapter(
            adapter_pb2.LoadAdapterRequest(tenant=args.tenant, adapter=args.adapter), timeout=60,
            metadata=_admin_metadata(args))
    a = reply.adapter
    _emit(args, reply, f"tenant {a.tenant}: {a.adapter} in {reply.load_ms:.1f} ms, "
                       f"{a.own_blocks} own blocks ({a.own_bytes / 2**20:.1f} MiB), {a.shared_blocks} shared")
    return 0


def _unload_adapter(args: argparse.Namespace) -> int:
    with channel(args.target, args.tls, args.api_key) as ch:
        reply = adapter_pb2_grpc.AdapterServiceStub(ch).UnloadAdapter(
            adapter_pb2.UnloadAdapterRequest(tenant=args.tenant), timeout=30, metadata=_admin_metadata(args))
    _emit(args, reply, f"unloaded {args.tenant}, freed {reply.freed_bytes / 2**20:.1f} MiB")
    return 0


def _adapters(args: argparse.Namespace) -> int:
    with channel(args.target, args.tls, args.api_key) as ch:
        reply = adapter_pb2_grpc.AdapterServiceStub(ch).ListAdapters(
            adapter_pb2.ListAdaptersRequest(), timeout=30, metadata=_admin_metadata(args))
    m = reply.memory
    lines = [f"base {m.base_bytes / 2**20:.1f} MiB (shared by all), tenant blocks "
             f"{m.tenant_bytes / 2**20:.1f} MiB of {m.budget_bytes / 2**20:.0f} MiB budget, "
             f"prefix cache {m.prefix_cache_bytes / 2**20:.1f} MiB, evictions {m.evictions}, reloads {m.reloads}"]
    lines += [f"  {a.tenant or '(default)'}: {a.adapter}, layer {a.scoring_layer}, {a.own_blocks} own blocks "
              f"({a.own_bytes / 2**20:.1f} MiB){'' if a.resident else ', evicted'}" for a in reply.adapters]
    lines += [f"  decision {d.tenant} layer {d.layer}: {'use' if d.accepted else 'keep own, not'} "
              f"{d.replacement_kind} block ({d.reason})" for d in reply.decisions]
    lines.append("available: " + (", ".join(reply.available) or "none"))
    lines += _replica_lines(reply)
    _emit(args, reply, "\n".join(lines))
    return 0


def _replica_lines(reply: adapter_pb2.ListAdaptersResponse) -> list[str]:
    """From a gateway: the registry's bindings and every reranker replica's resident tenants."""
    if not reply.replicas:
        return []
    lines = [f"registry: {len(reply.bindings)} tenants bound"]
    lines += [f"  {b.tenant}: {b.adapter}" for b in reply.bindings]
    width = max(len(r.address) for r in reply.replicas)
    lines.append(f"replicas: {len(reply.replicas)}")
    for r in reply.replicas:
        if r.error:
            lines.append(f"  {r.address:<{width}}  error: {r.error}")
            continue
        tenants = ", ".join(t or "(default)" for t in r.resident_tenants) or "none"
        lines.append(f"  {r.address:<{width}}  {len(r.resident_tenants)} tenants resident, "
                     f"{r.tenant_bytes / 2**20:.1f} MiB: {tenants}")
    return lines


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "health": _health, "search": _search, "ingest": _ingest, "collections": _collections, "get": _get, "create": _create,
    "delete-collection": _delete_collection, "adapters": _adapters, "load-adapter": _load_adapter,
    "unload-adapter": _unload_adapter,
}


if __name__ == "__main__":
    sys.exit(main())
