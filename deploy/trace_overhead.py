"""What tracing costs a Search: two identical stacks side by side in one run, one exporting every span (sampling
at 100%) to an OTLP receiver on 127.0.0.1, one with tracing off; SciFact test queries sent to both in turn
(alternating which goes first), first stage only and with the top 20 reranked; two rounds, the stacks' roles
swapped in the second. Also the cost of the stage spans when tracing is off (the API's no-op spans), per
Search. JSON, a text table and a PNG under --out.

    python -m deploy.trace_overhead --out bench-results/tracing        # make bench-tracing; ~12 minutes on 2 cores

The retriever's SciFact collection must exist under --var-dir (`make run` ingests it); each stack gets a copy.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import tempfile
import time
import timeit
from pathlib import Path

import grpc
import numpy as np

from common.beir import split_queries
from common.paths import SCIFACT, VAR_DIR
from common.plots import figures
from common.report import text_table
from common.tracing import stage
from deploy.otlp_receiver import start as start_receiver
from deploy.trace import by_trace, load_spans, render
from services.client import wait_for_serving
from services.gen.retrieval.v1 import search_pb2, search_pb2_grpc
from services.run import RERANK_BY_DEFAULT, Process, start, stop_all
from services.server import GRPC_OPTIONS

COLLECTION = "scifact"
SEARCH_TIMEOUT_S = 120.0


def stack(name: str, data_dir: Path, base_port: int, logs: Path, env: dict[str, str]) -> list[Process]:
    """Retriever, reranker, gateway; `env` (the tracing settings) for all three."""
    retriever = start(f"{name}-retriever", "services.retriever", ["--data-dir", str(data_dir)], base_port + 1,
                      logs, env)
    reranker = start(f"{name}-reranker", "services.reranker", RERANK_BY_DEFAULT, base_port + 2, logs, env)
    gateway = start(f"{name}-gateway", "services.gateway", ["--retriever-target", retriever.target,
                                                            "--reranker-target", reranker.target], base_port, logs,
                    env)
    return [retriever, reranker, gateway]


def timed_search(stub: search_pb2_grpc.SearchServiceStub, query: str, depth: int) -> float:
    """Milliseconds for one Search as the client sees it."""
    start_s = time.perf_counter()
    stub.Search(search_pb2.SearchRequest(collection=COLLECTION, query=query, top_k=10, rerank_depth=depth),
                timeout=SEARCH_TIMEOUT_S)
    return (time.perf_counter() - start_s) * 1000


def interleaved(stubs: dict[str, search_pb2_grpc.SearchServiceStub], queries: list[str], depth: int
                ) -> dict[str, list[float]]:
    """Each query to every stack, the order turning over from query to query (so drift and caches favour none)."""
    times: dict[str, list[float]] = {name: [] for name in stubs}
    names = list(stubs)
    for i, query in enumerate(queries):
        for name in names[i % len(names):] + names[: i % len(names)]:
            times[name].append(timed_search(stubs[name], query, depth))
        if (i + 1) % 50 == 0 or i + 1 == len(queries):
            print(f"  depth {depth}: {i + 1}/{len(queries)} queries", flush=True)
    return times


def noop_span_us() -> float:
    """Microseconds one stage span costs with tracing off (no provider in this process: the API's no-op)."""
    def one() -> None:
        with stage("s", documents=1):
            pass
    return min(timeit.repeat(one, number=20_000, repeat=5)) / 20_000 * 1e6


def summary(times: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    stats: dict[str, dict[str, float]] = {
        name: {"p50_ms": statistics.median(t), "p90_ms": statistics.quantiles(t, n=10)[-1],
               "mean_ms": statistics.fmean(t), "n": len(t)} for name, t in times.items()}
    low, high = p50_ratio_interval(times["traced"], times["untraced"])
    stats["ratio"] = {"p50": stats["traced"]["p50_ms"] / stats["untraced"]["p50_ms"], "p50_low": low, "p50_high": high}
    return stats


def p50_ratio_interval(traced: list[float], untraced: list[float], rounds: int = 2000, seed: int = 0
                       ) -> tuple[float, float]:
    """95% bootstrap interval of p50(on) / p50(off), resampling the queries (each was sent to both stacks)."""
    rng = np.random.default_rng(seed)
    on, off = np.asarray(traced), np.asarray(untraced)
    picks = rng.integers(0, len(on), size=(rounds, len(on)))
    ratios = np.median(on[picks], axis=1) / np.median(off[picks], axis=1)
    return float(np.quantile(ratios, 0.025)), float(np.quantile(ratios, 0.975))


def measure(args: argparse.Namespace, work: Path) -> dict[str, object]:
    """Two rounds with the stacks' roles swapped: each stack is traced in one round and not in the other, so what
    differs between two stacks that should be identical (where the scheduler put them, their copies of the data;
    measured at up to ±10% of the first-stage p50 here) cancels out of the ratio."""
    source = args.var_dir / "retriever" / COLLECTION
    if not source.is_dir():
        raise SystemExit(f"{source} is missing: `make run` ingests SciFact there first")
    test = list(split_queries(SCIFACT, "test").values())
    queries = [test[i % len(test)] for i in range(max(args.queries, args.reranked_queries))]  # passes over test
    receiver, receiver_port, _ = start_receiver("127.0.0.1", 0, work / "spans.jsonl")
    traced_env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver_port}",
                  "GATEWAY_TRACE_SAMPLE_RATIO": "1.0"}
    untraced_env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": ""}
    first_stage: dict[str, list[float]] = {"traced": [], "untraced": []}
    reranked: dict[str, list[float]] = {"traced": [], "untraced": []}
    rounds = []
    try:
        for round_ in range(2):
            roles = ("traced", "untraced") if round_ == 0 else ("untraced", "traced")  # stack a's role, stack b's
            print(f"round {round_ + 1}: stack a {roles[0]}, stack b {roles[1]}", flush=True)
            times = one_round(args, work / f"round-{round_}", source, {
                role: traced_env if role == "traced" else untraced_env for role in roles}, queries)
            for role in roles:
                first_stage[role] += times[0][role]
                reranked[role] += times[1][role]
            rounds.append({"stack_a": roles[0], "first_stage": summary(times[0])["ratio"]})
    finally:
        receiver.stop(1)
    traces = by_trace(load_spans([work / "spans.jsonl"]))
    spans_per_search = statistics.median(len(s) for s in traces.values()) if traces else 0.0
    newest = max(traces.values(), key=lambda spans: min(s.start_ns for s in spans)) if traces else []
    (args.out / "example-trace.txt").write_text("\n".join(render(newest)) + "\n")  # a reranked Search
    return {"first_stage": summary(first_stage), "reranked_20": summary(reranked), "rounds": rounds,
            "traces": len(traces), "spans_per_search": spans_per_search, "noop_span_us": noop_span_us(),
            "raw_ms": {"first_stage": first_stage, "reranked_20": reranked}}


