"""Serving capacity with the reranker on a GPU: the three services on one box, sized under a tight SLO.

    python -m deploy.gpu_capacity --data DIR --out DIR [--slo-ms 100] [--device cuda]

Starts the retriever, the reranker (on `--device`, reranking by default) and the gateway on 127.0.0.1 with
their metrics ports, ingests the collection, then finds with deploy.loadtest's open-loop capacity search the
highest request rate whose p99 stays under `--slo-ms`, for each configuration in CONFIGS:

    rerank 100           RerankerService.Rerank straight to the reranker, 100 documents per request
    search + rerank 20   SearchService.Search through the gateway, hybrid top 20 reranked
    search               the same without reranking (what the first stage alone holds)

Around each search the reranker's own counters are read (`reranker_batch_requests`): the mean number of
requests per forward pass shows how much of the capacity comes from batching. Writes OUT/gpu_capacity.json,
OUT/gpu_capacity.md (the table) and each load test's JSON and PNG. Loopback only, bounded in time: every probe
lasts `--probe-s` seconds, or as long as 100 arrivals take at its rate when that is longer (a p99 and a 1% error
budget are judged on no fewer).

On a CPU (`--device cpu`) the same command runs; `--tiny` shrinks every size for a dry run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from common.report import text_table
from deploy.loadtest import cli
from services.client import wait_for_serving
from services.run import RERANK_BY_DEFAULT, Process, ensure_ingested, start, stop_all


@dataclass(frozen=True)
class Config:
    name: str
    service: str  # deploy.loadtest's --service: "reranker" (Rerank) or "search" (the gateway)
    documents: int  # documents per Rerank, or the rerank depth of a Search (0: no reranking)


CONFIGS = (Config("rerank 100", "reranker", 100), Config("search + rerank 20", "search", 20),
           Config("search", "search", 0))
TINY = (Config("rerank 4", "reranker", 4), Config("search + rerank 4", "search", 4))
BATCH_METRIC = "reranker_batch_requests"  # histogram: requests per forward pass (services/reranker.py)
# A dry run's probes hold a handful of requests: judged on their median with a quarter allowed to fail (a p99 and
# a 1% error budget need 100 arrivals per probe).
TINY_JUDGEMENT = ["--slo-percentile", "50", "--max-error-rate", "0.25"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="a BEIR directory: ingested, and its queries sent")
    p.add_argument("--collection", default="", help="default: the directory's name")
    p.add_argument("--also-ingest", type=Path, action="append", default=[],
                   help="another BEIR directory ingested too, under its name (for later use of --var-dir)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--var-dir", type=Path, default=None, help="the services' data and logs (default: a temp dir)")
    p.add_argument("--device", default="cuda", help="the reranker's device (the embedder takes its own default)")
    p.add_argument("--slo-ms", type=float, default=100.0, help="p99 objective of every configuration")
    p.add_argument("--probe-s", type=float, default=5.0, help="longest a probe of the capacity search lasts")
    p.add_argument("--max-rps", type=float, default=1000.0, help="highest rate tried")
    p.add_argument("--base-port", type=int, default=50350)
    p.add_argument("--tiny", action="store_true", help="toy sizes and a loose SLO: the dry run")
    return p.parse_args(argv)


def start_services(args: argparse.Namespace, var_dir: Path) -> tuple[list[Process], int]:
    """Retriever, reranker, gateway (last); returns them and the reranker's metrics port."""
    logs, port = var_dir / "logs", args.base_port
    metrics = {name: port + 10 + i for i, name in enumerate(("gateway", "retriever", "reranker"))}
    retriever = start("retriever", "services.retriever", ["--data-dir", str(var_dir / "retriever"),
                                                          "--metrics-port", str(metrics["retriever"])], port + 1, logs)
    reranker = start("reranker", "services.reranker", [
        "--device", args.device, *RERANK_BY_DEFAULT, "--metrics-port", str(metrics["reranker"]),
        "--tenants-store", f"file:{var_dir / 'tenants.json'}"], port + 2, logs)
    gateway = start("gateway", "services.gateway", [
        "--retriever-target", retriever.target, "--reranker-target", reranker.target,
        "--metrics-port", str(metrics["gateway"])], port, logs)
    return [retriever, reranker, gateway], metrics["reranker"]


