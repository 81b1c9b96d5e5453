"""Storage at scale (the local backend): what a write costs as a collection grows, what a restart costs,
and what an ingest does to searches.

    python -m retriever.bench.storage --out bench-results/storage.json [--sizes 10000,1000000]

For each size, a collection is filled (10,000-document writes) with synthetic documents (40 words drawn
from SciFact's vocabulary by frequency) and random unit 384-d vectors: embedding is the ingest's other
cost and is measured in retriever.bench, not here. Then, side by side at each size:
- upsert latency of 256-document batches: new ids, replaced ids (existing documents), deletes;
- the first-stage search (dense top-100, lexical top-100, the top hits' texts; pre-computed query vectors)
  p50/p99 idle and while a writer upserts 256-document batches at 5 a second;
- a checkpoint (the dense index written to disk; on its own here, the background checkpointer's policy
  is off so that it does not land inside the timed writes), and the part of it writers wait for (the
  in-memory copy of the index);
- a restart in a fresh process: load time and resident memory, and the collection's size on disk.
Writes JSON and a PNG with the same stem, and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from common.beir import iter_corpus
from common.fresh import json_from_child
from common.paths import REPO_ROOT, SCIFACT
from common.plots import figures
from common.types import Document
from retriever.collection import CheckpointPolicy, Collection
from retriever.types import CollectionSpec

DIM = 384
BATCH = 256
FILL_BATCH = 10_000
WORDS_PER_DOC = 40
MANUAL = CheckpointPolicy(min_changes=10**12, max_interval_s=1e12)


@dataclass
class SizeResult:
    documents: int
    fill_docs_per_s: float
    upsert_new_ms: tuple[float, float]  # p50, p99 over the timed batches
    upsert_replace_ms: tuple[float, float]
    delete_ms: tuple[float, float]
    search_idle_ms: tuple[float, float]  # p50, p99
    search_ingest_ms: tuple[float, float]
    ingest_batches_during_search: int
    checkpoint_s: float
    checkpoint_writers_wait_s: float  # the in-memory copy of the index, which writers wait for
    restart_s: float
    restart_rss_mb: float
    disk_mb: float


class Synthetic:
    """Documents of SciFact-frequency words and random unit vectors, reproducible by seed."""

    def __init__(self, data: Path, seed: int) -> None:
        counts = Counter(w for doc in iter_corpus(data) for w in doc.embedding_text().split())
        self.words = np.array(list(counts))
        self.p = np.array(list(counts.values()), dtype=np.float64) / sum(counts.values())
        self.rng = np.random.default_rng(seed)

    def text(self, n: int = WORDS_PER_DOC) -> str:
        return " ".join(self.words[self.rng.choice(len(self.words), size=n, p=self.p)])

    def batch(self, ids: Sequence[str], tag: str = "") -> tuple[list[Document], np.ndarray]:
        words = self.words[self.rng.choice(len(self.words), size=len(ids) * WORDS_PER_DOC, p=self.p)]
        texts = [" ".join(words[i * WORDS_PER_DOC:(i + 1) * WORDS_PER_DOC]) for i in range(len(ids))]
        vectors = self.rng.normal(size=(len(ids), DIM)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        return [Document(i, tag, t) for i, t in zip(ids, texts, strict=True)], vectors


def bench_size(size: int, synthetic: Synthetic, root: Path, timed_batches: int) -> SizeResult:
    directory = root / f"c{size}"
    collection = Collection.create(CollectionSpec("c", DIM), directory, MANUAL)
    start = time.perf_counter()
    with tqdm(total=size, desc=f"fill {size:,}", unit="doc") as bar:
        for first in range(0, size, FILL_BATCH):
            ids = [f"d{i}" for i in range(first, min(first + FILL_BATCH, size))]
            collection.upsert(*synthetic.batch(ids))
            bar.update(len(ids))
    fill = size / (time.perf_counter() - start)
    checkpoint_start = time.perf_counter()
    collection.checkpoint()
    checkpoint_s = time.perf_counter() - checkpoint_start
    copy_start = time.perf_counter()
    collection.index.snapshot()
    copy_s = time.perf_counter() - copy_start

    fresh = iter(range(size, size + 10**7))
    new = _timed(timed_batches, lambda: collection.upsert(*synthetic.batch([f"d{next(fresh)}" for _ in range(BATCH)])))
    rng = np.random.default_rng(size)
    replace = _timed(timed_batches, lambda: collection.upsert(*synthetic.batch(
        [f"d{i}" for i in rng.choice(size, BATCH, replace=False)], "v2")))
    delete = _timed(timed_batches, lambda: collection.delete([f"d{i}" for i in rng.choice(size, BATCH, replace=False)]))
    idle, busy, written = _search_during_ingest(collection, synthetic, fresh)
    collection.close()
    restart_s, rss_mb = _restart(directory)
    return SizeResult(size, fill, new, replace, delete, idle, busy, written, checkpoint_s, copy_s, restart_s,
                      rss_mb, _disk_mb(directory))


def _timed(n: int, write: Callable[[], object]) -> tuple[float, float]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        write()
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def _search_during_ingest(collection: Collection, synthetic: Synthetic, fresh: object,
                          n_queries: int = 400) -> tuple[tuple[float, float], tuple[float, float], int]:
    queries = [(synthetic.batch(["q"])[1], synthetic.text(6)) for _ in range(n_queries)]
    batches = [synthetic.batch([f"d{next(fresh)}" for _ in range(BATCH)]) for _ in range(40)]  # type: ignore[call-overload]

    def search_times() -> np.ndarray:
        times = []
        for vector, text in queries:
            start = time.perf_counter()
            dense = collection.search_dense(vector, 100)[0]
            lexical = collection.search_lexical(text, 100)
            collection.get([i for i, _ in dense[:10] + lexical[:10]])
            times.append((time.perf_counter() - start) * 1e3)
        return np.asarray(times)

    search_times()
    before = search_times()
    stop, written = threading.Event(), [0]

    def ingest() -> None:
        for documents, vectors in batches:
            if stop.wait(0.2):
                return
            collection.upsert(documents, vectors)
            written[0] += 1

    writer = threading.Thread(target=ingest)
    writer.start()
    busy = search_times()
    stop.set()
    writer.join()
    idle = np.concatenate([before, search_times()])
    return _p50_p99(idle), _p50_p99(busy), written[0]


def _p50_p99(times: np.ndarray) -> tuple[float, float]:
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


_RESTART = """
import json, sys, time
from pathlib import Path
from typing import Any
start = time.perf_counter()
from retriever.collection import Collection, CheckpointPolicy
c = Collection.load(Path(sys.argv[1]), CheckpointPolicy(min_changes=10**12, max_interval_s=1e12))
seconds = time.perf_counter() - start
rss = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")][0] / 1024
c.close()
print(json.dumps({"seconds": seconds, "rss_mb": rss, "documents": c.stats().document_count}))
"""


def _restart(directory: Path) -> tuple[float, float]:
    """Load in a fresh process (imports included): the time to serving and the memory it holds then."""
    result = json_from_child(["-c", _RESTART, str(directory)], cwd=REPO_ROOT)
    return float(result["seconds"]), float(result["rss_mb"])


def _disk_mb(directory: Path) -> float:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file()) / 2**20


def plot(results: list[SizeResult], path: Path) -> None:
    labels = [f"{r.documents:,}" for r in results]
    x = np.arange(len(results))
    with figures(path, 3, (15, 4), "Local storage: a write costs what it carries") as (writes, searches, restart):
        for offset, (name, key) in enumerate([("upsert new", "upsert_new_ms"), ("upsert replace", "upsert_replace_ms"),
                                              ("delete", "delete_ms")]):
            writes.bar(x + (offset - 1) * 0.25, [getattr(r, key)[0] for r in results], 0.25, label=name)
        writes.set(xticks=x, xticklabels=labels, xlabel="documents in the collection",
                   ylabel="ms per 256-document batch (p50)", title="Write latency")
        writes.legend()
        searches.bar(x - 0.2, [r.search_idle_ms[1] for r in results], 0.4, label="idle")
        searches.bar(x + 0.2, [r.search_ingest_ms[1] for r in results], 0.4, label="during ingest (5 batches/s)")
        searches.set(xticks=x, xticklabels=labels, ylabel="ms (p99)", title="First-stage search p99")
        searches.legend()
        restart.bar(x, [r.restart_s for r in results])
        restart.set(xticks=x, xticklabels=labels, ylabel="seconds", title="Restart (fresh process) to serving")


def table(results: list[SizeResult]) -> str:
    rows = ["| documents | fill docs/s | upsert new p50/p99 ms | replace p50/p99 | delete p50/p99 | search p99 idle "
            "/ ingest ms | checkpoint s (writers wait) | restart s | RSS MB | disk MB |", "|---" * 10 + "|"]
    for r in results:
        rows.append(f"| {r.documents:,} | {r.fill_docs_per_s:,.0f} | {r.upsert_new_ms[0]:.1f} / "
                    f"{r.upsert_new_ms[1]:.1f} | {r.upsert_replace_ms[0]:.1f} / {r.upsert_replace_ms[1]:.1f} | "
                    f"{r.delete_ms[0]:.1f} / {r.delete_ms[1]:.1f} | {r.search_idle_ms[1]:.2f} / "
                    f"{r.search_ingest_ms[1]:.2f} | {r.checkpoint_s:.1f} ({r.checkpoint_writers_wait_s:.2f}) | {r.restart_s:.1f} | "
                    f"{r.restart_rss_mb:,.0f} | {r.disk_mb:,.0f} |")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench-results" / "storage.json")
    parser.add_argument("--data", type=Path, default=SCIFACT, help="the collection whose vocabulary is drawn")
    parser.add_argument("--sizes", default="10000,1000000")
    parser.add_argument("--timed-batches", type=int, default=20)
    parser.add_argument("--workdir", type=Path, default=None, help="where the collections are built (default: tmp)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    synthetic = Synthetic(args.data, args.seed)
    root = Path(tempfile.mkdtemp(prefix="storage-bench-", dir=args.workdir))
    try:
        results = [bench_size(int(s), synthetic, root, args.timed_batches) for s in args.sizes.split(",")]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"cpu_count": os.cpu_count(), "batch": BATCH, "words_per_doc": WORDS_PER_DOC, "dimension": DIM,
              "results": [asdict(r) for r in results]}
    if len(results) > 1:
        first, last = results[0], results[-1]
        report["upsert_new_p50_ratio"] = last.upsert_new_ms[0] / first.upsert_new_ms[0]
        report["search_p99_ingest_over_idle"] = {str(r.documents): r.search_ingest_ms[1] / r.search_idle_ms[1]
                                                 for r in results}
    args.out.write_text(json.dumps(report, indent=2))
    plot(results, args.out.with_suffix(".png"))
    print(table(results))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
