"""`make run`: the whole system on this machine, on the bundled SciFact data.

Starts the retriever, the reranker and the gateway as separate processes on
127.0.0.1, ingests SciFact once (kept under var/, so later runs start fast),
shows nDCG@10 of each stage over SciFact's test queries and one typical query's
stages side by side (deploy.demo), all through SearchService, then keeps
serving until Ctrl-C, when every process is shut down gracefully.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from common.beir import count_corpus
from common.paths import REPO_ROOT, SCIFACT, SHARED_DATA, VAR_DIR
from services.client import collection_size, ingest_corpus, wait_for_serving

# Reranker flags for a stack that exists to measure the reranking stage (capacity, load and soak runs, the tests of
# the pipeline): the default model serves its adapter's own weight, so default-tenant searches rerank; the
# shipped default weight (0) would skip them.
RERANK_BY_DEFAULT = ["--default-fusion-weight", "-1"]
# Ports from --base-port: gateway +0, retriever +1, rerankers +2.., metrics +10 (gateway), +11 (retriever), +12..
# (rerankers), Prometheus +20.
MAX_RERANKER_REPLICAS = 8


@dataclass
class Process:
    name: str
    target: str
    popen: subprocess.Popen

    def alive(self) -> bool:
        return self.popen.poll() is None


def start(name: str, module: str, args: list[str], port: int, log_dir: Path, env: dict[str, str] | None = None
          ) -> Process:
    """`module` as a process on 127.0.0.1:`port`, logging to log_dir/name.log, with `env` added to this one's."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log = open(log_dir / f"{name}.log", "ab")  # noqa: SIM115 - lives as long as the child
    popen = subprocess.Popen([sys.executable, "-m", module, "--host", "127.0.0.1", "--port", str(port), *args],
                             cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    print(f"started {name} on 127.0.0.1:{port} (pid {popen.pid}, log {log_dir / (name + '.log')})")
    return Process(name, f"127.0.0.1:{port}", popen)


def stop_all(processes: list[Process], grace_s: float = 20.0) -> None:
    for proc in processes:
        if proc.alive():
            proc.popen.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for proc in processes:
        try:
            proc.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.popen.kill()
        print(f"stopped {proc.name} (exit {proc.popen.returncode})")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("RUN_DATA", SCIFACT)))
    parser.add_argument("--collection", default="scifact")
    parser.add_argument("--var-dir", type=Path, default=VAR_DIR)
    parser.add_argument("--base-port", type=int, default=int(os.environ.get("RUN_BASE_PORT", 50050)))
    parser.add_argument("--query", default="",
                        help="your own query, every stage side by side (default: nDCG@10 of each stage over the "
                             "test queries, then a typical test query side by side, judged documents marked)")
    parser.add_argument("--rerank-depth", type=int, default=20)
    parser.add_argument("--rerank-weight", type=float, default=None,
                        help="the reranker's weight the demo's reranked searches ask for (default: the served one; "
                             "0 as shipped, which skips the reranker)")
    parser.add_argument("--rerank-sample", type=int, default=30, metavar="N",
                        help="test queries the reranked stage is scored on: N, one in every len/N in the qrels "
                             "file's order (2-9 s each on a 2-core CPU); the first stages are scored on all")
    parser.add_argument("--no-reranker", action="store_true")
    parser.add_argument("--adapter", default="default", help="reranker adapter: default, none or a directory")
    parser.add_argument("--reranker-dtype", default="auto",
                        help="the reranker's --dtype (auto: bf16 on a GPU or a CPU with native bf16, else fp32)")
    parser.add_argument("--reranker-replicas", type=int, default=1, choices=range(1, MAX_RERANKER_REPLICAS + 1),
                        metavar="N", help="reranker processes behind the gateway (its --tenant-spread N: every "
                                          "search goes to the least busy)")
    parser.add_argument("--reranker-threads", type=int, default=0, metavar="T",
                        help="each reranker's --cpu-threads (0: the cores it may use)")
    parser.add_argument("--exit-after-query", action="store_true", help="stop instead of serving on")
    parser.add_argument("--eval", type=Path, default=None, metavar="OUT_DIR",
                        help="instead of the demo query, run deploy.eval on every --eval-data collection and "
                             "write OUT_DIR/<collection>.json")
    parser.add_argument("--eval-data", type=Path, action="append", default=None,
                        help="BEIR directory to evaluate (repeatable; default: every collection under "
                             "../shared/data with a qrels file for the split)")
    parser.add_argument("--eval-split", default="test")
    parser.add_argument("--loadtest", type=Path, default=None, metavar="OUT_DIR",
                        help="instead of the demo query, a short load test of Search (rerank depth --rerank-depth): "
                             "closed loop, then the capacity under --slo-ms; JSON, PNG and tables under OUT_DIR")
    parser.add_argument("--slo-ms", type=float, default=2000.0, help="--loadtest: the p95 latency objective")
    parser.add_argument("--capacity", type=Path, default=None, metavar="OUT_DIR",
                        help="the capacity table (deploy.capacity): Search without and with reranking, open loop at "
                             "0.5x/1x/3x of the measured capacity through a gateway with admission limits, scraped "
                             "by a local Prometheus; the dashboard drawn from it")
    return parser.parse_args(argv)


