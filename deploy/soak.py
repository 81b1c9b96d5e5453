"""A soak test: the three services on 127.0.0.1 under a mixed, valid workload for a bounded time (`make soak`).

    python -m deploy.soak [--duration-s 1500] [--sample-s 5] [--out bench-results/soak]

The workload, `--concurrency` workers each choosing its next operation at random (seeded, weights below):
hybrid searches and reranked searches (the default reranker and two registered tenants) through the gateway;
document updates, ingests and deletes straight to the retriever (the gateway does not carry writes), a churn
that keeps the number of stored documents constant, so stored data cannot explain growth; a tenant adapter
loaded through the gateway, used once and unloaded again. Every request must succeed.

Every `--sample-s` seconds: each process's resident memory, open file descriptors and threads (from /proc),
and the p50/p99 latency of each kind of operation finished in that window. After the warm-up
(`--warmup-fraction` of the run) every series gets a least-squares line (deploy.trend): a series fails when it
rises beyond both three times its own noise and its floor. Writes soak.json and soak.png under --out; exits 1
when a series grows or a request failed.

The retriever's write path has a high-water mark of its own: each write is a commit (a tantivy segment, merged
in the background), and its memory climbs in steps over the first thousands of commits (retriever.bench.writes:
+45 MiB over the first 2,000 single-document updates, +46 over the next 4,000). At the workload's ~1 write/s that
climb fills any run, and a line through it reads as a leak. So `--warmup-writes` single-document updates go
straight to the retriever before the workload starts (2,500 by default, a few minutes), and the default run is
long enough (1,500 s) for the retriever's memory to level under the mix (docs/operations.md). With fewer than
RETRIEVER_WRITE_HIGH_WATER warm-up writes the retriever's memory and the writes' latencies (which climb with the
commits too: +80 to +130 ms over the judged half of one-minute runs) are reported but not judged (the report says
so).
A short run could not judge it anyway: the retriever's memory also saw-tooths (drops of 40-110 MiB about every
50 s on the 2-core development machine), and a window shorter than two periods reads a rising edge as growth.

The reranker has a high-water mark too where it runs bf16 on a CPU: oneDNN builds and caches a kernel for every
new matmul shape, up to 128 per cache (common.device), ~150 MiB filled over its first ~50 reranks of varied
sizes. `--warmup-reranks` reranked searches (100 by default) go through before the workload to fill them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from common.paths import SCIFACT
from common.plots import figure_grid
from common.procstats import ProcessStats
from deploy.loadtest.runner import percentile
from deploy.loadtest.workloads import read_documents, read_queries
from deploy.trend import Trend, fit_trend
from reranker.adapters import DEFAULT_ADAPTER
from reranker.training.derive import derive_adapter
from services.client import wait_for_serving
from services.gen.retrieval.v1 import (
    adapter_pb2,
    adapter_pb2_grpc,
    document_pb2,
    retriever_pb2,
    retriever_pb2_grpc,
    search_pb2,
    search_pb2_grpc,
)
from services.run import RERANK_BY_DEFAULT, Process, start, stop_all

COLLECTION = "soak"
TENANTS = ("soak-a", "soak-b")  # registered for the whole run
CYCLED_ADAPTER = "soak-c-lora"  # loaded and unloaded again, under a tenant name of each worker's own
# Operation weights: searches dominate as in serving; writes and adapter churn often enough to show a leak.
WEIGHTS = {"search": 40, "reranked": 20, "update": 12, "churn": 14, "get": 10, "adapter": 4}
WRITES = ("update", "churn")  # the operations that commit to the retriever
# Floors: a rise below these never fails, however clean the line. Memory: 4 MiB per process, about what one
# glibc arena heap or one tenant's blocks takes; counts: two, the transient files and threads a
# request may hold (a WAL checkpoint, a tantivy merge).
FLOORS = {"rss_mib": 4.0, "open_fds": 2.0, "threads": 2.0}
LATENCY_FLOOR_FRACTION = 0.5  # a latency series fails only if it rises by more than half its median
# Latency percentiles are taken over windows of a twentieth of the run (at least --sample-s): rare operations
# get several requests per window. A series needs this many windows after warm-up to be judged.
LATENCY_WINDOWS = 20
MIN_WINDOWS = 8
RETRIEVER_WRITE_HIGH_WATER = 2000  # warm-up writes below which the retriever's memory is not judged (docstring)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration-s", type=float, default=1500.0,
                        help="length of the workload (after start-up and the write warm-up); the retriever's "
                             "memory takes about a quarter of an hour of the mix to level (docs/operations.md)")
    parser.add_argument("--sample-s", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--warmup-fraction", type=float, default=0.3, help="share of the run before trends count")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--documents", type=int, default=300, help="documents stored throughout")
    parser.add_argument("--churn-window", type=int, default=50, help="churned documents kept before deletion")
    parser.add_argument("--rerank-depth", type=int, default=10)
    parser.add_argument("--warmup-writes", type=int, default=2500,
                        help="single-document updates sent to the retriever before the workload; below "
                             f"{RETRIEVER_WRITE_HIGH_WATER} its memory and the writes' latencies are reported, "
                             "not judged")
    parser.add_argument("--warmup-reranks", type=int, default=100,
                        help="reranked searches before the workload: they fill the reranker's kernel caches")
    parser.add_argument("--data", type=Path, default=SCIFACT, help="BEIR directory: documents and queries")
    parser.add_argument("--out", type=Path, default=Path("bench-results/soak"))
    parser.add_argument("--base-port", type=int, default=51150)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


# ---- the stack -------------------------------------------------------------------------------------------------
def start_stack(args: argparse.Namespace, work: Path) -> list[Process]:
    port, logs = args.base_port, work / "logs"
    retriever = start("retriever", "services.retriever", ["--data-dir", str(work / "data")], port + 1, logs)
    reranker = start("reranker", "services.reranker", [
        "--adapters-root", str(work / "adapters"), "--tenants-store", f"file:{work / 'tenants.json'}",
        "--block-tokens", "64", "--equivalence", "off", *RERANK_BY_DEFAULT], port + 2, logs)
    for proc in (retriever, reranker):
        wait_for_serving(proc.target, timeout=900, alive=proc.alive)
    gateway = start("gateway", "services.gateway", ["--retriever-target", retriever.target,
                                                    "--reranker-target", reranker.target], port, logs)
    wait_for_serving(gateway.target, timeout=300, alive=gateway.alive)
    return [retriever, reranker, gateway]


# ---- the workload ----------------------------------------------------------------------------------------------
@dataclass
class Done:
    kind: str
    finished_s: float  # since the workload started
    latency_ms: float
    code: str


@dataclass
class Workload:
    gateway: search_pb2_grpc.SearchServiceAsyncStub
    admin: adapter_pb2_grpc.AdapterServiceAsyncStub
    retriever: retriever_pb2_grpc.RetrieverServiceAsyncStub
    queries: Sequence[str]
    documents: Sequence[document_pb2.Document]  # the stored base set (first --documents)
    spare: Sequence[document_pb2.Document]  # texts for churned documents
    args: argparse.Namespace
    churned: list[str] = field(default_factory=list)
    serial: int = 0

    def next_serial(self) -> int:
        self.serial += 1
        return self.serial

    async def search(self, rng: random.Random, worker: int) -> None:
        await self.gateway.Search(search_pb2.SearchRequest(collection=COLLECTION, query=rng.choice(self.queries),
                                                           top_k=10), timeout=60)

    async def reranked(self, rng: random.Random, worker: int, tenant: str | None = None) -> None:
        tenant = rng.choice(("", *TENANTS)) if tenant is None else tenant
        reply = await self.gateway.Search(search_pb2.SearchRequest(
            collection=COLLECTION, query=rng.choice(self.queries), top_k=5, rerank_depth=self.args.rerank_depth,
            tenant=tenant), timeout=300)
        if not reply.reranked:
            raise RuntimeError(f"a reranked search came back without reranking: {reply.rerank_skipped_reason}")

    async def update(self, rng: random.Random, worker: int) -> None:
        base = rng.choice(self.documents)
        revised = document_pb2.Document(id=base.id, title=base.title,
                                        text=f"{base.text} (revision {self.next_serial()})")
        await self.retriever.UpsertDocuments(retriever_pb2.UpsertDocumentsRequest(
            collection=COLLECTION, documents=[revised]), timeout=120)

    async def churn(self, rng: random.Random, worker: int) -> None:
        """Ingest one new document; past the window, delete the oldest churned one (stored count stays flat)."""
        serial = self.next_serial()
        source = self.spare[serial % len(self.spare)]
        doc_id = f"churn-{serial}"
        self.churned.append(doc_id)
        await self.retriever.UpsertDocuments(retriever_pb2.UpsertDocumentsRequest(collection=COLLECTION, documents=[
            document_pb2.Document(id=doc_id, title=source.title, text=source.text)]), timeout=120)
        if len(self.churned) > self.args.churn_window:
            oldest = self.churned.pop(0)
            reply = await self.retriever.DeleteDocuments(retriever_pb2.DeleteDocumentsRequest(
                collection=COLLECTION, ids=[oldest]), timeout=120)
            if reply.deleted_count != 1:
                raise RuntimeError(f"churned document {oldest} was not there to delete")

    async def get(self, rng: random.Random, worker: int) -> None:
        ids = [d.id for d in rng.sample(list(self.documents), 3)]
        reply = await self.retriever.GetDocuments(retriever_pb2.GetDocumentsRequest(collection=COLLECTION, ids=ids),
                                                  timeout=60)
        if reply.missing_ids:
            raise RuntimeError(f"stored documents missing: {list(reply.missing_ids)}")

    async def adapter(self, rng: random.Random, worker: int) -> None:
        """Bind a tenant of this worker's own, rerank for it once, unbind it."""
        tenant = f"cycle-{worker}"
        await self.admin.LoadAdapter(adapter_pb2.LoadAdapterRequest(tenant=tenant, adapter=CYCLED_ADAPTER),
                                     timeout=300)
        await self.reranked(rng, worker, tenant)
        reply = await self.admin.UnloadAdapter(adapter_pb2.UnloadAdapterRequest(tenant=tenant), timeout=120)
        if not reply.was_bound:
            raise RuntimeError(f"tenant {tenant} was not bound when unloaded")


