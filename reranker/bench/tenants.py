"""`python -m reranker.bench tenants`: what serving T tenants as shared blocks costs.

For each T in --tenants (adapters: the shipped one plus T-1 derived from it with
seeded noise, see reranker.training.derive), side by side in one process:

  memory_ratio            (base + resident tenant blocks + shared-prefix cache + merged weights) / one
                          model
  naive_memory_ratio      T standalone models (each adapter merged into its own copy) / one model,
                          measured by building the copies
  mixed_throughput_ratio  requests/s of a stream whose requests cycle through T tenants, over the
                          same requests all sent by one tenant; same batches, same engine
  naive_mixed_throughput_ratio  the mixed stream on the T standalone copies (each batch split by
                          tenant, one forward per tenant), over the same single-tenant stream
  cold_load_ms            median LoadAdapter time of a tenant not resident (read, hash, register)

Streams alternate (single, mixed, naive) --repeats times; medians are reported.
"""

from __future__ import annotations

import argparse
import copy
import gc
import itertools
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from common.beir import iter_corpus, load_queries
from common.paths import SCIFACT
from common.plots import figure
from reranker.adapters import DEFAULT_ADAPTER
from reranker.blockrank import BlockRankForward
from reranker.engine import Reranker, RerankerConfig
from reranker.prompt import Prompt
from reranker.tenants import EquivalenceMode, TenantHandle
from reranker.training.derive import derive_adapter, merge_adapter
from reranker.zoo import unique_bytes


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def make_adapters(root: Path, count: int, noise: float) -> list[str]:
    """Adapter names under root: the shipped adapter and count-1 derived tenants."""
    names = []
    for i in range(count):
        name = f"tenant-{i:02d}"
        derive_adapter(DEFAULT_ADAPTER, root / name, seed=1000 + i, noise=0.0 if i == 0 else noise)
        names.append(name)
    return names


def make_requests(data: Path, n_requests: int, n_docs: int, seed: int) -> list[tuple[str, list[tuple[str, str]]]]:
    rng = random.Random(seed)
    corpus = [(d.title, d.text) for d in itertools.islice(iter_corpus(data), 3000)]
    queries = list(load_queries(data).values())
    return [(rng.choice(queries), rng.sample(corpus, n_docs)) for _ in range(n_requests)]


Batch = list[tuple[Prompt, str]]  # (prompt, tenant) pairs scored in one forward


def stream_seconds(batches: list[Batch], run_batch: Callable[[Batch], None]) -> float:
    start = time.perf_counter()
    for batch in batches:
        run_batch(batch)
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> dict:
    counts = sorted(int(t) for t in args.tenants.split(","))
    workdir = Path(tempfile.mkdtemp(prefix="tenant-bench-"))
    names = make_adapters(workdir, max(counts), args.noise)
    reranker = Reranker(RerankerConfig(model=args.model, device=args.device, adapter="none",
                                       adapters_root=str(workdir), equivalence=EquivalenceMode.OFF,
                                       tenant_budget_mb=args.budget_mb))
    requests = make_requests(args.data, args.requests, args.docs, args.seed)
    rows = [measure_count(args, reranker, count, names, workdir, requests)
            for count in tqdm(counts, desc="tenant counts", unit="T")]
    return {
        "model": reranker.lm.name, "device": str(reranker.lm.device), "dtype": str(reranker.lm.dtype),
        "threads": torch.get_num_threads(), "one_model_bytes": reranker.tenants.zoo.base_bytes,
        "requests": args.requests, "docs_per_request": args.docs, "batch_requests": args.batch,
        "block_tokens": reranker.handle("t0").settings.spec.block_tokens, "repeats": args.repeats,
        "adapters": "the shipped scifact-lora + derived copies (seeded noise, reranker.training.derive)",
        "equivalence": "off while measuring (it runs in the background in service)",
        "results": rows,
    }


def load_cold(reranker: Reranker, tenants: list[str], names: list[str]) -> list[float]:
    """Exactly these tenants resident, each loaded cold; returns the load times in ms."""
    for t in reranker.tenants.loaded():
        if t not in tenants:
            reranker.tenants.unload(t)
    load_ms = []
    for tenant, name in zip(tenants, names, strict=False):
        if tenant in reranker.tenants.loaded():
            reranker.tenants.unload(tenant)  # every count measures cold loads of all its tenants
        start = time.perf_counter()
        reranker.tenants.load(tenant, name)
        load_ms.append((time.perf_counter() - start) * 1000)
    return load_ms


def measure_count(args: argparse.Namespace, reranker: Reranker, count: int, names: list[str], workdir: Path,
                  requests: list[tuple[str, list[tuple[str, str]]]]) -> dict:
    """One tenant count: cold loads, then single / mixed / naive streams alternated --repeats times."""
    tenants = [f"t{i}" for i in range(count)]
    load_ms = load_cold(reranker, tenants, names)
    handles = {t: reranker.handle(t) for t in tenants}
    prompts = [handles[tenants[0]].builder.build(q, docs) for q, docs in requests]
    single = _batches(prompts, [tenants[0]] * len(prompts), args.batch)
    mixed = _batches(prompts, [tenants[i % count] for i in range(len(prompts))], args.batch)

    def engine_batch(batch: Batch) -> None:
        reranker.score_prompts([p for p, _ in batch], [reranker.handle(t) for _, t in batch])

    engine_batch(single[0])  # warm-up (and fills the shared-prefix cache for these chains)
    engine_batch(mixed[0])
    rss_before_copies = rss_bytes()
    copies = _standalone_copies(reranker, tenants, names, workdir) if args.naive else {}
    naive_bytes = sum(unique_bytes(m.model.parameters()) for m in copies.values())
    rss_copies = rss_bytes() - rss_before_copies
    timings = time_streams(args.repeats, single, mixed, engine_batch, _naive_runner(copies, handles))
    row = summarize(reranker, count, len(prompts), timings, load_ms, naive_bytes if copies else None)
    row["naive_rss_growth_bytes"] = rss_copies
    tqdm.write(str({k: v for k, v in row.items() if k not in ("cold_load_ms_all", "stream_seconds")}))
    del copies
    gc.collect()
    return row


