"""The load test's printed table and its plot."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from common.plots import figures
from common.report import text_table


def format_table(levels: Sequence[dict]) -> str:
    timing_fields = list(levels[0]["server_mean_ms"]) if levels else []
    columns = [("conc", ""), ("sent", ""), ("ok", ""), ("errors", ""), ("req/s", ".1f"), ("p50 ms", ".1f"),
               ("p95 ms", ".1f"), ("p99 ms", ".1f"), *[(f"srv {f}", ".1f") for f in timing_fields]]
    rows = []
    for lv in levels:
        errors = ",".join(f"{code}:{n}" for code, n in lv["errors"].items()) or "0"
        lat = lv["latency_ms"]
        rows.append([lv["concurrency"], lv["requests"], lv["ok"], errors, lv["throughput_rps"], lat["p50"],
                     lat["p95"], lat["p99"], *[lv["server_mean_ms"][f] for f in timing_fields]])
    return text_table(columns, rows)


def plot_levels(result: dict, path: Path) -> None:
    levels = result["levels"]
    conc = [lv["concurrency"] for lv in levels]
    cfg = result["config"]
    what = (f"{cfg['service']} {cfg['docs_per_request']} docs/request" if cfg["service"] == "reranker"
            else f"search {cfg['collection']} top_k={cfg['top_k']} rerank_depth={cfg['rerank_depth']}")
    with figures(path, 2, (10, 4.2), f"{what} @ {cfg['target']}") as (left, right):
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
