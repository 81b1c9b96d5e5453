"""How many malloc arenas a service process uses (glibc).

glibc gives threads their own malloc arenas, up to 8 per core. Memory freed in an arena stays resident until
the arena's top is free, and each new thread that allocates may open one more. A retriever opens threads per
collection (tantivy's indexing and merge threads, the lexical writer, the checkpointer). Measured on 2 cores
(`python -m retriever.bench.arenas`): after five warm-up cycles of create collection, upsert, delete
collection, 35 more grew the process by 90 MiB with glibc's default (all of it returned by `malloc_trim`:
freed, not leaked) and by 12 MiB with two arenas, level after the first ten. The services run with two
unless MALLOC_ARENA_MAX is set, in which case glibc has already applied it.
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger(__name__)
M_ARENA_MAX = -8  # mallopt's parameter number, from glibc's malloc.h


def limit_malloc_arenas(count: int) -> bool:
    """Cap glibc's arenas at `count` (0: leave glibc's default). Call before the process starts threads; a
    no-op, returning False, without glibc or when MALLOC_ARENA_MAX is set."""
    if count <= 0 or "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, macOS): their allocators have no such arenas
        return False
    if libc.mallopt(M_ARENA_MAX, count) != 1:
        log.warning("mallopt(M_ARENA_MAX, %d) was refused; the allocator keeps its default arenas", count)
        return False
    return True
