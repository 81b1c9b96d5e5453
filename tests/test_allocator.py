"""common.allocator.keep_freed_memory: freed blocks are reused instead of returned to the kernel and faulted back.

Each case runs in a fresh interpreter: glibc's thresholds are process-wide and adapt to what a process freed before.
The workload is a layer's worth of activations, twelve 6 MiB blocks taken and freed together, twenty times: with
glibc's adaptive thresholds the top of the heap (more than twice the largest block freed) goes back to the kernel
at each free and is faulted in again; with the memory kept, after the first cycle nothing is faulted. On a worker
thread with a second arena, 72 MiB spans two of that arena's 64 MiB heaps, and glibc unmaps the second whenever it
is free (~3,000 faults a cycle here), which is why the reranker runs with one.
"""

from __future__ import annotations

import os
import sys

import pytest

from common.allocator import RERANKER_ARENAS, RERANKER_KEEP_MB, keep_freed_memory
from common.fresh import json_from_child

BLOCK_MIB, BLOCKS, CYCLES = 6, 12, 20
PAGES_PER_CYCLE = BLOCK_MIB * BLOCKS * 256  # 4 KiB pages touched by one cycle

WORKLOAD = f"""
import json, resource, sys
from concurrent.futures import ThreadPoolExecutor
from common.allocator import keep_freed_memory, limit_malloc_arenas
keep_mb, arenas, threaded = (int(a) for a in sys.argv[1:])
limit_malloc_arenas(arenas)
applied = keep_freed_memory(keep_mb)
def cycle():
    held = [bytearray({BLOCK_MIB} << 20) for _ in range({BLOCKS})]  # zero-filled: every page is touched
    held.clear()
def faults():
    cycle()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range({CYCLES}):
        cycle()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / {CYCLES}
with ThreadPoolExecutor(1) as worker:  # a worker thread, as the reranker's forwards run, or the main thread
    per_cycle = worker.submit(faults).result() if threaded else faults()
print(json.dumps({{"applied": applied, "faults_per_cycle": per_cycle}}))
"""


def faults_per_cycle(keep_mb: int, arenas: int = 0, threaded: bool = False,
                     env: dict[str, str] | None = None) -> dict[str, float]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    return json_from_child(["-c", WORKLOAD, str(keep_mb), str(arenas), str(int(threaded))],
                           env={**clean, **(env or {})})


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_kept_memory_is_reused_without_page_faults() -> None:
    adaptive = faults_per_cycle(0)
    kept = faults_per_cycle(RERANKER_KEEP_MB)
    assert not adaptive["applied"] and kept["applied"]
    if adaptive["faults_per_cycle"] < PAGES_PER_CYCLE / 100:
        pytest.skip(f"this allocator kept the blocks by itself ({adaptive['faults_per_cycle']:.0f} faults a cycle)")
    # Kept: at most a page in a hundred of what a cycle touches (the interpreter's own small allocations).
    assert kept["faults_per_cycle"] <= PAGES_PER_CYCLE / 100, (adaptive, kept)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_the_reranker_settings_keep_memory_on_a_worker_thread() -> None:
    """The service's forwards run on a worker thread: with its one arena, that thread's blocks are kept too."""
    served = faults_per_cycle(RERANKER_KEEP_MB, RERANKER_ARENAS, threaded=True)
    assert served["applied"] and served["faults_per_cycle"] <= PAGES_PER_CYCLE / 100, served


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
@pytest.mark.parametrize("env", [{"MALLOC_TRIM_THRESHOLD_": "131072"}, {"MALLOC_MMAP_THRESHOLD_": "131072"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"}])
def test_the_operators_thresholds_win(env: dict[str, str]) -> None:
    assert not faults_per_cycle(RERANKER_KEEP_MB, env=env)["applied"]


def test_zero_leaves_glibc_alone() -> None:
    assert keep_freed_memory(0) is False


def test_only_the_reranker_keeps_memory_by_default() -> None:
    from services.gateway import GatewayConfig
    from services.reranker import RerankerServiceConfig
    from services.retriever import RetrieverServiceConfig

    assert RerankerServiceConfig().server.malloc_keep_mb == RERANKER_KEEP_MB
    assert RerankerServiceConfig().server.malloc_arenas == RERANKER_ARENAS
    assert RetrieverServiceConfig().server.malloc_keep_mb == 0 == GatewayConfig().server.malloc_keep_mb
