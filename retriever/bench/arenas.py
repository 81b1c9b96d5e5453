"""What glibc's malloc arenas do to a retriever's memory, and what an open collection costs.

    python -m retriever.bench.arenas [--cycles 40]

Three runs, each in a fresh process (the arena cap must be set before threads start), each an engine with the
bundled embedder: `cycle` creates a collection, upserts two documents and deletes the collection, `--cycles`
times, with glibc's default arenas and then with two (`common.allocator`, the services' default); `keep`
creates as many collections and keeps them (two arenas). Printed: RSS, threads and open descriptors every
five cycles, and RSS after `malloc_trim` (memory freed but kept by the allocator comes back there).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import tempfile
from pathlib import Path

from common.fresh import json_from_child
from common.procstats import ProcessStats


def run(mode: str, arenas: int, cycles: int) -> dict[str, object]:
    """One run in this process (called in a fresh child)."""
    from common.allocator import limit_malloc_arenas

    limit_malloc_arenas(arenas)
    from retriever.embedder import Embedder
    from retriever.engine import RetrieverEngine
    from retriever.types import Document

    engine = RetrieverEngine(Path(tempfile.mkdtemp(prefix="arenas-")), Embedder())
    engine.load()
    course = []
    for i in range(cycles):
        name = f"c{i}" if mode == "keep" else "cycled"
        engine.create_collection(name)
        engine.upsert(name, [Document(id="a", text="kittens purr"), Document(id="b", text="lava flows")])
        if mode == "cycle":
            engine.delete_collection(name)
        if (i + 1) % 5 == 0:
            course.append({"cycles": i + 1, **ProcessStats.of(os.getpid()).as_dict()})
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    trimmed = ProcessStats.of(os.getpid()).rss_mib
    return {"mode": mode, "malloc_arenas": arenas or "glibc default", "course": course, "rss_after_trim_mib": trimmed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=40)
    parser.add_argument("--child", nargs=2, metavar=("MODE", "ARENAS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cycles < 10:
        parser.error("--cycles: at least 10 (the course is sampled every 5 cycles; the growth needs two samples)")
    if args.child:
        print(json.dumps(run(args.child[0], int(args.child[1]), args.cycles)))
        return 0
    for mode, arenas in (("cycle", 0), ("cycle", 2), ("keep", 2)):
        result = json_from_child(["-m", "retriever.bench.arenas", "--cycles", str(args.cycles), "--child", mode,
                                  str(arenas)])
        first, last = result["course"][0], result["course"][-1]
        print(f"{mode:5s} arenas={result['malloc_arenas']!s:13s} RSS {first['rss_mib']} MiB after "
              f"{first['cycles']} cycles -> {last['rss_mib']} MiB after {last['cycles']} "
              f"({(last['rss_mib'] - first['rss_mib']) / (last['cycles'] - first['cycles']):+.2f} MiB per cycle); "
              f"threads {first['threads']} -> {last['threads']}, descriptors {first['open_fds']} -> "
              f"{last['open_fds']}; after malloc_trim {result['rss_after_trim_mib']} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