def one_round(args: argparse.Namespace, work: Path, source: Path, envs: dict[str, dict[str, str]],
              queries: list[str]) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Stacks a and b started with the role's settings in `envs` (first: a), then the interleaved Searches: first
    stage only, then with the top 20 reranked. Times by role."""
    processes: list[Process] = []
    try:
        for i, (name, env) in enumerate(zip(("a", "b"), envs.values(), strict=True)):
            shutil.copytree(source, work / name / COLLECTION)
            processes += stack(name, work / name, args.base_port + 10 * i, work / "logs", env)
        for proc in processes:
            wait_for_serving(proc.target, timeout=900, alive=proc.alive)
        channels = {role: grpc.insecure_channel(f"127.0.0.1:{args.base_port + 10 * i}", options=GRPC_OPTIONS)
                    for i, role in enumerate(envs)}
        stubs = {role: search_pb2_grpc.SearchServiceStub(channel) for role, channel in channels.items()}
        interleaved(stubs, queries[:10], 20)  # warm-up: first forwards, thread pools, caches
        first_stage = interleaved(stubs, queries[: args.queries], 0)
        reranked = interleaved(stubs, queries[: args.reranked_queries], 20)
        time.sleep(1.0)  # the traced stack's last batch of spans
        return first_stage, reranked
    finally:
        stop_all(processes)


def report(result: dict, out: Path) -> str:
    rows = []
    for kind in ("first_stage", "reranked_20"):
        traced, untraced, ratio = (result[kind][k] for k in ("traced", "untraced", "ratio"))
        rows.append((kind, untraced["n"], untraced["p50_ms"], traced["p50_ms"], ratio["p50"],
                     f"[{ratio['p50_low']:.3f}, {ratio['p50_high']:.3f}]", untraced["p90_ms"], traced["p90_ms"]))
    table = text_table([("search", "s"), ("n", "d"), ("off p50 ms", ".1f"), ("on p50 ms", ".1f"),
                        ("on/off p50", ".3f"), ("95% interval", "s"), ("off p90 ms", ".1f"), ("on p90 ms", ".1f")],
                       rows)
    off_cost_ms = result["noop_span_us"] * result["spans_per_search"] / 1000
    off_share = off_cost_ms / result["first_stage"]["untraced"]["p50_ms"]
    notes = (f"\ntracing on: {result['traces']} traces received, {result['spans_per_search']:.0f} spans per Search"
             f"\ntracing off: a stage span costs {result['noop_span_us']:.2f} us (no-op); at that count "
             f"{off_cost_ms * 1000:.1f} us per Search, {off_share:.4%} of the first-stage p50")
    per_round = "".join(f"\nround {i + 1} (stack a {r['stack_a']}): first-stage p50 on/off {r['first_stage']['p50']:.3f} "
                        f"[{r['first_stage']['p50_low']:.3f}, {r['first_stage']['p50_high']:.3f}]"
                        for i, r in enumerate(result["rounds"]))
    text = table + per_round + notes
    (out / "summary.txt").write_text(text + "\n")
    return text


def plot(result: dict, path: Path) -> None:
    raw: dict[str, dict[str, list[float]]] = result["raw_ms"]
    with figures(path, len(raw), (11, 4), "Search latency, tracing off vs on (100% sampled), one run") as axes:
        for ax, (kind, times) in zip(axes, raw.items(), strict=True):
            ax.boxplot([times["untraced"], times["traced"]], showfliers=False)
            ax.set_xticks([1, 2], ["tracing off", "tracing on"])
            ax.set_title(kind.replace("_", " "))
            ax.set_ylabel("ms (client side)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench-results/tracing"))
    parser.add_argument("--var-dir", type=Path, default=VAR_DIR)
    parser.add_argument("--queries", type=int, default=600, help="first-stage Searches per stack and round (passes "
                        "over SciFact's 300 test queries)")
    parser.add_argument("--reranked-queries", type=int, default=20, help="Searches with the top 20 reranked, per "
                        "stack and round")
    parser.add_argument("--base-port", type=int, default=50150)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop the stacks on SIGTERM as on Ctrl-C
    with tempfile.TemporaryDirectory(prefix="trace-overhead-") as work:
        result = measure(args, Path(work))
    (args.out / "overhead.json").write_text(json.dumps(result, indent=1))
    plot(result, args.out / "overhead.png")
    print(report(result, args.out))


if __name__ == "__main__":
    main()
