"""The retriever benchmark's printed summary, its plot and its JSON."""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path
from typing import Any

from common.plots import figures
from common.report import text_table
from retriever.bench.search import DIMENSION, RECALL_TARGET, K
from retriever.types import IndexKind


def summary(report: dict) -> str:
    parts = [f"device: {report['device']}  (torch threads {report['cpu_threads']}, "
             f"faiss threads {report['faiss_threads']})"]
    if report["embedding"]:
        parts += ["", "embedding throughput (cos = cosine to sentence-transformers' vectors)", text_table(
            [("model", ""), ("dtype", ""), ("docs", ","), ("docs/s", ".1f"), ("speedup", ".2f"),
             ("cos mean", ".5f"), ("cos min", ".5f")],
            [[r["name"], r["precision"], r["docs"], r["docs_per_s"], r["speedup_vs_st"],
              r["cosine_to_st_mean"], r["cosine_to_st_min"]] for r in report["embedding"]])]
    if report["quality"]:
        q = report["quality"]
        parts += ["", f"SciFact test nDCG@10 ({q['queries']} queries, {q['corpus_docs']:,} docs, exact search)",
                  text_table([("precision", ""), ("nDCG@10", ".4f")], list(q["ndcg_at_10"].items()))]
        if "auto_minus_fp32" in q:
            parts.append(f"auto - fp32 = {q['auto_minus_fp32']:+.4f}")
    if report["search"]:
        parts += ["", f"search latency, k={K}, one query per call (synthetic {DIMENSION}-d)", text_table(
            [("size", ","), ("index", ""), ("efSearch", ""), ("p50 ms", ".3f"), ("p99 ms", ".3f"),
             ("recall@10", ".4f"), ("build s", ".2f")],
            [[r["size"], r["index"], r["ef_search"], r["p50_ms"], r["p99_ms"], r["recall_at_10"], r["build_s"]]
             for r in report["search"]])]
    return "\n".join(parts + lexical_summary(report))


def lexical_summary(report: dict) -> list[str]:
    parts = []
    if report.get("lexical"):
        parts += ["", "lexical index (BM25, tantivy): indexing and search, k=100, one query per call", text_table(
            [("size", ","), ("index docs/s", ",.0f"), ("p50 ms", ".3f"), ("p99 ms", ".3f")],
            [[r["size"], r["index_docs_per_s"], r["p50_ms"], r["p99_ms"]] for r in report["lexical"]])]
    hybrid = report.get("hybrid")
    if hybrid:
        ingest = hybrid["ingest"]
        parts += ["", f"SciFact through the engine: ingest {ingest['total_s']:.1f} s, of which the lexical index "
                      f"{ingest['lexical_s']:.1f} s (+{100 * ingest['lexical_overhead']:.1f}% over dense alone)",
                  text_table([("mode", ""), ("p50 ms", ".2f"), ("p99 ms", ".2f")],
                             [[m, v["p50"], v["p99"]] for m, v in hybrid["query_ms"].items()]),
                  f"hybrid / dense p50: {hybrid['hybrid_over_dense_p50']:.2f}x"]
    return parts


def plot(report: dict, path: Path) -> None:
    with figures(path, 4, (22, 5), f"retriever benchmark — {report['device']}") as axes:
        plot_embedding(axes[0], report)
        plot_latency(axes[1], report["search"])
        plot_recall(axes[2], report["search"])
        plot_lexical(axes[3], report)


def plot_lexical(ax: Any, report: dict) -> None:
    rows = report.get("lexical") or []
    if not rows:
        ax.set_title("lexical index (skipped)")
        return
    sizes = [r["size"] for r in rows]
    ax.plot(sizes, [r["p50_ms"] for r in rows], marker="o", label="BM25 p50")
    ax.plot(sizes, [r["p99_ms"] for r in rows], marker="x", linestyle="--", label="BM25 p99")
    hybrid = report.get("hybrid")
    if hybrid:
        for mode, marker in (("dense", "s"), ("hybrid", "^")):
            ax.scatter([hybrid["ingest"]["documents"]], [hybrid["query_ms"][mode]["p50"]], marker=marker,
                       label=f"{mode} p50 via the engine (SciFact, k=10)")
    _log_latency_axes(ax, "collection size (documents)", "lexical search and hybrid vs dense")


def plot_embedding(ax: Any, report: dict) -> None:
    rows = report["embedding"]
    if not rows:
        ax.set_title("embedding throughput (skipped)")
        return
    labels = ["\n".join([r["name"].replace(" (", "\n("), r["precision"]]) for r in rows]
    bars = ax.bar(labels, [r["docs_per_s"] for r in rows], color=["tab:gray", "tab:blue", "tab:cyan"][: len(rows)])
    for bar, row in zip(bars, rows, strict=True):
        ax.annotate(f"{row['docs_per_s']:.1f}/s\n{row['speedup_vs_st']:.2f}x", (bar.get_x() + bar.get_width() / 2,
                    bar.get_height()), ha="center", va="bottom", fontsize=9)
    ax.set_ylabel("docs/s")
    ax.set_title(f"embedding throughput ({rows[0]['docs']:,} SciFact docs)")
    ax.margins(y=0.2)
    if report["quality"]:
        text = ", ".join(f"{p}: {v:.4f}" for p, v in report["quality"]["ndcg_at_10"].items())
        ax.text(0.02, 0.97, f"nDCG@10 {text}", transform=ax.transAxes, va="top", fontsize=8)


def plot_latency(ax: Any, rows: list[dict]) -> None:
    if not rows:
        ax.set_title("search latency (skipped)")
        return
    for (index, ef), series in group_search_rows(rows).items():
        label = index if ef is None else f"{index} ef={ef}"
        sizes = [r["size"] for r in series]
        (line,) = ax.plot(sizes, [r["p50_ms"] for r in series], marker="o", label=f"{label} p50")
        ax.plot(sizes, [r["p99_ms"] for r in series], marker="x", linestyle="--", color=line.get_color(),
                label=f"{label} p99")
    _log_latency_axes(ax, "collection size (vectors)", f"search latency, k={K}, one query per call, {DIMENSION}-d")


def _log_latency_axes(ax: Any, xlabel: str, title: str) -> None:
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("latency per query (ms)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)


def plot_recall(ax: Any, rows: list[dict]) -> None:
    if not rows:
        ax.set_title("HNSW recall (skipped)")
        return
    for (index, ef), series in group_search_rows(rows).items():
        if index == IndexKind.HNSW.value:
            ax.plot([r["size"] for r in series], [r["recall_at_10"] for r in series], marker="o", label=f"ef={ef}")
    ax.axhline(RECALL_TARGET, color="gray", linestyle=":", label=f"target {RECALL_TARGET}")
    ax.set_xscale("log")
    ax.set_xlabel("collection size (vectors)")
    ax.set_ylabel("recall@10 vs exact")
    ax.set_title("HNSW recall")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)


def group_search_rows(rows: list[dict]) -> dict[tuple[str, int | None], list[dict]]:
    groups: dict[tuple[str, int | None], list[dict]] = {}
    for row in sorted(rows, key=lambda r: r["size"]):
        groups.setdefault((row["index"], row["ef_search"]), []).append(row)
    return groups


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def write_outputs(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out.with_suffix(".png"))