def _naive_runner(copies: dict[str, BlockRankForward], handles: dict[str, TenantHandle]
                  ) -> Callable[[Batch], None] | None:
    """The naive deployment's batch: split by tenant, one forward per tenant's own model."""
    if not copies:
        return None

    def naive_batch(batch: Batch) -> None:
        for tenant in dict.fromkeys(t for _, t in batch):
            own = [p for p, t in batch if t == tenant]
            copies[tenant].score(own, handles[tenant].settings.spec)

    return naive_batch


def time_streams(repeats: int, single: list[Batch], mixed: list[Batch], engine_batch: Callable[[Batch], None],
                 naive_batch: Callable[[Batch], None] | None) -> dict[str, list[float]]:
    timings: dict[str, list[float]] = {"single": [], "mixed": [], "naive": []}
    for _ in range(repeats):
        timings["single"].append(stream_seconds(single, engine_batch))
        timings["mixed"].append(stream_seconds(mixed, engine_batch))
        if naive_batch is not None:
            timings["naive"].append(stream_seconds(mixed, naive_batch))
    return timings


def summarize(reranker: Reranker, count: int, n_prompts: int, timings: dict[str, list[float]],
              load_ms: list[float], naive_bytes: int | None) -> dict:
    one_model = reranker.tenants.zoo.base_bytes
    usage = reranker.tenants.zoo.usage()
    kept = reranker.forward.weights.merged
    merged = kept.nbytes if kept is not None else 0
    resident = one_model + usage.tenant_bytes + reranker.prefix_cache.nbytes + merged
    med = {k: statistics.median(v) for k, v in timings.items() if v}
    return {
        "tenants": count,
        "memory_ratio": resident / one_model,
        "mixed_throughput_ratio": med["single"] / med["mixed"],
        "cold_load_ms": statistics.median(load_ms),
        "naive_memory_ratio": (naive_bytes / one_model) if naive_bytes is not None else float(count),
        "naive_mixed_throughput_ratio": (med["single"] / med["naive"]) if "naive" in med else None,
        "single_requests_per_s": n_prompts / med["single"],
        "mixed_requests_per_s": n_prompts / med["mixed"],
        "cold_load_ms_all": load_ms,
        "tenant_block_bytes": usage.tenant_bytes,
        "prefix_cache_bytes": reranker.prefix_cache.nbytes,
        "merged_weights_bytes": merged,
        "stream_seconds": timings,
        "naive_measured": naive_bytes is not None,
    }


def _batches(prompts: list[Prompt], tenants: list[str], size: int) -> list[Batch]:
    pairs = list(zip(prompts, tenants, strict=True))
    return [pairs[i:i + size] for i in range(0, len(pairs), size)]


def _standalone_copies(reranker: Reranker, tenants: list[str], names: list[str], root: Path
                       ) -> dict[str, BlockRankForward]:
    """The naive deployment: one full model per tenant, its adapter merged in."""
    copies = {}
    for tenant, name in tqdm(list(zip(tenants, names, strict=False)), desc="naive copies", unit="model",
                             leave=False):
        copies[tenant] = BlockRankForward(merge_adapter(copy.deepcopy(reranker.lm.model), root / name))
    return copies


def plot(result: dict, path: Path) -> None:
    rows = result["results"]
    t = [r["tenants"] for r in rows]
    with figure(path, (7, 4.5)) as ax:
        ax.plot(t, [r["memory_ratio"] for r in rows], marker="o", label="shared blocks: memory / one model")
        ax.plot(t, [r["naive_memory_ratio"] for r in rows], marker="s", linestyle="--",
                label="one model per tenant: memory / one model")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xticks(t, [str(x) for x in t])
        ax.set_xlabel("tenants resident")
        ax.set_ylabel("memory relative to one model")
        right = ax.twinx()
        right.plot(t, [r["mixed_throughput_ratio"] for r in rows], marker="^", color="tab:green",
                   label="mixed / single-tenant throughput (shared blocks)")
        naive = [(r["tenants"], r["naive_mixed_throughput_ratio"]) for r in rows if r["naive_mixed_throughput_ratio"]]
        if naive:
            right.plot(*zip(*naive, strict=True), marker="v", linestyle="--", color="tab:red",
                       label="mixed / single-tenant throughput (model per tenant)")
        right.set_ylim(0, 1.3)
        right.set_ylabel("throughput ratio")
        lines = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
        labels = ax.get_legend_handles_labels()[1] + right.get_legend_handles_labels()[1]
        ax.legend(lines, labels, fontsize=7, loc="upper left")
        ax.set_title(f"{result['model']} on {result['device']}, {result['docs_per_request']} docs/request")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tenants", default="1,4,16")
    p.add_argument("--requests", type=int, default=24)
    p.add_argument("--docs", type=int, default=20, help="documents per request")
    p.add_argument("--batch", type=int, default=4, help="requests per forward (what the batcher forms under load)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--noise", type=float, default=0.05, help="relative noise of the derived adapters")
    p.add_argument("--budget-mb", type=int, default=512)
    p.add_argument("--no-naive", dest="naive", action="store_false", help="skip building T standalone copies")
    p.add_argument("--model", default="")
    p.add_argument("--device", default="auto")
    p.add_argument("--data", type=Path, default=SCIFACT)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)

