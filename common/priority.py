"""Background work at a lower CPU priority than the requests it runs beside.

Index maintenance (tantivy's indexing and merge threads, segment commits) competes with searches for the
same cores; on Linux a thread's nice value is its own, and threads it spawns inherit it, so work run on a
`background_executor` thread (and the engine threads it starts) yields the CPU to searches under
contention and runs at full speed otherwise. Elsewhere, or where raising the value is refused, it runs at
normal priority.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

BACKGROUND_NICE = 10


def _lower_priority() -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)
    except (AttributeError, OSError):  # not Linux, or not permitted: normal priority
        pass


def background_executor(name: str) -> ThreadPoolExecutor:
    """One thread at a lower priority: calls submitted to it run one at a time, in order."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix=name, initializer=_lower_priority)
