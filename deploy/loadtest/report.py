"""The load test's printed table and its plot: throughput and latency against concurrency (closed loop) or
against the offered rate (open loop, capacity search, with the SLO and the capacity found)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from common.plots import figures
from common.report import text_table


def level_key(levels: Sequence[dict]) -> tuple[str, str]:
    """The level's variable and its column/axis label."""
    return ("rate_rps", "offered req/s") if levels and "rate_rps" in levels[0] else ("concurrency", "concurrency")


def format_table(levels: Sequence[dict]) -> str:
    key, label = level_key(levels)
    timing_fields = list(levels[0]["server_mean_ms"]) if levels else []
    columns = [(label, "g"), ("sent", ""), ("ok", ""), ("errors", ""), ("ok req/s", ".1f"), ("p50 ms", ".1f"),
               ("p95 ms", ".1f"), ("p99 ms", ".1f"), *[(f"srv {f}", ".1f") for f in timing_fields]]
    if levels and "meets_slo" in levels[0]:
        columns.append(("SLO", ""))
    rows = []
    for lv in levels:
        errors = ",".join(f"{code}:{n}" for code, n in lv["errors"].items()) or "0"
        lat = lv["latency_ms"]
        row = [lv[key], lv["requests"], lv["ok"], errors, lv["throughput_rps"], lat["p50"], lat["p95"], lat["p99"],
               *[lv["server_mean_ms"][f] for f in timing_fields]]
        rows.append(row + (["met" if lv["meets_slo"] else "missed"] if "meets_slo" in lv else []))
    return text_table(columns, rows)


def format_capacity(capacity: dict) -> str:
    slo = capacity["slo"]
    what = f"p{slo['percentile']:g} <= {slo['latency_ms']:g} ms, errors <= {slo['max_error_rate']:.0%}"
    if not capacity["capacity_rps"]:
        return f"capacity: no rate tried met the SLO ({what})"
    beyond = ("the highest rate tried" if capacity["reached_max_rps"]
              else f"{capacity['first_failing_rps']:.3g} req/s missed it")
    return f"capacity: {capacity['capacity_rps']:.3g} req/s meets the SLO ({what}); {beyond}"


def plot_levels(result: dict, path: Path) -> None:
    levels = result["levels"]
    key, label = level_key(levels)
    xs = [lv[key] for lv in levels]
    cfg = result["config"]
    what = (f"{cfg['service']} {cfg['docs_per_request']} docs/request" if cfg["service"] == "reranker"
            else f"search {cfg['collection']} top_k={cfg['top_k']} rerank_depth={cfg['rerank_depth']}")
    with figures(path, 2, (10, 4.2), f"{what} @ {cfg['target']} ({cfg['mode']} loop)") as (left, right):
        left.plot(xs, [lv["throughput_rps"] for lv in levels], marker="o", label="answered")
        if key == "rate_rps":
            left.plot(xs, xs, linestyle=":", color="grey", label="offered")
            left.legend()
        left.set_xlabel(label)
        left.set_ylabel("successful requests / s")
        left.set_title("throughput")
        for pct, marker in (("p50", "o"), ("p99", "s")):
            points = [(x, lv["latency_ms"][pct]) for x, lv in zip(xs, levels, strict=True)
                      if lv["latency_ms"][pct] is not None]
            right.plot([p[0] for p in points], [p[1] for p in points], marker=marker, label=pct)
        capacity = result.get("capacity")
        if capacity:
            right.axhline(capacity["slo"]["latency_ms"], color="red", linestyle="--", label="SLO")
            if capacity["capacity_rps"]:
                right.axvline(capacity["capacity_rps"], color="green", linestyle=":",
                              label=f"capacity {capacity['capacity_rps']:.3g}/s")
        right.set_xlabel(label)
        right.set_ylabel("latency (ms, from the scheduled send in open loop)")
        right.set_title("client latency")
        right.legend()
        for ax in (left, right):
            if key == "concurrency":
                ax.set_xticks(xs)
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
