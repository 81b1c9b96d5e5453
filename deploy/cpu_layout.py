"""`python -m deploy.cpu_layout`: on a CPU host, one reranker on every core or one single-threaded reranker per core
behind the gateway: which serves more reranked Searches, and what each costs a request's latency.

    python -m deploy.cpu_layout --out bench-results/cpu/layout      # make bench-cpu-layout; ~12 minutes on 2 cores

Each layout is the whole stack of services.run (retriever, rerankers, gateway on 127.0.0.1, the gateway's
--tenant-spread over every reranker), started on its own so that the layouts never share the CPU, then closed-loop
Searches through the gateway with the top --rerank-depth reranked (deploy.loadtest, SciFact's queries): at
concurrency 1 (one request's latency on an idle host) and at twice the cores (saturated: the most requests per
second the layout serves). The layouts alternate over --rounds, so drift of the machine favours neither; the ratio
is taken per round. JSON, a text table and a PNG under --out. SciFact is ingested under --var-dir once, as by
`make run`.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from common.device import cpu_threads, describe_device
from common.paths import SCIFACT, VAR_DIR
from common.plots import figures
from common.report import text_table
from deploy.loadtest import cli
from services import run
from services.client import wait_for_serving


@dataclass(frozen=True)
class Layout:
    name: str
    replicas: int
    threads: int  # each reranker's --cpu-threads (0: every core it may use)

    def flags(self) -> list[str]:
        return ["--reranker-replicas", str(self.replicas), "--reranker-threads", str(self.threads)]


def layouts(cores: int) -> list[Layout]:
    return [Layout("one reranker, all cores", 1, 0), Layout(f"{cores} rerankers, 1 thread each", cores, 1)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rerank-depth", type=int, default=20)
    parser.add_argument("--requests", type=int, default=60, help="per level and round (or --duration-s)")
    parser.add_argument("--duration-s", type=float, default=60.0)
    parser.add_argument("--var-dir", type=Path, default=VAR_DIR)
    parser.add_argument("--base-port", type=int, default=50150)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.requests < 1:
        parser.error("--rounds and --requests must be at least 1")
    return args


def measure(layout: Layout, levels: list[int], out: Path, args: argparse.Namespace) -> list[dict]:
    """Start the layout's stack, load it level by level, stop it; the load test's levels."""
    stack = run.parse_args(["--var-dir", str(args.var_dir), "--base-port", str(args.base_port),
                            "--loadtest", str(out.parent), *layout.flags()])  # --loadtest: rerankers that rerank
    processes, _ = run.start_stack(stack)
    try:
        for process in processes:
            wait_for_serving(process.target, timeout=600, alive=process.alive)
        run.ensure_ingested(processes[0].target, "scifact", SCIFACT)  # once per --var-dir
        code = cli.main(["--target", processes[-1].target, "--collection", "scifact", "--queries", str(SCIFACT),
                         "--top-k", "10", "--rerank-depth", str(args.rerank_depth), "--mode", "closed",
                         "--concurrency", ",".join(map(str, levels)), "--requests", str(args.requests),
                         "--duration-s", str(args.duration_s), "--no-progress", "--out", str(out)])
        if code != 0:
            raise RuntimeError(f"{layout.name}: the load test exited {code} (logs under {args.var_dir / 'logs'})")
    finally:
        run.stop_all(processes)
    return list(json.loads(out.read_text())["levels"])


def summarise(names: list[str], runs: dict[str, list[list[dict]]], levels: list[int]) -> list[dict]:
    """Per layout and level: throughput and latency over the rounds, and each round's throughput against the first
    layout's in the same round."""
    rows = []
    for name in names:
        for i, concurrency in enumerate(levels):
            per_round = [round_levels[i] for round_levels in runs[name]]
            baseline = [round_levels[i] for round_levels in runs[names[0]]]
            ratios = [mine["throughput_rps"] / base["throughput_rps"] for mine, base in zip(per_round, baseline,
                                                                                           strict=True)]
            rows.append({"layout": name, "concurrency": concurrency,
                         "throughput_rps": statistics.mean(lv["throughput_rps"] for lv in per_round),
                         "throughput_by_round": [lv["throughput_rps"] for lv in per_round],
                         "ratio_by_round": ratios,
                         "p50_ms": statistics.mean(lv["latency_ms"]["p50"] for lv in per_round),
                         "p99_ms": statistics.mean(lv["latency_ms"]["p99"] for lv in per_round),
                         "errors": sum(lv["error_count"] for lv in per_round)})
    return rows


def table(rows: list[dict]) -> str:
    columns = [("layout", ""), ("concurrency", ""), ("req/s", ".3g"), ("vs first, by round", ""),
               ("p50 ms", ".0f"), ("p99 ms", ".0f"), ("errors", "")]
    return text_table(columns, [(r["layout"], r["concurrency"], r["throughput_rps"],
                                 " ".join(f"{x:.2f}x" for x in r["ratio_by_round"]), r["p50_ms"], r["p99_ms"],
                                 r["errors"]) for r in rows])


def plot(rows: list[dict], levels: list[int], path: Path) -> None:
    names = list(dict.fromkeys(r["layout"] for r in rows))
    with figures(path, 2, (11, 4)) as (speed, latency):
        width = 0.8 / len(names)
        for j, name in enumerate(names):
            mine = [r for r in rows if r["layout"] == name]
            xs = [i + j * width for i in range(len(levels))]
            speed.bar(xs, [r["throughput_rps"] for r in mine], width, label=name)
            latency.bar(xs, [r["p50_ms"] / 1000 for r in mine], width, label=name)
        for axes, label in ((speed, "reranked Searches per second"), (latency, "p50 latency (s)")):
            axes.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(levels))],
                            [f"{c} in flight" for c in levels])
            axes.set_ylabel(label)
            axes.legend()
        speed.set_title("throughput (closed loop)")
        latency.set_title("a request's latency")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cores = cpu_threads()
    levels = [1, 2 * cores]
    chosen = layouts(cores)
    args.out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[list[dict]]] = {layout.name: [] for layout in chosen}
    for index in range(args.rounds):
        order = chosen if index % 2 == 0 else chosen[::-1]
        for layout in order:
            print(f"\nround {index + 1}/{args.rounds}: {layout.name}", flush=True)
            out = args.out / "rounds" / f"{layout.replicas}x{layout.threads}-round{index + 1}.json"
            runs[layout.name].append(measure(layout, levels, out, args))
    rows = summarise([layout.name for layout in chosen], runs, levels)
    result = {"device": describe_device(torch.device("cpu")), "cores": cores, "rerank_depth": args.rerank_depth,
              "rounds": args.rounds, "levels": levels, "rows": rows}
    (args.out / "cpu-layout.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "cpu-layout.md").write_text(table(rows) + "\n")
    plot(rows, levels, args.out / "cpu-layout.png")
    print(table(rows))
    print(f"wrote {args.out / 'cpu-layout.json'}, .md and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
