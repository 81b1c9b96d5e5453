"""The load test's command line (`python -m deploy.loadtest`); see the package docstring."""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc

from deploy.loadtest import __doc__ as DESCRIPTION
from deploy.loadtest.modes import capacity_slo, run_mode
from deploy.loadtest.report import format_capacity, format_table, plot_levels
from deploy.loadtest.target import LoadTestError, loopback_target
from deploy.loadtest.workloads import read_documents, read_queries
from services.gen.retrieval.v1 import document_pb2
from services.tls import add_tls_arguments


def _positive_list(text: str, cast: type[int] | type[float], what: str) -> list:
    """Comma-separated numbers, each > 0 (for integers: >= 1)."""
    try:
        values = [cast(part) for part in text.split(",") if part.strip()]
    except ValueError:
        kind = "integers" if cast is int else "numbers"
        raise argparse.ArgumentTypeError(f"expected comma-separated {kind}, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        bound = ">= 1" if cast is int else "> 0"
        raise argparse.ArgumentTypeError(f"{what} must be {bound}, got {text!r}")
    return values


def rates(text: str) -> list[float]:
    return _positive_list(text, float, "rates")


def concurrency_levels(text: str) -> list[int]:
    return _positive_list(text, int, "concurrency levels")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    parser.add_argument("--mode", choices=["closed", "open", "capacity"], default="closed",
                        help="closed: concurrency levels; open: Poisson arrivals at --rates, latency from the "
                             "scheduled send; capacity: the highest open-loop rate meeting --slo-ms")
    parser.add_argument("--concurrency", type=concurrency_levels, default=[1, 4, 8],
                        help="closed mode: comma-separated levels (default 1,4,8)")
    parser.add_argument("--rates", type=rates, default=[1.0, 2.0, 4.0],
                        help="open mode: comma-separated offered rates, requests/s (default 1,2,4)")
    parser.add_argument("--slo-ms", type=float, default=1000.0, help="capacity mode: latency objective")
    parser.add_argument("--slo-percentile", type=float, choices=[50.0, 95.0, 99.0], default=99.0,
                        help="capacity mode: which latency percentile must stay under --slo-ms")
    parser.add_argument("--max-error-rate", type=float, default=0.01,
                        help="capacity mode: the share of requests that may fail (refusals included)")
    parser.add_argument("--start-rps", type=float, default=0.0,
                        help="capacity mode: first rate tried (0: half of one closed-loop client's rate)")
    parser.add_argument("--max-rps", type=float, default=1000.0, help="capacity mode: highest rate tried")
    parser.add_argument("--bisections", type=int, default=3, help="capacity mode: refining steps after doubling")
    parser.add_argument("--seed", type=int, default=0, help="open/capacity: the arrival times' random seed")
    parser.add_argument("--requests", type=int, default=200, help="max requests per level (or probe)")
    parser.add_argument("--duration-s", type=float, default=60.0, help="max seconds per level (or probe)")
    parser.add_argument("--min-requests", type=int, default=0,
                        help="open/capacity: a level goes on past --duration-s until this many requests have arrived "
                             "(at most 600 s)")
    parser.add_argument("--timeout-s", type=float, default=60.0, help="deadline of each request")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured requests before the first level")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bars")
    parser.add_argument("--out", type=Path, required=True, help="JSON output; the PNG goes beside it")
    add_tls_arguments(parser)
    args = parser.parse_args(argv)
    for name in ("requests", "docs_per_request", "top_k"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.duration_s <= 0 or args.timeout_s <= 0:
        parser.error("--duration-s and --timeout-s must be > 0")
    if args.warmup < 0 or args.rerank_depth < 0:
        parser.error("--warmup and --rerank-depth must be >= 0")
    if not 0 < args.max_error_rate < 1:
        parser.error("--max-error-rate must be between 0 and 1")
    judged_on = capacity_slo(args).min_arrivals
    if args.mode == "capacity" and args.requests < judged_on:
        parser.error(f"--requests {args.requests}: a probe of p{args.slo_percentile:g} with at most "
                     f"{args.max_error_rate:g} of requests failing is judged on at least {judged_on} arrivals "
                     "(or lower --slo-percentile / raise --max-error-rate)")
    return args


def run(args: argparse.Namespace) -> dict:
    """Check the target, load the inputs, run every level; returns the result written to --out."""
    target = loopback_target(args.target)  # first: nothing is read or connected before this check
    queries = read_queries(args.queries, args.max_queries)
    documents: list[document_pb2.Document] = []
    if args.service == "reranker":
        documents = read_documents(args.corpus or args.queries, args.docs_per_request * 8)
    outcome = asyncio.run(run_mode(args, target, queries, documents))
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "progress"}
    config.update(target=args.target, resolved_target=target, query_count=len(queries),
                  document_pool=len(documents))
    return {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "client": {"python": platform.python_version(), "machine": platform.machine(), "grpc": grpc.__version__},
        "config": config,
        **outcome,
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
    if "capacity" in result:
        print(format_capacity(result["capacity"]))
    print(f"wrote {args.out} and {png}")
    if "capacity" not in result and any(lv["ok"] == 0 for lv in result["levels"]):
        print("error: a level had no successful request", file=sys.stderr)
        return 1
    return 0