def start_stack(args: argparse.Namespace) -> tuple[list[Process], dict[str, int]]:
    """The retriever, the rerankers (unless --no-reranker) and the gateway, last; for --capacity with metrics
    ports and the capacity run's admission limits, and for --capacity and --loadtest rerankers that rerank by
    default. Returns them and the metrics ports."""
    logs = args.var_dir / "logs"
    rerankers = [] if args.no_reranker else reranker_names(args.reranker_replicas)
    metrics = {name: args.base_port + 10 + i for i, name in enumerate(("gateway", "retriever", *rerankers))} \
        if args.capacity else {}
    extra = {name: ["--metrics-port", str(port)] for name, port in metrics.items()}
    if args.capacity:
        from deploy.capacity import GATEWAY_ADMISSION
        extra["gateway"] += GATEWAY_ADMISSION
    processes = [start("retriever", "services.retriever", ["--data-dir", str(args.var_dir / "retriever"),
                                                           *extra.get("retriever", [])], args.base_port + 1, logs)]
    gateway_args = ["--retriever-target", processes[0].target, *extra.get("gateway", [])]
    measured = RERANK_BY_DEFAULT if args.capacity or args.loadtest else []  # they size the reranking stage
    reranker_args = ["--adapter", args.adapter, "--dtype", args.reranker_dtype, "--cpu-threads",
                     str(args.reranker_threads), *measured]
    for i, name in enumerate(rerankers):
        processes.append(start(name, "services.reranker", [*reranker_args, *extra.get(name, [])],
                               args.base_port + 2 + i, logs))
    if rerankers:
        gateway_args += ["--reranker-target", ",".join(p.target for p in processes[1:]),
                         "--tenant-spread", str(len(rerankers))]
    processes.append(start("gateway", "services.gateway", gateway_args, args.base_port, logs))
    return processes, metrics


