"""Load test for SearchService (or RerankerService alone), on this machine only.

    python -m services.loadtest --target 127.0.0.1:50050 --collection scifact \
        --queries ../shared/data/scifact [--rerank-depth 0] [--concurrency 1,4,8] \
        [--requests 200] [--duration-s 60] --out bench-results/load.json

    python -m services.loadtest --service reranker --target 127.0.0.1:50052 \
        --queries ../shared/data/scifact --docs-per-request 20 --concurrency 1,2,4 \
        --requests 50 --out bench-results/reranker-load.json

Real queries come from the BEIR `queries.jsonl` under --queries (the directory, or
the file itself); in reranker mode the documents come from `corpus.jsonl` there
(or under --corpus). At each concurrency level, that many workers share one
grpc.aio channel and send requests back to back until --requests have been sent
or --duration-s has passed, whichever comes first (requests in flight then are
awaited, each bounded by --timeout-s). Each level reports throughput (successful
responses per second of wall time), client-side latency p50/p95/p99 in ms (over
successful responses), errors by gRPC status code, and the means of the
server-reported `timings` (retrieve_ms / rerank_ms / total_ms for Search;
queue_ms / model_ms / total_ms for Rerank).

Safety: the target must be HOST:PORT whose host is, or resolves only to, a
loopback address (127.0.0.0/8, localhost, ::1). Anything else is refused before
any connection is made, and the channel is opened to the resolved loopback
address, not the name. Writes JSON to --out and a PNG (throughput and p50/p99
latency against concurrency) beside it, and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import ipaddress
import itertools
import json
import math
import platform
import socket
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import Message
from tqdm.auto import tqdm

from retriever.beir import iter_corpus, load_queries
from services.convert import document_to_pb
from services.gen.retrieval.v1 import (
    document_pb2,
    reranker_pb2,
    reranker_pb2_grpc,
    search_pb2,
    search_pb2_grpc,
)
from services.server import GRPC_OPTIONS

SEARCH_TIMINGS = ("retrieve_ms", "rerank_ms", "total_ms")
RERANK_TIMINGS = ("queue_ms", "model_ms", "total_ms")
OK = "OK"


class LoadTestError(Exception):
    """A problem with the arguments or inputs; reported without a traceback."""


class NotLoopbackError(LoadTestError):
    """The target is not on this machine's loopback interface."""


# --- target safety -----------------------------------------------------------------------------------------


def split_target(target: str) -> tuple[str, int]:
    """HOST:PORT or [IPv6]:PORT -> (host, port). gRPC URI schemes (dns:, unix:, ...) are not accepted."""
    if "/" in target or target.split(":", 1)[0] in {"dns", "unix", "unix-abstract", "ipv4", "ipv6", "vsock"}:
        raise NotLoopbackError(f"target {target!r}: give a plain HOST:PORT (e.g. 127.0.0.1:50050)")
    if target.startswith("["):
        host, bracket, rest = target[1:].partition("]")
        port = rest[1:] if bracket and rest.startswith(":") else ""
    else:
        host, _, port = target.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise NotLoopbackError(f"target {target!r}: expected HOST:PORT with a port in 1..65535")
    return host, int(port)


