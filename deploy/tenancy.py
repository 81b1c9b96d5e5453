"""Tenants across reranker replicas, measured with real processes on 127.0.0.1 (`make bench-tenancy`):

    python -m deploy.tenancy --out bench-results/tenancy [--tenants 64] [--replicas 1,4] [--phase-s 30]

- scale-out: T tenants (adapters derived from the shipped one) registered once through the gateway, then served
  through it over 1 and over R replicas (tenant-affine routing, spread 1): the resident tenant-block bytes of
  each replica, and the cold loads per minute once every tenant has been seen (scraped from each replica's
  `reranker_tenant_cold_loads_total`).
- noisy neighbour: one replica, four tenants reranking straight at it (open loop, Poisson arrivals): three
  quiet ones at 20% of the measured capacity each and a fourth at that rate too (baseline), then offered 5x its
  fair share with its registry limits (max_queued 4, max_inflight 1), then the same flood with no per-tenant
  limits. Reported: the quiet tenants' p50/p99 and refusals per phase, the flood's refusals and how fast.

Writes tenancy.json and tenancy.png under --out. Every request goes to 127.0.0.1; every loop is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from common.paths import SCIFACT
from common.plots import figure_grid
from deploy.loadtest.openloop import run_rate
from deploy.loadtest.runner import Sample, percentile, send_one
from deploy.loadtest.workloads import read_documents, read_queries, rerank_workload
from reranker.adapters import DEFAULT_ADAPTER
from reranker.training.derive import derive_adapter
from services.client import wait_for_serving
from services.gen.retrieval.v1 import (
    adapter_pb2,
    adapter_pb2_grpc,
    retriever_pb2,
    retriever_pb2_grpc,
    search_pb2,
    search_pb2_grpc,
)
from services.run import start, stop_all

RERANK_DOCS = 4  # documents per rerank: small, so that the 2-core runs offer enough requests to measure
BLOCK = "64"
QUIET, FLOOD = ("quiet-1", "quiet-2", "quiet-3"), "flood"
FLOOD_LIMITS = adapter_pb2.TenantLimits(max_queued=4, max_inflight=1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench-results/tenancy"))
    parser.add_argument("--data", type=Path, default=SCIFACT, help="BEIR directory: documents and queries")
    parser.add_argument("--tenants", type=int, default=64)
    parser.add_argument("--replicas", default="1,4", help="replica counts for the scale-out stage")
    parser.add_argument("--steady-rounds", type=int, default=2, help="searches per tenant after the first")
    parser.add_argument("--phase-s", type=float, default=30.0, help="seconds of each noisy-neighbour phase")
    parser.add_argument("--base-port", type=int, default=51050)
    parser.add_argument("--stages", default="scale-out,noisy")
    return parser.parse_args(argv)


def derive_tenants(root: Path, names: Sequence[str]) -> None:
    for i, name in enumerate(names):
        derive_adapter(DEFAULT_ADAPTER, root / f"{name}-lora", seed=i + 1, noise=0.3)


def reranker_args(root: Path, registry: Path, metrics_port: int) -> list[str]:
    return ["--block-tokens", BLOCK, "--adapters-root", str(root), "--tenants-store", f"file:{registry}",
            "--equivalence", "off", "--metrics-port", str(metrics_port), "--max-documents", str(RERANK_DOCS * 4)]


def cold_loads(metrics_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    match = re.search(r"^reranker_tenant_cold_loads_total (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


# ---- scale-out -------------------------------------------------------------------------------------------------
async def scale_out(args: argparse.Namespace, replicas: int, work: Path) -> dict[str, Any]:
    tenants = [f"t{i:03d}" for i in range(args.tenants)]
    logs, port = work / f"logs-{replicas}", args.base_port
    metrics = [port + 20 + i for i in range(replicas)]
    processes = [start("retriever", "services.retriever", ["--data-dir", str(work / f"data-{replicas}")], port + 1,
                       logs)]
    processes += [start(f"reranker-{i}", "services.reranker", reranker_args(work / "adapters", work /
                        f"tenants-{replicas}.json", metrics[i]), port + 2 + i, logs) for i in range(replicas)]
    processes.append(start("gateway", "services.gateway", ["--retriever-target", processes[0].target,
                                                          "--reranker-target", ",".join(p.target for p in processes[1:]),
                                                          "--tenant-spread", "1"], port, logs))
    try:
        for proc in processes:
            wait_for_serving(proc.target, timeout=900, alive=proc.alive)
        async with grpc.aio.insecure_channel(processes[-1].target) as gateway:
            await ingest(processes[0].target, args.data)
            admin = adapter_pb2_grpc.AdapterServiceStub(gateway)
            for tenant in tenants:
                await admin.LoadAdapter(adapter_pb2.LoadAdapterRequest(tenant=tenant, adapter=f"{tenant}-lora"),
                                        timeout=300)
            queries = read_queries(args.data, limit=50)
            await search_each(gateway, tenants, queries, rounds=1)  # every tenant seen once
            before, start_s = sum(cold_loads(m) for m in metrics), time.monotonic()
            await search_each(gateway, tenants, queries, rounds=args.steady_rounds)
            steady_min = (time.monotonic() - start_s) / 60
            steady_loads = sum(cold_loads(m) for m in metrics) - before
            listing = await admin.ListAdapters(adapter_pb2.ListAdaptersRequest(), timeout=60)
    finally:
        stop_all(processes)
    rows = [{"address": r.address, "resident_tenants": len(r.resident_tenants), "tenant_bytes": r.tenant_bytes,
             "error": r.error} for r in listing.replicas]
    return {"replicas": replicas, "tenants": len(tenants), "per_replica": rows,
            "max_tenant_bytes": max(r.tenant_bytes for r in listing.replicas), "steady_minutes": steady_min,
            "steady_searches": len(tenants) * args.steady_rounds, "cold_loads_steady": steady_loads,
            "cold_loads_per_minute": steady_loads / steady_min if steady_min else 0.0}


async def ingest(retriever: str, data: Path) -> None:
    async with grpc.aio.insecure_channel(retriever) as channel:
        stub = retriever_pb2_grpc.RetrieverServiceStub(channel)
        await stub.CreateCollection(retriever_pb2.CreateCollectionRequest(collection="bench"), timeout=60)
        await stub.UpsertDocuments(retriever_pb2.UpsertDocumentsRequest(
            collection="bench", documents=read_documents(data, 300)), timeout=600)


async def search_each(gateway: grpc.aio.Channel, tenants: Sequence[str], queries: Sequence[str], rounds: int,
                      concurrency: int = 2) -> None:
    """Every tenant `rounds` reranked searches, `concurrency` at a time; any failure stops the benchmark."""
    stub = search_pb2_grpc.SearchServiceStub(gateway)
    jobs = [(t, queries[(i + r) % len(queries)]) for r in range(rounds) for i, t in enumerate(tenants)]
    gate = asyncio.Semaphore(concurrency)

    async def one(tenant: str, query: str) -> None:
        async with gate:
            reply = await stub.Search(search_pb2.SearchRequest(collection="bench", query=query, top_k=RERANK_DOCS,
                                                               rerank_depth=RERANK_DOCS, tenant=tenant), timeout=300)
            assert reply.reranked, reply.rerank_skipped_reason

    await asyncio.gather(*(one(t, q) for t, q in jobs))


# ---- noisy neighbour -------------------------------------------------------------------------------------------
async def noisy(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    port, metrics = args.base_port + 40, args.base_port + 41
    replica = start("reranker-noisy", "services.reranker", reranker_args(work / "adapters", work / "noisy.json",
                                                                         metrics), port, work / "logs-noisy")
    try:
        wait_for_serving(replica.target, timeout=900, alive=replica.alive)
        async with grpc.aio.insecure_channel(replica.target) as channel:
            return await noisy_phases(args, channel)
    finally:
        stop_all([replica])


async def noisy_phases(args: argparse.Namespace, channel: grpc.aio.Channel) -> dict[str, Any]:
    admin = adapter_pb2_grpc.AdapterServiceStub(channel)
    for tenant in (*QUIET, FLOOD):
        await admin.LoadAdapter(adapter_pb2.LoadAdapterRequest(tenant=tenant, adapter=f"{tenant}-lora",
                                                               limits=FLOOD_LIMITS if tenant == FLOOD else None),
                                timeout=300)
    queries, docs = read_queries(args.data, limit=50), read_documents(args.data, 40)
    probe = rerank_workload(channel, queries, docs, RERANK_DOCS, tenants=QUIET)
    calibration = [await send_one(probe, i, 120) for i in range(12)]
    service_ms = percentile([s.latency_ms for s in calibration[2:]], 50) or 1.0
    capacity = 1000.0 / service_ms
    quiet_rate, share = 0.2 * capacity, capacity / 4
    phases: dict[str, Any] = {}
    for name, flood_rate, limits in [("baseline", quiet_rate, FLOOD_LIMITS), ("flood", 5 * share, FLOOD_LIMITS),
                                     ("flood-no-limits", 5 * share, None)]:
        await admin.LoadAdapter(adapter_pb2.LoadAdapterRequest(tenant=FLOOD, adapter=f"{FLOOD}-lora", limits=limits),
                                timeout=300)
        rates = {**{t: quiet_rate for t in QUIET}, FLOOD: flood_rate}
        phases[name] = await phase(channel, queries, docs, rates, args.phase_s)
    baseline = phases["baseline"]["quiet"]["p99_ms"]
    return {"service_ms": service_ms, "capacity_rps": capacity, "quiet_rate_rps": quiet_rate, "fair_share_rps": share,
            "flood_limits": {"max_queued": 4, "max_inflight": 1}, "phases": phases,
            "quiet_p99_ratio": {n: p["quiet"]["p99_ms"] / baseline for n, p in phases.items()}}


async def phase(channel: grpc.aio.Channel, queries: Sequence[str], docs: Sequence[Any], rates: dict[str, float],
                duration_s: float) -> dict[str, Any]:
    """Each tenant an open loop at its rate for `duration_s` (at most 4x the expected arrivals), all at once."""
    async def tenant_run(i: int, tenant: str, rate: float) -> list[Sample]:
        workload = rerank_workload(channel, queries, docs, RERANK_DOCS, tenants=(tenant,))
        samples, _ = await run_rate(workload, rate, int(4 * rate * duration_s) + 10, duration_s, timeout_s=120,
                                    seed=i, progress=False)
        return samples

    results = await asyncio.gather(*(tenant_run(i, t, r) for i, (t, r) in enumerate(rates.items())))
    by_tenant = dict(zip(rates, results, strict=True))
    quiet = [s for t in QUIET for s in by_tenant[t]]
    return {"offered_rps": rates, "quiet": summary(quiet), "flood": summary(by_tenant[FLOOD]),
            "per_tenant": {t: summary(s) for t, s in by_tenant.items()}}


def summary(samples: Sequence[Sample]) -> dict[str, Any]:
    ok = [s.latency_ms for s in samples if s.code == "OK"]
    refused = [s.latency_ms for s in samples if s.code == "RESOURCE_EXHAUSTED"]
    return {"requests": len(samples), "ok": len(ok), "refused": len(refused),
            "other_errors": len(samples) - len(ok) - len(refused),
            "p50_ms": percentile(ok, 50), "p99_ms": percentile(ok, 99), "refused_p99_ms": percentile(refused, 99)}


# ---- report ----------------------------------------------------------------------------------------------------
def plot(result: dict[str, Any], path: Path) -> None:
    with figure_grid(path, 1, 2, "Tenants across replicas") as axes:
        runs = result.get("scale_out", [])
        if runs:
            axes[0].bar([str(r["replicas"]) for r in runs], [r["max_tenant_bytes"] / 2**20 for r in runs])
            axes[0].set(xlabel="replicas", ylabel="MiB", title=f"resident tenant blocks, largest replica "
                                                               f"({runs[0]['tenants']} tenants)")
        noisy_result = result.get("noisy")
        if noisy_result:
            names = list(noisy_result["phases"])
            axes[1].bar(names, [noisy_result["phases"][n]["quiet"]["p99_ms"] or 0 for n in names])
            axes[1].set(ylabel="ms", title="quiet tenants' p99 rerank latency")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stages = set(args.stages.split(","))
    work = Path(tempfile.mkdtemp(prefix="tenancy-"))
    derive_tenants(work / "adapters", [f"t{i:03d}" for i in range(args.tenants)] + [*QUIET, FLOOD])
    result: dict[str, Any] = {"command": "python -m deploy.tenancy " + " ".join(argv or [])}
    try:
        if "scale-out" in stages:
            result["scale_out"] = [asyncio.run(scale_out(args, int(n), work)) for n in args.replicas.split(",")]
            first, last = result["scale_out"][0], result["scale_out"][-1]
            result["memory_ratio"] = first["max_tenant_bytes"] / max(1, last["max_tenant_bytes"])
        if "noisy" in stages:
            result["noisy"] = asyncio.run(noisy(args, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tenancy.json").write_text(json.dumps(result, indent=2))
    plot(result, args.out / "tenancy.png")
    print(json.dumps({k: v for k, v in result.items() if k != "noisy"}, indent=2))
    if "noisy" in result:
        print(json.dumps({k: result["noisy"][k] for k in ("capacity_rps", "quiet_p99_ratio")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
