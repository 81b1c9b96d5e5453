"""Benchmark of the retriever's hot paths: embedding documents, searching the dense index, the lexical index.

Run as `python -m retriever.bench --out bench-results/retriever.json`; it writes that JSON,
a plot with the same stem (.png) and prints a summary table. Measured side by side:

1. Embedding throughput (docs/s) of the same model (all-MiniLM-L6-v2) on the same texts
   (the first `--embed-docs` SciFact documents): sentence-transformers `encode(batch_size=32)`
   as the reference, our `Embedder` at precision "auto" (bf16 on CPUs with native bf16) and
   at "fp32". Each row also reports the mean/min cosine of its vectors to the reference
   vectors, i.e. how much the speed costs in fidelity.
2. Quality (`--quality`): SciFact test nDCG@10 with exact search over the whole corpus,
   embedded once in fp32 and once in "auto" precision, so a precision change that loses
   ranking quality shows up as a difference here rather than in production.
3. Search latency p50/p99 (ms, one query per call, k=10) of exact (flat) vs HNSW indexes, built
   through the project's `StringIdIndex`, on synthetic 384-d unit vectors at each `--sizes`,
   plus HNSW recall@10 against exact search and its build time. Larger efSearch rows are added
   while recall@10 stays under 0.98, so the speed/recall trade-off is visible.
4. The lexical index (retriever/bench/lexical.py): BM25 indexing docs/s and search p50/p99 at each
   `--lexical-sizes`; SciFact ingest with the lexical index against the dense part of the same writes;
   hybrid against dense query latency through the engine.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import faiss
import torch

from common.device import Dtype, describe_device, resolve_device, set_cpu_threads
from common.paths import REPO_ROOT, SCIFACT
from retriever.bench.embedding import bench_embedding, bench_quality, load_texts
from retriever.bench.lexical import bench_hybrid_and_ingest, bench_lexical
from retriever.bench.report import package_version, summary, write_outputs
from retriever.bench.search import DIMENSION, K, bench_search
from retriever.embedder import Embedder, EmbedderConfig
from retriever.types import HnswSettings

VERSIONED = ("torch", "transformers", "sentence-transformers", "faiss-cpu", "numpy")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m retriever.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench-results" / "retriever.json")
    parser.add_argument("--data", type=Path, default=SCIFACT)
    parser.add_argument("--device", default="auto", help="embedding device: auto, cpu, cuda")
    parser.add_argument("--embed-docs", type=int, default=1000, help="SciFact documents for throughput (0 = skip)")
    parser.add_argument("--quality", action=argparse.BooleanOptionalAction, default=True,
                        help="SciFact test nDCG@10, fp32 vs auto precision (embeds the corpus twice)")
    parser.add_argument("--quality-max-docs", type=int, default=None, help=argparse.SUPPRESS)  # debug: corpus prefix
    parser.add_argument("--sizes", type=parse_sizes, default=[5000, 1_000_000],
                        help="comma-separated synthetic collection sizes (empty = skip search)")
    parser.add_argument("--queries", type=int, default=200, help="search queries per size")
    parser.add_argument("--lexical-sizes", type=parse_sizes, default=[5000, 1_000_000],
                        help="lexical index sizes, SciFact-vocabulary synthetic text past 5K (empty = skip)")
    parser.add_argument("--hybrid", action=argparse.BooleanOptionalAction, default=True,
                        help="SciFact ingest with the lexical index, and hybrid vs dense query latency")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def parse_sizes(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    set_cpu_threads()
    device = resolve_device(args.device)
    # One model per precision, shared by the throughput and quality parts.
    needed = args.embed_docs > 0 or args.quality
    embedders = {p: Embedder(EmbedderConfig(device=args.device, dtype=Dtype(p))) for p in ("auto", "fp32") if needed}
    texts = load_texts(args.data, args.embed_docs) if args.embed_docs else []
    report = {
        "device": describe_device(device),
        "cpu_threads": torch.get_num_threads(),
        "faiss_threads": faiss.omp_get_max_threads(),
        "versions": {name: package_version(name) for name in VERSIONED},
        "config": {"embed_docs": len(texts), "sizes": args.sizes, "queries": args.queries, "k": K,
                   "seed": args.seed, "hnsw": asdict(HnswSettings()), "dimension": DIMENSION},
        "embedding": [asdict(r) for r in bench_embedding(texts, embedders, device)] if texts else [],
        "quality": bench_quality(args.data, embedders, args.quality_max_docs) if args.quality else None,
    }
    hybrid_embedder = embedders.get("auto") or Embedder(EmbedderConfig(device=args.device))
    report["hybrid"] = bench_hybrid_and_ingest(args.data, hybrid_embedder, args.queries) if args.hybrid else None
    embedders.clear()  # the models are not needed for the index part
    del hybrid_embedder
    report["lexical"] = [asdict(r) for r in bench_lexical(args.data, args.lexical_sizes, args.queries, args.seed)]
    report["search"] = [asdict(r) for r in bench_search(args.sizes, args.queries, args.seed)]
    write_outputs(report, args.out)
    print(summary(report))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