def reranker_names(replicas: int) -> list[str]:
    """"reranker", or "reranker-1".."reranker-N" for several (process, log and Prometheus job names)."""
    return ["reranker"] if replicas == 1 else [f"reranker-{i + 1}" for i in range(replicas)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    processes, metrics = start_stack(args)
    retriever, gateway = processes[0].target, processes[-1].target
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        for proc in processes:
            wait_for_serving(proc.target, timeout=600, alive=proc.alive)
            print(f"{proc.name} is SERVING")
        if args.eval:
            return run_eval(retriever, gateway, args)
        ensure_ingested(retriever, args.collection, args.data)
        if args.loadtest:
            return run_loadtest(gateway, args)
        if args.capacity:
            from deploy.capacity import capacity_table

            return capacity_table(gateway, metrics, args.data, args.collection, args.rerank_depth, args.capacity,
                                  args.var_dir, args.base_port + 20)
        show_stages(gateway, args)
        if args.exit_after_query:
            return 0
        print(f"\nserving: gateway {gateway}; try\n  .venv/bin/python -m services.client search "
              f"--target {gateway} --collection {args.collection} --query '...' "
              f"--rerank-depth {args.rerank_depth}\nCtrl-C stops everything.")
        while all(p.alive() for p in processes):
            time.sleep(1)
        print("a service exited; stopping the rest")
        return 1
    except KeyboardInterrupt:
        print("\nstopping...")
        return 0
    finally:
        stop_all(processes)


def ensure_ingested(target: str, collection: str, data: Path) -> None:
    expected = count_corpus(data, indexable_only=True)
    have = collection_size(target, collection)
    if have == expected:
        print(f"collection {collection} already holds {have} documents")
        return
    print(f"ingesting {expected} documents from {data} into {collection} (once; kept under var/)")
    start = time.perf_counter()
    ingest_corpus(target, collection, data)
    print(f"ingested in {time.perf_counter() - start:.0f}s")


def run_eval(retriever: str, gateway: str, args: argparse.Namespace) -> int:
    from deploy.eval import evaluate, summary_table, table

    depth = 0 if args.no_reranker else args.rerank_depth
    collections = args.eval_data or sorted(p for p in SHARED_DATA.iterdir()
                                           if (p / "qrels" / f"{args.eval_split}.tsv").is_file())
    args.eval.mkdir(parents=True, exist_ok=True)
    results = []
    for data in collections:
        ensure_ingested(retriever, data.name, data)
        results.append(evaluate(gateway, data, data.name, args.eval_split, depth))
        print(f"\n{data.name} ({args.eval_split}, {results[-1]['queries']} queries)\n{table(results[-1]['results'])}")
        out = args.eval / f"{data.name}.json"
        out.write_text(json.dumps(results[-1], indent=2) + "\n")
        print(f"wrote {out}")
    summary = summary_table(results)
    (args.eval / "summary.txt").write_text(summary + "\n")
    (args.eval / "summary.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nnDCG@10, default settings, {args.eval_split} splits\n{summary}\nwrote {args.eval}/summary.txt, .json")
    return 0


def run_loadtest(gateway: str, args: argparse.Namespace) -> int:
    """A few minutes: 30 requests per level or probe, 15 s each (probes go on for 20 arrivals), loopback only
    (deploy.loadtest). Probes this short are judged on p95 with 5% allowed to fail (20 arrivals); `make capacity`
    judges p99 and 1% on 100."""
    from deploy.loadtest import cli

    depth = 0 if args.no_reranker else args.rerank_depth
    common = ["--target", gateway, "--collection", args.collection, "--queries", str(args.data), "--top-k", "10",
              "--rerank-depth", str(depth), "--requests", "30", "--duration-s", "15", "--timeout-s", "30"]
    runs = [("closed", ["--mode", "closed", "--concurrency", "1,2,4"]),
            ("capacity", ["--mode", "capacity", "--slo-ms", str(args.slo_ms), "--slo-percentile", "95",
                          "--max-error-rate", "0.05", "--bisections", "2"])]
    for name, extra in runs:
        print(f"\nload test: {name}")
        code = cli.main([*common, *extra, "--out", str(args.loadtest / f"search-{name}.json")])
        if code:
            return code
    return 0


def show_stages(gateway: str, args: argparse.Namespace) -> None:
    """--query: the user's query through every stage; otherwise each stage's quality over the test queries and a
    typical one of them side by side."""
    from deploy import demo  # tooling (ir-measures): imported when the demo runs

    depth = 0 if args.no_reranker else args.rerank_depth
    if args.query:
        demo.show_query(gateway, args.collection, args.query, depth, rerank_weight=args.rerank_weight)
    else:
        demo.show_quality(gateway, args.collection, args.data, depth, args.rerank_sample,
                          rerank_weight=args.rerank_weight)


if __name__ == "__main__":
    sys.exit(main())
