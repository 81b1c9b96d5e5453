"""How a service process's glibc malloc keeps and returns memory: its arenas, and the freed memory it keeps.

glibc gives threads their own malloc arenas, up to 8 per core. Memory freed in an arena stays resident until
the arena's top is free, and each new thread that allocates may open one more. A retriever opens threads per
collection (tantivy's indexing and merge threads, the lexical writer, the checkpointer). Measured on 2 cores
(`python -m retriever.bench.arenas`): after five warm-up cycles of create collection, upsert, delete
collection, 35 more grew the process by 90 MiB with glibc's default (all of it returned by `malloc_trim`:
freed, not leaked) and by 12 MiB with two arenas, level after the first ten. The services run with two
unless MALLOC_ARENA_MAX is set, in which case glibc has already applied it.

A reranker's forward on a CPU allocates and frees tens of megabytes of activations per layer. glibc adapts its
thresholds to the largest block freed (memory above twice that, free at the top of the heap, goes back to the
kernel), which is below what one layer frees together: each layer gives its activations back and the next one
takes them again, a page fault per 4 KiB page touched. `keep_freed_memory` fixes both thresholds instead: blocks
up to 32 MiB from the heap, and up to `keep_mb` free at its top kept. Measured on 2 cores (`python -m
reranker.bench allocator`): ~61,000 page faults per bf16 rerank of 20 x 96 tokens with glibc's default, none
with 256 MiB kept; the time saved is in docs/benchmarks.md.
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger(__name__)
# mallopt's parameter numbers, from glibc's malloc.h
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
# The services' defaults (services.config): two arenas each. The reranker keeps 256 MiB, more than one layer of
# its largest CPU batch frees, in one arena: its forwards run on one thread, and a thread's arena other than the
# main one grows in 64 MiB heaps that glibc unmaps as soon as one is free, whatever it was told to keep.
SERVICE_ARENAS, RERANKER_ARENAS, RERANKER_KEEP_MB = 2, 1, 256
HEAP_BLOCK_MAX = 32 << 20  # the largest M_MMAP_THRESHOLD glibc accepts on 64-bit (larger blocks are always mapped)


def limit_malloc_arenas(count: int) -> bool:
    """Cap glibc's arenas at `count` (0: leave glibc's default). Call before the process starts threads; a
    no-op, returning False, without glibc or when MALLOC_ARENA_MAX is set."""
    if count <= 0 or "MALLOC_ARENA_MAX" in os.environ:
        return False
    return _mallopt(M_ARENA_MAX, count, "its default arenas")


def keep_freed_memory(keep_mb: int) -> bool:
    """Serve blocks up to 32 MiB from the heap and keep up to `keep_mb` MiB of freed memory at its top for reuse
    (0: leave glibc's adaptive thresholds). The process's resident memory then stays at its working set's peak
    plus at most `keep_mb` instead of falling between requests. A no-op, returning False, without glibc or when
    either threshold is set in the environment (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_ or GLIBC_TUNABLES'
    glibc.malloc.mmap_threshold, glibc.malloc.trim_threshold: the operator's choice)."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if keep_mb <= 0 or any(v in os.environ for v in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")) or any(
            f"glibc.malloc.{name}_threshold" in tunables for name in ("mmap", "trim")):
        return False
    return (_mallopt(M_MMAP_THRESHOLD, HEAP_BLOCK_MAX, "its adaptive thresholds")
            and _mallopt(M_TRIM_THRESHOLD, keep_mb << 20, "its adaptive trim threshold"))


def _mallopt(parameter: int, value: int, fallback: str) -> bool:
    """glibc's mallopt(parameter, value); False (and the allocator keeps `fallback`) where refused or absent."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, macOS): their allocators have no such settings
        return False
    if libc.mallopt(parameter, value) != 1:
        log.warning("mallopt(%d, %d) was refused; the allocator keeps %s", parameter, value, fallback)
        return False
    return True
