"""bf16 matmuls on the CPU build a oneDNN kernel per shape and cache it (common.device.bound_cpu_kernel_caches).
With the caches bounded, a process running matmuls of ever new shapes stops growing once they are full; with
oneDNN's defaults (1,024 entries) it keeps growing, which the soak test would read as a leak in the reranker."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from common.device import _KERNEL_CACHE_VARIABLES, CPU_KERNEL_CACHE_ENTRIES, cpu_has_native_bf16

pytestmark = pytest.mark.skipif(not cpu_has_native_bf16(), reason="only CPUs with native bf16 run bf16 matmuls")

# Rows 200..3,999 in a random order: every call a shape not seen before, the reranker's q|k projection (576 -> 1536).
SCRIPT = """
import random, sys, torch
from common.device import bound_cpu_kernel_caches
bound_cpu_kernel_caches()
torch.set_grad_enabled(False)
weight = torch.randn(1536, 576, dtype=torch.bfloat16)
rows = torch.randn(4000, 576, dtype=torch.bfloat16)
shapes = random.Random(0).sample(range(200, 4000), int(sys.argv[1]))
def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
for i, m in enumerate(shapes):
    torch.nn.functional.linear(rows[:m], weight)
    if i == int(sys.argv[2]):
        start = rss_mib()
print(rss_mib() - start)
"""
SHAPES = 400
# Measured from the 200th shape on, when the bounded caches (128 entries) have long been full.
FULL_AFTER = 200


def growth_mib(entries: int | None) -> float:
    env = {k: v for k, v in os.environ.items() if k not in _KERNEL_CACHE_VARIABLES}
    # Large temporaries (up to 12 MiB outputs) mapped and unmapped each time rather than kept in glibc's heap
    # (its dynamic mmap threshold would keep some): the resident size then moves only with what stays allocated.
    env["MALLOC_MMAP_THRESHOLD_"] = str(128 << 10)
    if entries is not None:  # as an operator would set them; bound_cpu_kernel_caches leaves them alone
        env.update({variable: str(entries) for variable in _KERNEL_CACHE_VARIABLES})
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(SHAPES), str(FULL_AFTER)], env=env, check=True,
                         capture_output=True, text=True, timeout=300).stdout
    return float(out.strip().splitlines()[-1])


def test_bounded_kernel_caches_stop_growing_once_full() -> None:
    bounded = growth_mib(None)
    unbounded = growth_mib(1024)  # oneDNN's and ideep's default capacity
    # 200 new shapes past the bound: each evicts one, so only allocator noise remains (16 MiB allowed). With
    # 1,024 entries each of the 200 adds a kernel to both caches (~0.5 MiB each): ~100 MiB or more.
    assert CPU_KERNEL_CACHE_ENTRIES < FULL_AFTER
    assert bounded < 16, bounded
    assert unbounded > 4 * max(bounded, 16), (bounded, unbounded)
