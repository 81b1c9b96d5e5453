"""What writes do to a retriever's memory: the write path's high-water mark (the soak's write warm-up).

    python -m retriever.bench.writes [--writes 6000] [--batch 1] [--out bench-results/retriever_writes.json]

In a fresh process with glibc's arenas capped at two (as the services run), an engine with the bundled
embedder holds 300 SciFact documents; then `--writes` updates, `--batch` documents per upsert, each replacing a
random stored document with its text plus a revision number (a new term per write, as deploy.soak's updates
do). Each upsert is a commit: a tantivy segment, merged in the background. Resident memory (RSS and its
anonymous part) is sampled every `--every` writes; printed: the rise over the first 2,000 writes and over the
rest, and where the last third stands. A leak keeps rising; a high-water mark levels.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

from tqdm.auto import tqdm

from common.beir import iter_corpus
from common.paths import SCIFACT
from common.plots import figure
from common.procstats import ProcessStats

STORED = 300
HIGH_WATER_WRITES = 2000  # deploy.soak.RETRIEVER_WRITE_HIGH_WATER: the soak's write warm-up judged by this


def run(writes: int, batch: int, every: int, data: Path) -> list[dict[str, float]]:
    from common.allocator import limit_malloc_arenas

    limit_malloc_arenas(2)  # before the engine's threads start
    from retriever.embedder import Embedder
    from retriever.engine import RetrieverEngine
    from retriever.types import Document

    docs = [d for _, d in zip(range(STORED), iter_corpus(data), strict=False)]
    rng = random.Random(0)
    course: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="writes-") as tmp, RetrieverEngine(Path(tmp), Embedder()) as engine:
        engine.load()
        engine.create_collection("writes")
        engine.upsert("writes", docs)
        start = time.perf_counter()
        for done in tqdm(range(batch, writes + 1, batch), desc="writes", unit="upsert"):
            chosen = rng.sample(docs, batch)
            engine.upsert("writes", [Document(d.id, d.title, f"{d.text} (revision {done - i})", d.metadata)
                                     for i, d in enumerate(chosen)])
            if done % every < batch:
                stats = ProcessStats.of(os.getpid())
                course.append({"writes": done, "seconds": round(time.perf_counter() - start, 1),
                               "rss_mib": stats.rss_mib, "anon_mib": round(stats.rss_anon_mib, 1)})
    return course


def summary(course: list[dict[str, float]]) -> dict[str, float]:
    def at(writes: float) -> dict[str, float]:
        return min(course, key=lambda row: abs(row["writes"] - writes))

    start, knee, end = course[0], at(HIGH_WATER_WRITES), course[-1]
    last_third = [row["anon_mib"] for row in course if row["writes"] >= 2 * end["writes"] / 3]
    return {"anon_rise_to_2000_mib": round(knee["anon_mib"] - start["anon_mib"], 1),
            "anon_rise_after_2000_mib": round(end["anon_mib"] - knee["anon_mib"], 1),
            "anon_range_last_third_mib": round(max(last_third) - min(last_third), 1),
            "writes_per_s": round(end["writes"] / max(end["seconds"], 1e-9), 1)}


def plot(course: list[dict[str, float]], batch: int, path: Path) -> None:
    with figure(path) as ax:
        ax.plot([r["writes"] for r in course], [r["anon_mib"] for r in course], label="anonymous (RssAnon)")
        ax.plot([r["writes"] for r in course], [r["rss_mib"] for r in course], label="resident (RSS)")
        ax.axvline(HIGH_WATER_WRITES, color="grey", linestyle=":")
        ax.set(xlabel=f"documents written ({batch} per upsert)", ylabel="MiB",
               title="Retriever memory under writes (two malloc arenas)")
        ax.legend()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--writes", type=int, default=6000, help="documents written in all")
    parser.add_argument("--batch", type=int, default=1, help="documents per upsert (one commit each)")
    parser.add_argument("--every", type=int, default=100, help="sample every this many documents written")
    parser.add_argument("--data", type=Path, default=SCIFACT)
    parser.add_argument("--out", type=Path, default=Path("bench-results/retriever_writes.json"))
    args = parser.parse_args(argv)
    if args.writes < 3 * args.every or args.batch < 1:
        parser.error("--writes must cover at least three samples, --batch must be >= 1")
    course = run(args.writes, args.batch, args.every, args.data)
    result = {"writes": args.writes, "batch": args.batch, "stored": STORED, "malloc_arenas": 2,
              "summary": summary(course), "course": course}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(course, args.batch, args.out.with_suffix(".png"))
    print(json.dumps(result["summary"], indent=2))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