def _as_ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def resolve_addresses(host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The addresses `host` stands for: itself when it is an IP literal, else what the resolver says."""
    try:
        return [_as_ip(host)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise NotLoopbackError(f"cannot resolve {host!r} ({err}); load tests only target loopback") from None
    return sorted({_as_ip(str(info[4][0])) for info in infos}, key=lambda ip: (ip.version, int(ip)))


def loopback_target(target: str) -> str:
    """Check that `target` is on loopback and return it pinned to one resolved loopback address.

    Raises NotLoopbackError for anything else, before any connection is attempted."""
    host, port = split_target(target)
    addresses = resolve_addresses(host, port)
    outside = [str(ip) for ip in addresses if not ip.is_loopback]
    if not addresses or outside:
        raise NotLoopbackError(
            f"refusing to load-test {target!r}: it resolves to {', '.join(outside) or 'nothing'}, not a loopback "
            "address. Load tests here may only target this machine (127.0.0.0/8, localhost or [::1]).")
    chosen = addresses[0]  # IPv4 first: servers here bind 127.0.0.1
    return f"{chosen}:{port}" if chosen.version == 4 else f"[{chosen}]:{port}"


# --- workloads ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Workload:
    """What one request is: the RPC to call, how to build request i, which server timings to average."""

    name: str
    rpc: Callable[..., Awaitable[Message]]
    make_request: Callable[[int], Message]
    timing_fields: tuple[str, ...]


def read_queries(path: Path, limit: int = 0) -> list[str]:
    """Query texts from a BEIR directory (or its queries.jsonl), in file order."""
    data_dir = _beir_dir(path, "queries.jsonl")
    texts = [q for q in load_queries(data_dir).values() if q.strip()]
    if not texts:
        raise LoadTestError(f"no queries in {data_dir / 'queries.jsonl'}")
    return texts[:limit] if limit > 0 else texts


def read_documents(path: Path, count: int) -> list[document_pb2.Document]:
    """The first `count` documents of a BEIR corpus.jsonl."""
    data_dir = _beir_dir(path, "corpus.jsonl")
    docs = [document_to_pb(d) for d in itertools.islice(iter_corpus(data_dir), count)]
    if not docs:
        raise LoadTestError(f"no documents in {data_dir / 'corpus.jsonl'}")
    return docs


def _beir_dir(path: Path, file_name: str) -> Path:
    if path.is_file():
        if path.name != file_name:
            raise LoadTestError(f"{path}: expected a BEIR directory or its {file_name}")
        return path.parent
    if not (path / file_name).is_file():
        raise LoadTestError(f"{path / file_name} not found")
    return path


def search_workload(channel: grpc.aio.Channel, queries: Sequence[str], collection: str, top_k: int,
                    rerank_depth: int, tenants: Sequence[str] = ("",)) -> Workload:
    stub = search_pb2_grpc.SearchServiceStub(channel)

    def make(i: int) -> search_pb2.SearchRequest:
        return search_pb2.SearchRequest(collection=collection, query=queries[i % len(queries)], top_k=top_k,
                                        rerank_depth=rerank_depth, tenant=tenants[i % len(tenants)])

    return Workload("search", stub.Search, make, SEARCH_TIMINGS)


def rerank_workload(channel: grpc.aio.Channel, queries: Sequence[str], documents: Sequence[document_pb2.Document],
                    docs_per_request: int, tenants: Sequence[str] = ("",)) -> Workload:
    """Request i reranks a window of `docs_per_request` documents that rotates through `documents`;
    requests cycle through `tenants` (a mixed-tenant stream when there are several)."""
    stub = reranker_pb2_grpc.RerankerServiceStub(channel)
    n = len(documents)

    def make(i: int) -> reranker_pb2.RerankRequest:
        start = (i * docs_per_request) % n
        window = [documents[(start + j) % n] for j in range(min(docs_per_request, n))]
        return reranker_pb2.RerankRequest(query=queries[i % len(queries)], documents=window,
                                          tenant=tenants[i % len(tenants)])

    return Workload("reranker", stub.Rerank, make, RERANK_TIMINGS)


# --- running -----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sample:
    latency_ms: float
    code: str  # "OK" or a grpc.StatusCode name
    timings: dict[str, float]


async def send_one(workload: Workload, index: int, timeout_s: float) -> Sample:
    request = workload.make_request(index)
    start = time.perf_counter()
    try:
        response = await workload.rpc(request, timeout=timeout_s)
    except grpc.aio.AioRpcError as err:
        return Sample((time.perf_counter() - start) * 1000.0, err.code().name, {})
    latency_ms = (time.perf_counter() - start) * 1000.0
    timings = {f: float(getattr(response.timings, f)) for f in workload.timing_fields}
    return Sample(latency_ms, OK, timings)


async def run_level(workload: Workload, concurrency: int, max_requests: int, duration_s: float,
                    timeout_s: float, first_index: int = 0, progress: bool = True) -> tuple[list[Sample], float]:
    """`concurrency` workers send back to back until `max_requests` are sent or `duration_s` has passed.

    Returns the samples and the wall time in seconds."""
    counter = itertools.count(first_index)
    last_index = first_index + max_requests
    samples: list[Sample] = []
    bar = tqdm(total=max_requests, desc=f"{workload.name} c={concurrency}", unit="req", disable=not progress,
               leave=False)
    start = time.perf_counter()
    deadline = time.monotonic() + duration_s

    async def worker() -> None:
        while time.monotonic() < deadline:
            index = next(counter)
            if index >= last_index:
                return
            samples.append(await send_one(workload, index, timeout_s))
            bar.update(1)

    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        bar.close()
    return samples, time.perf_counter() - start


def percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def summarize(concurrency: int, samples: Sequence[Sample], wall_s: float, timing_fields: Sequence[str]) -> dict:
    ok = [s for s in samples if s.code == OK]
    latencies = [s.latency_ms for s in ok]
    errors = Counter(s.code for s in samples if s.code != OK)
    return {
        "concurrency": concurrency,
        "requests": len(samples),
        "ok": len(ok),
        "error_count": sum(errors.values()),
        "errors": dict(sorted(errors.items())),
        "wall_s": wall_s,
        "throughput_rps": len(ok) / wall_s if wall_s > 0 else 0.0,
        "latency_ms": {
            "mean": float(np.mean(latencies)) if latencies else None,
            "p50": percentile(latencies, 50),
            "p95": percentile(latencies, 95),
            "p99": percentile(latencies, 99),
            "max": max(latencies) if latencies else None,
        },
        "server_mean_ms": {f: float(np.mean([s.timings[f] for s in ok])) if ok else None for f in timing_fields},
    }


async def run_all(args: argparse.Namespace, target: str, queries: Sequence[str],
                  documents: Sequence[document_pb2.Document]) -> list[dict]:
    async with grpc.aio.insecure_channel(target, options=GRPC_OPTIONS) as channel:
        if args.service == "reranker":
            workload = rerank_workload(channel, queries, documents, args.docs_per_request, args.tenant.split(","))
        else:
            workload = search_workload(channel, queries, args.collection, args.top_k, args.rerank_depth, args.tenant.split(","))
        if args.warmup > 0:  # connection set-up and first-call costs stay out of the numbers
            await run_level(workload, 1, args.warmup, args.duration_s, args.timeout_s, progress=False)
        levels = []
        next_index = args.warmup
        for concurrency in args.concurrency:
            samples, wall_s = await run_level(workload, concurrency, args.requests, args.duration_s,
                                              args.timeout_s, next_index, progress=args.progress)
            next_index += len(samples)
            levels.append(summarize(concurrency, samples, wall_s, workload.timing_fields))
            print(f"c={concurrency}: {len(samples)} requests in {wall_s:.1f}s", file=sys.stderr)
        return levels


# --- reporting ---------------------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def format_table(levels: Sequence[dict]) -> str:
    timing_fields = list(levels[0]["server_mean_ms"]) if levels else []
    header = ["conc", "sent", "ok", "errors", "req/s", "p50 ms", "p95 ms", "p99 ms",
              *[f"srv {f}" for f in timing_fields]]
    rows = []
    for lv in levels:
        errors = ",".join(f"{code}:{n}" for code, n in lv["errors"].items()) or "0"
        lat = lv["latency_ms"]
        rows.append([str(lv["concurrency"]), str(lv["requests"]), str(lv["ok"]), errors,
                     _fmt(lv["throughput_rps"]), _fmt(lat["p50"]), _fmt(lat["p95"]), _fmt(lat["p99"]),
                     *[_fmt(lv["server_mean_ms"][f]) for f in timing_fields]])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot_levels(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = result["levels"]
    conc = [lv["concurrency"] for lv in levels]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    left.plot(conc, [lv["throughput_rps"] for lv in levels], marker="o")
    left.set_xlabel("concurrency")
    left.set_ylabel("successful requests / s")
    left.set_title("throughput")
    for key, marker in (("p50", "o"), ("p99", "s")):
        points = [(c, lv["latency_ms"][key]) for c, lv in zip(conc, levels, strict=True)
                  if lv["latency_ms"][key] is not None]
        right.plot([p[0] for p in points], [p[1] for p in points], marker=marker, label=key)
    right.set_xlabel("concurrency")
    right.set_ylabel("latency (ms)")
    right.set_title("client latency")
    right.legend()
    for ax in (left, right):
        ax.set_xticks(conc)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    cfg = result["config"]
    what = (f"{cfg['service']} {cfg['docs_per_request']} docs/request" if cfg["service"] == "reranker"
            else f"search {cfg['collection']} top_k={cfg['top_k']} rerank_depth={cfg['rerank_depth']}")
    fig.suptitle(f"{what} @ {cfg['target']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- command line ------------------------------------------------------------------------------------------


def concurrency_levels(text: str) -> list[int]:
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not levels or any(c < 1 for c in levels):
        raise argparse.ArgumentTypeError(f"concurrency levels must be >= 1, got {text!r}")
    return levels


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="127.0.0.1:50050", help="loopback HOST:PORT of the service")
    parser.add_argument("--service", choices=["search", "reranker"], default="search",
                        help="search: SearchService.Search (the gateway); reranker: RerankerService.Rerank")
    parser.add_argument("--queries", type=Path, required=True, help="BEIR directory or its queries.jsonl")
    parser.add_argument("--max-queries", type=int, default=0, help="use only the first N queries (0 = all)")
    parser.add_argument("--collection", default="scifact", help="search mode: collection to query")
    parser.add_argument("--top-k", type=int, default=10, help="search mode: results per query")
    parser.add_argument("--rerank-depth", type=int, default=0, help="search mode: candidates sent to the reranker")
    parser.add_argument("--corpus", type=Path, default=None,
                        help="reranker mode: BEIR directory or corpus.jsonl (default: the --queries directory)")
    parser.add_argument("--docs-per-request", type=int, default=20, help="reranker mode: documents per Rerank")
    parser.add_argument("--tenant", default="",
                        help="tenant, or comma-separated tenants that requests cycle through (a mixed-tenant stream)")
    parser.add_argument("--concurrency", type=concurrency_levels, default=[1, 4, 8],
                        help="comma-separated levels (default 1,4,8)")
    parser.add_argument("--requests", type=int, default=200, help="max requests per level")
    parser.add_argument("--duration-s", type=float, default=60.0, help="max seconds per level")
    parser.add_argument("--timeout-s", type=float, default=60.0, help="deadline of each request")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured requests before the first level")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bars")
    parser.add_argument("--out", type=Path, required=True, help="JSON output; the PNG goes beside it")
    args = parser.parse_args(argv)
    for name in ("requests", "docs_per_request", "top_k"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.duration_s <= 0 or args.timeout_s <= 0:
        parser.error("--duration-s and --timeout-s must be > 0")
    if args.warmup < 0 or args.rerank_depth < 0:
        parser.error("--warmup and --rerank-depth must be >= 0")
    return args


def run(args: argparse.Namespace) -> dict:
    """Check the target, load the inputs, run every level; returns the result written to --out."""
    target = loopback_target(args.target)  # first: nothing is read or connected before this check
    queries = read_queries(args.queries, args.max_queries)
    documents: list[document_pb2.Document] = []
    if args.service == "reranker":
        documents = read_documents(args.corpus or args.queries, args.docs_per_request * 8)
    levels = asyncio.run(run_all(args, target, queries, documents))
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "progress"}
    config.update(target=args.target, resolved_target=target, query_count=len(queries),
                  document_pool=len(documents))
    return {
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "client": {"python": platform.python_version(), "machine": platform.machine(), "grpc": grpc.__version__},
        "config": config,
        "levels": levels,
    }


def write_outputs(result: dict[str, Any], out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    png = out.with_suffix(".png")
    plot_levels(result, png)
    return png


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except LoadTestError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    png = write_outputs(result, args.out)
    print(format_table(result["levels"]))
    print(f"wrote {args.out} and {png}")
    if any(lv["ok"] == 0 for lv in result["levels"]):
        print("error: a concurrency level had no successful request", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