Operation = Callable[[random.Random, int], Awaitable[None]]


async def drive(work: Workload, duration_s: float, concurrency: int, seed: int, started: float) -> list[Done]:
    """`concurrency` workers, each a seeded random walk over WEIGHTS (after one of each kind, shared out among
    them), until `duration_s` has passed."""
    operations: dict[str, Operation] = {kind: getattr(work, kind) for kind in WEIGHTS}
    done: list[Done] = []
    deadline = started + duration_s

    async def worker(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        first = list(WEIGHTS)[index::concurrency]  # every kind runs at least once, however short the run
        while time.monotonic() < deadline:
            kind = first.pop(0) if first else rng.choices(list(WEIGHTS), weights=list(WEIGHTS.values()))[0]
            begin = time.monotonic()
            try:
                await operations[kind](rng, index)
                code = "OK"
            except grpc.aio.AioRpcError as err:
                code = err.code().name
            except RuntimeError as err:
                code = f"WRONG: {err}"
            now = time.monotonic()
            done.append(Done(kind, now - started, (now - begin) * 1000.0, code))

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return done


async def warm_up(operation: Callable[[random.Random], Awaitable[None]], count: int, concurrency: int,
                  what: str) -> None:
    """`count` calls of `operation`, `concurrency` at a time, before anything is measured."""
    if count <= 0:
        return
    from tqdm.auto import tqdm

    rng = random.Random(-1)
    with tqdm(total=count, desc=f"{what} warm-up", unit=what) as bar:
        async def caller(share: int) -> None:
            for _ in range(share):
                await operation(rng)
                bar.update(1)

        await asyncio.gather(*(caller(count // concurrency + (i < count % concurrency)) for i in range(concurrency)))


async def sample_processes(processes: Sequence[Process], every_s: float, started: float, stop: asyncio.Event,
                           into: list[dict[str, Any]]) -> None:
    while not stop.is_set():
        row: dict[str, Any] = {"t_s": round(time.monotonic() - started, 2)}
        for proc in processes:
            row[proc.name] = ProcessStats.of(proc.popen.pid).as_dict()
        into.append(row)
        try:
            await asyncio.wait_for(stop.wait(), timeout=every_s)
        except TimeoutError:
            pass


async def soak(args: argparse.Namespace, processes: Sequence[Process]) -> tuple[list[Done], list[dict[str, Any]]]:
    retriever, _, gateway = processes
    documents = read_documents(args.data, args.documents + 500)
    async with grpc.aio.insecure_channel(gateway.target) as front, grpc.aio.insecure_channel(retriever.target) as back:
        stub: retriever_pb2_grpc.RetrieverServiceAsyncStub = retriever_pb2_grpc.RetrieverServiceStub(back)
        await stub.CreateCollection(retriever_pb2.CreateCollectionRequest(collection=COLLECTION), timeout=60)
        await stub.UpsertDocuments(retriever_pb2.UpsertDocumentsRequest(
            collection=COLLECTION, documents=documents[:args.documents]), timeout=900)
        admin: adapter_pb2_grpc.AdapterServiceAsyncStub = adapter_pb2_grpc.AdapterServiceStub(front)
        for tenant in TENANTS:
            await admin.LoadAdapter(adapter_pb2.LoadAdapterRequest(tenant=tenant, adapter=f"{tenant}-lora"),
                                    timeout=300)
        search: search_pb2_grpc.SearchServiceAsyncStub = search_pb2_grpc.SearchServiceStub(front)
        work = Workload(search, admin, stub, read_queries(args.data, limit=200),
                        documents[:args.documents], documents[args.documents:], args)
        await warm_up(lambda rng: work.update(rng, 0), args.warmup_writes, args.concurrency, "write")
        await warm_up(lambda rng: work.reranked(rng, 0), args.warmup_reranks, args.concurrency, "rerank")
        samples: list[dict[str, Any]] = []
        stop, started = asyncio.Event(), time.monotonic()
        sampler = asyncio.create_task(sample_processes(processes, args.sample_s, started, stop, samples))
        try:
            done = await drive(work, args.duration_s, args.concurrency, args.seed, started)
        finally:
            stop.set()
            await sampler
    return done, samples


# ---- the verdict -----------------------------------------------------------------------------------------------
def latency_windows(done: Sequence[Done], every_s: float) -> dict[str, list[dict[str, float]]]:
    """Per kind of operation, the p50/p99 of the successful requests finished in each `every_s` window
    (windows without one are left out)."""
    by_window: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for d in done:
        if d.code == "OK":
            by_window[d.kind][int(d.finished_s // every_s)].append(d.latency_ms)
    return {kind: [{"t_s": (w + 0.5) * every_s, "n": len(v), "p50_ms": percentile(v, 50) or 0.0,
                    "p99_ms": percentile(v, 99) or 0.0} for w, v in sorted(windows.items())]
            for kind, windows in by_window.items()}


def unjudged(args: argparse.Namespace) -> dict[str, str]:
    """Series reported but not judged, and why: below the write high-water mark the retriever's memory and its
    writes' latencies still climb with every commit (segments to merge, a growing WAL), growth by design."""
    if args.warmup_writes >= RETRIEVER_WRITE_HIGH_WATER:
        return {}
    why = (f"{args.warmup_writes} warm-up writes < {RETRIEVER_WRITE_HIGH_WATER}: the retriever's write path had not "
           "reached its high-water mark")
    return {name: why for name in ("retriever.rss_mib", *(f"{kind}.{stat}" for kind in WRITES
                                                          for stat in ("p50_ms", "p99_ms")))}


def trends(samples: Sequence[dict[str, Any]], latency: dict[str, list[dict[str, float]]],
           names: Sequence[str], after_s: float) -> dict[str, Trend]:
    """Every series' trend after warm-up: each process's memory, descriptors and threads; each operation's
    p50 and p99 per latency window. A series with fewer than MIN_WINDOWS points is reported, not judged."""
    kept = [s for s in samples if s["t_s"] >= after_s]
    result = {}
    for name in names:
        for metric, floor in FLOORS.items():
            result[f"{name}.{metric}"] = fit_trend([s["t_s"] for s in kept], [s[name][metric] for s in kept], floor)
    for kind, windows in latency.items():
        usable = [w for w in windows if w["t_s"] >= after_s]
        if len(usable) < MIN_WINDOWS:
            continue
        for stat in ("p50_ms", "p99_ms"):
            values = [w[stat] for w in usable]
            floor = LATENCY_FLOOR_FRACTION * statistics.median(values)
            result[f"{kind}.{stat}"] = fit_trend([w["t_s"] for w in usable], values, floor)
    return result


def plot(samples: Sequence[dict[str, Any]], latency: dict[str, list[dict[str, float]]], names: Sequence[str],
         warmup_s: float, path: Path) -> None:
    with figure_grid(path, 2, 2, "Soak: the three services under a mixed workload") as axes:
        t = [s["t_s"] for s in samples]
        for ax, metric, label in zip(axes[:3], FLOORS, ("resident memory (MiB)", "open file descriptors", "threads"),
                                     strict=True):
            for name in names:
                ax.plot(t, [s[name][metric] for s in samples], label=name)
            ax.set(xlabel="s", title=label)
        for kind, windows in latency.items():
            axes[3].plot([w["t_s"] for w in windows], [w["p50_ms"] for w in windows], label=f"{kind} p50")
        axes[3].set(xlabel="s", ylabel="ms", yscale="log", title="latency per window (p50)")
        for ax in axes:
            ax.axvline(warmup_s, color="grey", linestyle=":")
            ax.legend(fontsize="x-small")


def report(args: argparse.Namespace, done: Sequence[Done], samples: Sequence[dict[str, Any]],
           names: Sequence[str]) -> dict[str, Any]:
    warmup_s = args.warmup_fraction * args.duration_s
    latency = latency_windows(done, max(args.sample_s, args.duration_s / LATENCY_WINDOWS))
    fitted = trends(samples, latency, names, warmup_s)
    codes: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for d in done:
        codes[d.kind][d.code] += 1
    failed = sum(n for per_kind in codes.values() for code, n in per_kind.items() if code != "OK")
    skipped = unjudged(args)
    growing = sorted(name for name, trend in fitted.items() if trend.grows and name not in skipped)
    args.out.mkdir(parents=True, exist_ok=True)
    plot(samples, latency, names, warmup_s, args.out / "soak.png")
    return {"command": "python -m deploy.soak " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in
                                                          sorted(vars(args).items())),
            "duration_s": args.duration_s, "warmup_s": warmup_s, "requests": len(done), "failed": failed,
            "codes": {k: dict(v) for k, v in codes.items()}, "stored_documents": args.documents + args.churn_window,
            "growing": growing, "not_judged": skipped, "trends": {name: t.as_dict() for name, t in fitted.items()},
            "samples": list(samples), "latency_windows": latency, "passed": not failed and not growing}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    try:
        for i, name in enumerate((*TENANTS, CYCLED_ADAPTER.removesuffix("-lora"))):
            derive_adapter(DEFAULT_ADAPTER, work / "adapters" / f"{name}-lora", seed=i + 1)
        processes = start_stack(args, work)
        try:
            done, samples = asyncio.run(soak(args, processes))
        finally:
            stop_all(processes)
        result = report(args, done, samples, [p.name for p in processes])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    (args.out / "soak.json").write_text(json.dumps(result, indent=1))
    summary = {k: result[k] for k in ("requests", "failed", "codes", "growing", "passed")}
    summary["slopes"] = {n: f"{t['rise']:+.2f} over the window (noise {t['noise']:.2f}, floor {t['floor']:.2f})"
                         for n, t in result["trends"].items()}
    print(json.dumps(summary, indent=1))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
