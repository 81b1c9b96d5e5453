"""What a running process holds, read from /proc (Linux): resident memory, open file descriptors, threads."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ProcessStats:
    rss_bytes: int
    open_fds: int
    threads: int
    rss_anon_bytes: int = 0  # the anonymous part of RSS (heap, anonymous mappings): what a leak grows

    @classmethod
    def of(cls, pid: int) -> ProcessStats:
        status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                      if ":" in line)
        return cls(rss_bytes=int(status["VmRSS"].split()[0]) * 1024, open_fds=len(os.listdir(f"/proc/{pid}/fd")),
                   threads=int(status["Threads"]), rss_anon_bytes=int(status["RssAnon"].split()[0]) * 1024)

    @property
    def rss_mib(self) -> float:
        return round(self.rss_bytes / 2**20, 2)

    @property
    def rss_anon_mib(self) -> float:
        return round(self.rss_anon_bytes / 2**20, 2)

    def as_dict(self) -> dict[str, float]:
        """The figures as samples record them: RSS in MiB, descriptors, threads."""
        return {"rss_mib": self.rss_mib, "open_fds": self.open_fds, "threads": self.threads}
