"""Measurements in fresh processes (benchmarks only): for settings a process cannot take back (malloc's
thresholds and arena count, carried by what the process already freed), for one model per process as a
deployment runs it, and for start-up costs. The child prints its result as its last line of JSON."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any


def json_from_child(argv: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run `python argv...` in a new interpreter (in `env`, default this one's); its last line of standard
    output, parsed. A failed child raises with the tail of its standard error."""
    done = subprocess.run([sys.executable, *argv], capture_output=True, text=True, check=False, cwd=cwd, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"the measuring process failed ({done.returncode}): {done.stderr[-2000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def rotations(items: list[Any], rounds: int) -> list[Any]:
    """`rounds` passes over `items`, each starting one later: every item runs first, last and between alike, so
    that drift on a shared machine falls on each alike."""
    return [items[(start + i) % len(items)] for start in range(rounds) for i in range(len(items))]


def paired_speedup(first_s: list[float], other_s: list[float]) -> dict[str, Any]:
    """Speed-up of `other` over `first`, from seconds measured in the same rounds (round i of each ran back to
    back): the median of the rounds' ratios and their range. Pairing by round cancels the drift the rounds share,
    which a ratio of the two medians would not."""
    ratios = [a / b for a, b in zip(first_s, other_s, strict=True)]
    return {"speedup_over_first": statistics.median(ratios), "speedup_range": [min(ratios), max(ratios)]}
