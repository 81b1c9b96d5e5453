"""Benchmark of the retriever's two hot paths: embedding documents and searching the index.

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
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from itertools import islice
from pathlib import Path

import faiss
import numpy as np
import torch
from tqdm.auto import tqdm

from retriever.beir import iter_corpus, load_qrels, split_queries
from retriever.embedder import Embedder, EmbedderConfig, default_model_path, resolve_device, set_cpu_threads
from retriever.index import StringIdIndex
from retriever.types import HnswSettings, IndexKind

REPO = Path(__file__).resolve().parent.parent
DIMENSION = 384  # all-MiniLM-L6-v2
K = 10
WARMUP_TEXTS = 8
WARMUP_QUERIES = 10
RECALL_TARGET = 0.98
MAX_EF_SEARCH = 512
VERSIONED = ("torch", "transformers", "sentence-transformers", "faiss-cpu", "numpy")
CHUNK = 50_000  # synthetic vectors generated (and indexed) per step, to bound memory


# ---------------------------------------------------------------- embedding throughput


@dataclass
class EmbedRow:
    name: str
    precision: str
    docs: int
    seconds: float
    docs_per_s: float
    speedup_vs_st: float
    cosine_to_st_mean: float
    cosine_to_st_min: float


def load_texts(data: Path, limit: int | None) -> list[str]:
    return [doc.embedding_text() for doc in islice(iter_corpus(data), limit)]


def timed_encode(encode: Callable[[list[str]], np.ndarray], texts: list[str]) -> tuple[np.ndarray, float]:
    """Warm once (first-call allocations, lazy init) so the timing measures steady state."""
    encode(texts[:WARMUP_TEXTS])
    start = time.perf_counter()
    vectors = encode(texts)
    return vectors, time.perf_counter() - start


def sentence_transformers_encoder(device: torch.device) -> Callable[[list[str]], np.ndarray]:
    # Imported here: sentence-transformers is a dev-only dependency, needed by this benchmark alone.
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(default_model_path()), device=str(device))
    return lambda texts: model.encode(texts, batch_size=32, normalize_embeddings=True,
                                      show_progress_bar=len(texts) > WARMUP_TEXTS)


def our_encoder(embedder: Embedder) -> Callable[[list[str]], np.ndarray]:
    return lambda texts: embedder.encode(texts, progress=len(texts) > WARMUP_TEXTS)


def bench_embedding(texts: list[str], embedders: dict[str, Embedder], device: torch.device) -> list[EmbedRow]:
    reference, st_seconds = timed_encode(sentence_transformers_encoder(device), texts)
    rows = [embed_row("sentence-transformers", "fp32", reference, reference, st_seconds, st_seconds)]
    for precision, embedder in embedders.items():
        vectors, seconds = timed_encode(our_encoder(embedder), texts)
        name = f"Embedder ({precision})"
        rows.append(embed_row(name, dtype_name(embedder.dtype), vectors, reference, seconds, st_seconds))
    return rows


def embed_row(name: str, precision: str, vectors: np.ndarray, reference: np.ndarray,
              seconds: float, st_seconds: float) -> EmbedRow:
    # Both sides are unit vectors, so the row-wise dot product is the cosine.
    cosines = np.einsum("ij,ij->i", vectors, reference)
    return EmbedRow(name=name, precision=precision, docs=len(vectors), seconds=seconds,
                    docs_per_s=len(vectors) / seconds, speedup_vs_st=st_seconds / seconds,
                    cosine_to_st_mean=float(cosines.mean()), cosine_to_st_min=float(cosines.min()))


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


# ---------------------------------------------------------------- retrieval quality


def bench_quality(data: Path, embedders: dict[str, Embedder], max_docs: int | None) -> dict:
    """nDCG@10 per precision with exact search, so only the embedding precision differs."""
    import ir_measures
    from ir_measures import nDCG

    docs = list(islice(iter_corpus(data), max_docs))
    doc_ids = [doc.id for doc in docs]
    qrels = restrict_qrels(load_qrels(data, "test"), set(doc_ids))
    queries = {qid: text for qid, text in split_queries(data, "test").items() if qid in qrels}
    result: dict = {"dataset": "scifact", "split": "test", "corpus_docs": len(docs), "queries": len(queries),
                    "dtype": {p: dtype_name(e.dtype) for p, e in embedders.items()}, "ndcg_at_10": {}}
    corpus_vectors: dict[str, np.ndarray] = {}
    for precision, embedder in embedders.items():
        corpus_vectors[precision] = embedder.encode([doc.embedding_text() for doc in docs], progress=True)
        query_vectors = embedder.encode(list(queries.values()))
        run = exact_run(corpus_vectors[precision], doc_ids, query_vectors, list(queries))
        result["ndcg_at_10"][precision] = ir_measures.calc_aggregate([nDCG @ 10], qrels, run)[nDCG @ 10]
    if {"fp32", "auto"} <= corpus_vectors.keys():
        result["auto_minus_fp32"] = result["ndcg_at_10"]["auto"] - result["ndcg_at_10"]["fp32"]
        cosines = np.einsum("ij,ij->i", corpus_vectors["auto"], corpus_vectors["fp32"])
        result["corpus_cosine_auto_vs_fp32"] = {"mean": float(cosines.mean()), "min": float(cosines.min())}
    return result


def restrict_qrels(qrels: dict[str, dict[str, int]], doc_ids: set[str]) -> dict[str, dict[str, int]]:
    """Judgements on documents we embedded; with a partial corpus (debug runs) the others are unreachable."""
    kept = {qid: {d: rel for d, rel in judged.items() if d in doc_ids} for qid, judged in qrels.items()}
    return {qid: judged for qid, judged in kept.items() if judged}


def exact_run(corpus: np.ndarray, doc_ids: list[str], queries: np.ndarray,
              query_ids: list[str]) -> dict[str, dict[str, float]]:
    index = faiss.IndexFlatIP(corpus.shape[1])
    index.add(corpus)
    scores, rows = index.search(queries, K)
    return {qid: {doc_ids[r]: float(s) for s, r in zip(row_scores, row_ids, strict=True) if r >= 0}
            for qid, row_scores, row_ids in zip(query_ids, scores, rows, strict=True)}


# ---------------------------------------------------------------- synthetic embeddings


class SyntheticEmbeddings:
    """Unit vectors shaped like sentence embeddings: clustered, with a low intrinsic dimension.

    Uniform random 384-d vectors are nearly equidistant from one another, which makes graph
    indexes look far worse than on real data. Real embeddings sit near a low-dimensional
    manifold and form topics, so we sample a Gaussian mixture (uneven cluster sizes) in a random
    subspace and add small isotropic noise in all dimensions. Chunk i is seeded by (seed, i), so a
    smaller collection is exactly a prefix of a larger one and queries never repeat database rows.
    """

    def __init__(self, seed: int, dimension: int = DIMENSION, subspace: int = 64, clusters: int = 1000,
                 spread: float = 0.6, noise: float = 0.2, shared: float = 0.4) -> None:
        rng = np.random.default_rng([seed, 0])
        self.seed = seed
        self.basis = np.linalg.qr(rng.standard_normal((dimension, subspace)))[0].T.astype(np.float32)
        self.centres = rng.standard_normal((clusters, subspace)).astype(np.float32)
        self.weights = rng.dirichlet(np.ones(clusters))
        self.spread = spread
        self.noise = noise
        # Real embeddings share a common direction (SciFact/MiniLM: mean vector norm ~0.38, mean pair
        # cosine ~0.14); `shared` is that offset's length relative to a typical vector's.
        typical_norm = np.sqrt(subspace * (1 + spread**2) + dimension * noise**2)
        direction = rng.standard_normal(dimension)
        self.offset = (shared * typical_norm * direction / np.linalg.norm(direction)).astype(np.float32)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        centre = self.centres[rng.choice(len(self.centres), size=n, p=self.weights)]
        latent = centre + self.spread * rng.standard_normal(centre.shape, dtype=np.float32)
        vectors = latent @ self.basis + self.offset
        vectors += self.noise * rng.standard_normal(vectors.shape, dtype=np.float32)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    def database(self, size: int) -> Iterator[np.ndarray]:
        for i, start in enumerate(range(0, size, CHUNK)):
            yield self.sample(min(CHUNK, size - start), np.random.default_rng([self.seed, 2, i]))

    def queries(self, n: int) -> np.ndarray:
        return self.sample(n, np.random.default_rng([self.seed, 1]))


# ---------------------------------------------------------------- search latency


@dataclass
class SearchRow:
    size: int
    index: str
    ef_search: int | None
    p50_ms: float
    p99_ms: float
    recall_at_10: float
    build_s: float


def build_indexes(data: SyntheticEmbeddings, size: int,
                  hnsw: HnswSettings) -> tuple[dict[IndexKind, StringIdIndex], dict[IndexKind, float]]:
    """Both indexes fed the same chunks; only faiss `add` time counts as build time."""
    indexes = {kind: StringIdIndex(DIMENSION, kind, hnsw) for kind in IndexKind}
    build_s = dict.fromkeys(IndexKind, 0.0)
    chunks = tqdm(data.database(size), total=-(-size // CHUNK), desc=f"build {size:,}", unit="chunk")
    for i, vectors in enumerate(chunks):
        ids = [str(i * CHUNK + j) for j in range(len(vectors))]
        for kind, index in indexes.items():
            start = time.perf_counter()
            index.upsert(ids, vectors)  # HNSW insertion is multithreaded by faiss (OpenMP)
            build_s[kind] += time.perf_counter() - start
    return indexes, build_s


def latencies_ms(index: StringIdIndex, queries: np.ndarray, desc: str) -> tuple[np.ndarray, list[set[str]]]:
    """One query per call, as the service sees them; returns per-query ms and the top-k id sets."""
    for query in queries[:WARMUP_QUERIES]:
        index.search(query[None], K)
    times, results = [], []
    for query in tqdm(queries, desc=desc, unit="q", leave=False):
        start = time.perf_counter()
        hits = index.search(query[None], K)[0]
        times.append((time.perf_counter() - start) * 1e3)
        results.append({doc_id for doc_id, _ in hits})
    return np.asarray(times), results


def recall(found: list[set[str]], truth: list[set[str]]) -> float:
    return float(np.mean([len(f & t) / len(t) for f, t in zip(found, truth, strict=True)]))


def set_ef_search(index: StringIdIndex, ef: int) -> None:
    faiss.downcast_index(index.faiss_index.index).hnsw.efSearch = ef


def ef_schedule(default: int) -> Iterator[int]:
    ef = default
    while ef <= MAX_EF_SEARCH:
        yield ef
        ef *= 2


def bench_search_size(data: SyntheticEmbeddings, size: int, queries: np.ndarray,
                      hnsw: HnswSettings) -> list[SearchRow]:
    indexes, build_s = build_indexes(data, size, hnsw)
    times, truth = latencies_ms(indexes[IndexKind.FLAT], queries, f"flat {size:,}")
    rows = [search_row(size, IndexKind.FLAT, None, times, 1.0, build_s[IndexKind.FLAT])]
    graph = indexes.pop(IndexKind.HNSW)
    del indexes  # free the flat copy before the HNSW runs
    for ef in ef_schedule(hnsw.ef_search):
        set_ef_search(graph, ef)
        times, found = latencies_ms(graph, queries, f"hnsw ef={ef} {size:,}")
        rows.append(search_row(size, IndexKind.HNSW, ef, times, recall(found, truth), build_s[IndexKind.HNSW]))
        if rows[-1].recall_at_10 >= RECALL_TARGET:
            break
    return rows


def search_row(size: int, kind: IndexKind, ef: int | None, times: np.ndarray, recall_at_10: float,
               build_s: float) -> SearchRow:
    return SearchRow(size=size, index=kind.value, ef_search=ef, p50_ms=float(np.percentile(times, 50)),
                     p99_ms=float(np.percentile(times, 99)), recall_at_10=recall_at_10, build_s=build_s)


def bench_search(sizes: Sequence[int], n_queries: int, seed: int) -> list[SearchRow]:
    data = SyntheticEmbeddings(seed)
    queries = data.queries(n_queries)
    return [row for size in sizes for row in bench_search_size(data, size, queries, HnswSettings())]


# ---------------------------------------------------------------- reporting


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo_lines() if line.startswith("model name")),
                 platform.processor() or "unknown")
    return f"cpu: {model}"


def cpuinfo_lines() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def table(columns: Sequence[tuple[str, str]], rows: Sequence[Sequence[object]]) -> str:
    """Right-aligned text table; columns are (header, format spec), None prints as '-'."""
    cells = [["-" if v is None else format(v, spec) for v, (_, spec) in zip(row, columns, strict=True)]
             for row in rows]
    headers = [header for header, _ in columns]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) for v, w in zip(values, widths, strict=True))

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, cells)])


def summary(report: dict) -> str:
    parts = [f"device: {report['device']}  (torch threads {report['cpu_threads']}, "
             f"faiss threads {report['faiss_threads']})"]
    if report["embedding"]:
        parts += ["", "embedding throughput (cos = cosine to sentence-transformers' vectors)", table(
            [("model", ""), ("dtype", ""), ("docs", ","), ("docs/s", ".1f"), ("speedup", ".2f"),
             ("cos mean", ".5f"), ("cos min", ".5f")],
            [[r["name"], r["precision"], r["docs"], r["docs_per_s"], r["speedup_vs_st"],
              r["cosine_to_st_mean"], r["cosine_to_st_min"]] for r in report["embedding"]])]
    if report["quality"]:
        q = report["quality"]
        parts += ["", f"SciFact test nDCG@10 ({q['queries']} queries, {q['corpus_docs']:,} docs, exact search)",
                  table([("precision", ""), ("nDCG@10", ".4f")], list(q["ndcg_at_10"].items()))]
        if "auto_minus_fp32" in q:
            parts.append(f"auto - fp32 = {q['auto_minus_fp32']:+.4f}")
    if report["search"]:
        parts += ["", f"search latency, k={K}, one query per call (synthetic {DIMENSION}-d)", table(
            [("size", ","), ("index", ""), ("efSearch", ""), ("p50 ms", ".3f"), ("p99 ms", ".3f"),
             ("recall@10", ".4f"), ("build s", ".2f")],
            [[r["size"], r["index"], r["ef_search"], r["p50_ms"], r["p99_ms"], r["recall_at_10"], r["build_s"]]
             for r in report["search"]])]
    return "\n".join(parts)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on servers
    import matplotlib.pyplot as plt

    fig, (ax_embed, ax_lat, ax_recall) = plt.subplots(1, 3, figsize=(17, 5))
    plot_embedding(ax_embed, report)
    plot_latency(ax_lat, report["search"])
    plot_recall(ax_recall, report["search"])
    fig.suptitle(f"retriever benchmark — {report['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_embedding(ax, report: dict) -> None:
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


def plot_latency(ax, rows: list[dict]) -> None:
    if not rows:
        ax.set_title("search latency (skipped)")
        return
    for (index, ef), series in group_search_rows(rows).items():
        label = index if ef is None else f"{index} ef={ef}"
        sizes = [r["size"] for r in series]
        (line,) = ax.plot(sizes, [r["p50_ms"] for r in series], marker="o", label=f"{label} p50")
        ax.plot(sizes, [r["p99_ms"] for r in series], marker="x", linestyle="--", color=line.get_color(),
                label=f"{label} p99")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("collection size (vectors)")
    ax.set_ylabel("latency per query (ms)")
    ax.set_title(f"search latency, k={K}, one query per call, {DIMENSION}-d")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)


def plot_recall(ax, rows: list[dict]) -> None:
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


# ---------------------------------------------------------------- entry point


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench-results" / "retriever.json")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "scifact")
    parser.add_argument("--device", default="auto", help="embedding device: auto, cpu, cuda")
    parser.add_argument("--embed-docs", type=int, default=1000, help="SciFact documents for throughput (0 = skip)")
    parser.add_argument("--quality", action=argparse.BooleanOptionalAction, default=True,
                        help="SciFact test nDCG@10, fp32 vs auto precision (embeds the corpus twice)")
    parser.add_argument("--quality-max-docs", type=int, default=None, help=argparse.SUPPRESS)  # debug: corpus prefix
    parser.add_argument("--sizes", type=parse_sizes, default=[5000, 1_000_000],
                        help="comma-separated synthetic collection sizes (empty = skip search)")
    parser.add_argument("--queries", type=int, default=200, help="search queries per size")
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
    embedders = {p: Embedder(EmbedderConfig(device=args.device, precision=p)) for p in ("auto", "fp32") if needed}
    texts = load_texts(args.data, args.embed_docs) if args.embed_docs else []
    report = {
        "device": device_description(device),
        "cpu_threads": torch.get_num_threads(),
        "faiss_threads": faiss.omp_get_max_threads(),
        "versions": {name: package_version(name) for name in VERSIONED},
        "config": {"embed_docs": len(texts), "sizes": args.sizes, "queries": args.queries, "k": K,
                   "seed": args.seed, "hnsw": asdict(HnswSettings()), "dimension": DIMENSION},
        "embedding": [asdict(r) for r in bench_embedding(texts, embedders, device)] if texts else [],
        "quality": bench_quality(args.data, embedders, args.quality_max_docs) if args.quality else None,
    }
    embedders.clear()  # the models are not needed for the index part
    report["search"] = [asdict(r) for r in bench_search(args.sizes, args.queries, args.seed)]
    write_outputs(report, args.out)
    print(summary(report))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')}")


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def write_outputs(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
