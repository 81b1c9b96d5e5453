"""Documents of uneven length on a CPU: the packed forward with every document padded to the longest of its
shortlist against only the real tokens in the rows (ForwardContext.ragged_docs, the CPU's default).

Padding costs a padded row's whole layer (norms, projections, MLP) though nothing reads it, so the gain is the
share of the rows that are padding: small on collections of long abstracts (every document fills its block), large
where documents are short beside the block. Per collection, `--queries` of its queries each over `--n-docs`
documents drawn at random from its corpus (seeded: a shortlist's lengths, not its relevance, set the cost), one
query at a time as at low load; both layouts on the same reranker and prompts, alternating over `--rounds` so that
drift on a shared machine falls on both alike. Seconds per query, the padding share, and the largest score
difference between the layouts (they compute the same ranking).
"""

from __future__ import annotations

import argparse
import itertools
import random
import statistics
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from common.beir import iter_corpus, load_queries
from common.paths import SHARED_DATA
from common.plots import figure
from reranker.bench.batch import cpu_reranker, described, max_difference
from reranker.engine import Reranker
from reranker.prompt import Prompt

COLLECTIONS = ("scifact", "nfcorpus", "cisi", "cacm", "med")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="")
    p.add_argument("--data", type=Path, action="append", default=None,
                   help="BEIR directory (repeatable; default: those of ../shared/data that exist)")
    p.add_argument("--dtype", default="auto", help="auto, fp32 or bf16")
    p.add_argument("--n-docs", type=int, default=20, help="documents per query")
    p.add_argument("--block-tokens", type=int, default=0, help="0: the adapter's")
    p.add_argument("--queries", type=int, default=5, help="per collection")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("bench-results/cpu/reranker_ragged.json"))


def collection_prompts(reranker: Reranker, data: Path, n_queries: int, n_docs: int) -> list[Prompt]:
    """`n_queries` of the collection's queries, each over its own `n_docs` random corpus documents."""
    corpus = [(d.title, d.text) for d in iter_corpus(data)]
    queries = list(itertools.islice(load_queries(data).values(), n_queries))
    rng = random.Random(0)
    handle = reranker.handle()
    return [reranker.build_prompt(q, rng.sample(corpus, n_docs), handle) for q in queries]


def padding_share(prompts: list[Prompt]) -> float:
    """Of the documents' rows padded to each shortlist's longest, the share that is padding."""
    real = sum(len(d) for p in prompts for d in p.docs)
    padded = sum(p.n_docs * max(map(len, p.docs)) for p in prompts)
    return 1 - real / padded


def run(args: argparse.Namespace) -> dict[str, Any]:
    reranker = cpu_reranker(args)
    handle = reranker.handle()
    sets = [d for d in args.data or [SHARED_DATA / name for name in COLLECTIONS] if (d / "corpus.jsonl").exists()]
    prompts = {d.name: collection_prompts(reranker, d, args.queries, args.n_docs) for d in sets}
    reranker.score_prompts(next(iter(prompts.values()))[:1], [handle])  # warm-up
    seconds: dict[tuple[str, bool], list[float]] = {(name, ragged): [] for name in prompts for ragged in (False, True)}
    scores: dict[tuple[str, bool], list[list[float]]] = {}
    for _ in tqdm(range(args.rounds), desc="rounds", unit="round"):
        for name, ragged in seconds:
            reranker.forward.ragged_docs = ragged
            start = time.perf_counter()
            scores[name, ragged] = [reranker.score_prompts([p], [handle])[0] for p in prompts[name]]
            seconds[name, ragged].append((time.perf_counter() - start) / len(prompts[name]))
    reranker.forward.ragged_docs = True
    rows = []
    for name, shortlists in prompts.items():
        padded_s, ragged_s = (statistics.median(seconds[name, r]) for r in (False, True))
        difference = max_difference(scores[name, False], scores[name, True])
        rows.append({"collection": name, "padding_share": padding_share(shortlists), "padded_s_per_query": padded_s,
                     "ragged_s_per_query": ragged_s, "speedup": padded_s / ragged_s,
                     "max_score_difference": difference})
        tqdm.write(f"{name:>9}: padding {rows[-1]['padding_share']:.0%} of the rows; padded {padded_s:.3f} s/query, "
                   f"ragged {ragged_s:.3f} s/query, {padded_s / ragged_s:.2f}x; scores differ by at most "
                   f"{difference:.2g}")
    return {**described(reranker), "n_docs": args.n_docs,
            "block_tokens": reranker.tenants.settings("").spec.block_tokens, "queries": args.queries,
            "rounds": args.rounds, "results": rows}


def plot(result: dict[str, Any], path: Path) -> None:
    rows = result["results"]
    xs = range(len(rows))
    with figure(path) as ax:
        ax.bar([x - 0.2 for x in xs], [r["padded_s_per_query"] for r in rows], 0.4, label="documents padded")
        ax.bar([x + 0.2 for x in xs], [r["ragged_s_per_query"] for r in rows], 0.4, label="real tokens only")
        ax.set_xticks(list(xs), [f"{r['collection']}\n{r['padding_share']:.0%} padding" for r in rows])
        ax.set_ylabel("seconds per query")
        ax.set_title(f"{result['n_docs']} random documents a query, {result['block_tokens']}-token blocks, "
                     f"{result['dtype']}, {result['threads']} threads")
        ax.legend()