def batch_counters(metrics_port: int) -> tuple[float, float]:
    """(requests reranked, forward passes) so far, from the reranker's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    values = {s.name: s.value for family in text_string_to_metric_families(text) if family.name == BATCH_METRIC
              for s in family.samples}
    return values.get(f"{BATCH_METRIC}_sum", 0.0), values.get(f"{BATCH_METRIC}_count", 0.0)


def request_timeout_s(slo_ms: float) -> float:
    """Each request's deadline: ten times the SLO, at least 1 s. A request that late has failed the SLO anyway,
    and a saturated probe then drains in that time instead of the load test's default minute."""
    return max(1.0, 10 * slo_ms / 1000)


def measure(config: Config, args: argparse.Namespace, targets: dict[str, str], metrics_port: int,
            collection: str) -> dict:
    """One configuration's capacity search, with the requests per forward pass over all of its probes."""
    slug = config.name.replace(" + ", "-").replace(" ", "-")
    common = ["--target", targets[config.service], "--service", config.service, "--queries", str(args.data),
              "--mode", "capacity", "--slo-ms", str(args.slo_ms), "--bisections", "2", "--max-rps", str(args.max_rps),
              "--duration-s", str(args.probe_s), "--requests", str(int(args.probe_s * args.max_rps)),
              "--min-requests", "20", "--timeout-s", str(request_timeout_s(args.slo_ms)), "--no-progress",
              "--out", str(args.out / f"{slug}.json"), *(TINY_JUDGEMENT if args.tiny else [])]
    if config.service == "reranker":
        common += ["--docs-per-request", str(config.documents)]
    else:
        common += ["--collection", collection, "--top-k", "10", "--rerank-depth", str(config.documents)]
    print(f"\n== {config.name}: capacity under p99 <= {args.slo_ms:g} ms", flush=True)
    requests_before, passes_before = batch_counters(metrics_port)
    started = time.perf_counter()
    code = cli.main(common)
    seconds = time.perf_counter() - started
    requests_after, passes_after = batch_counters(metrics_port)
    requests, passes = requests_after - requests_before, passes_after - passes_before
    result = json.loads((args.out / f"{slug}.json").read_text()) if code == 0 else {}
    capacity = result.get("capacity", {}).get("capacity_rps") or 0.0
    at_capacity = [lv for lv in result.get("levels", []) if capacity and lv["rate_rps"] == capacity]
    return {"config": config.name, "service": config.service, "documents": config.documents,
            "slo_ms": args.slo_ms, "capacity_rps": capacity,
            "p50_ms": at_capacity[0]["latency_ms"]["p50"] if at_capacity else None,
            "p99_ms": at_capacity[0]["latency_ms"]["p99"] if at_capacity else None,
            "exit": code, "seconds": round(seconds, 1),
            "reranked_requests": requests, "forward_passes": passes,
            "requests_per_forward": requests / passes if passes else None}


def format_rows(rows: list[dict]) -> str:
    columns = [("configuration", ""), ("SLO p99 ms", "g"), ("capacity req/s", ".4g"), ("p50 ms", ".1f"),
               ("p99 ms", ".1f"), ("requests per forward pass", ".2f"), ("forward passes", ".0f")]
    return text_table(columns, [[r["config"], r["slo_ms"], r["capacity_rps"], r["p50_ms"], r["p99_ms"],
                                 r["requests_per_forward"], r["forward_passes"]] for r in rows])


def run(args: argparse.Namespace) -> list[dict]:
    collection = args.collection or args.data.name
    with tempfile.TemporaryDirectory(prefix="gpu-capacity-") as scratch:
        var_dir = args.var_dir or Path(scratch)
        processes, metrics_port = start_services(args, var_dir)
        try:
            for proc in processes:
                wait_for_serving(proc.target, timeout=600, alive=proc.alive)
            ensure_ingested(processes[0].target, collection, args.data)
            for other in args.also_ingest:
                ensure_ingested(processes[0].target, other.name, other)
            targets = {"reranker": processes[1].target, "search": processes[2].target}
            rows = []
            for config in TINY if args.tiny else CONFIGS:
                rows.append(measure(config, args, targets, metrics_port, collection))
                write(args.out, rows)  # after each: a run cut short keeps what it measured
            return rows
        finally:
            stop_all(processes)


def write(out: Path, rows: list[dict]) -> None:
    (out / "gpu_capacity.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "gpu_capacity.md").write_text(format_rows(rows) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.tiny:
        args.slo_ms, args.max_rps, args.probe_s = max(args.slo_ms, 60_000.0), min(args.max_rps, 4.0), 2.0
    args.out.mkdir(parents=True, exist_ok=True)
    rows = run(args)
    print("\n" + format_rows(rows))
    return 0 if all(r["exit"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
