"""Reranker measurements in fresh processes (common.fresh): malloc's thresholds are process-wide and carry what
the process freed before, and a process holding two models (fp32 and bf16) reuses freed memory across both,
which a deployment, one dtype per process, never does (in one process bf16's rerank of 20 × 96 tokens ran
15-20% slower beside an fp32 model than alone). `python -m reranker.bench [--malloc-...] COMMAND --child ...`
runs one measurement and prints it as its last line of JSON."""

from __future__ import annotations

import argparse
from typing import Any

from common.fresh import json_from_child


def in_fresh_process(args: argparse.Namespace, command: str, child_args: list[str],
                     keep_mb: int | None = None) -> dict[str, Any]:
    """`command --child child_args` in a new interpreter with this run's malloc settings (or `keep_mb`)."""
    return json_from_child(["-m", "reranker.bench", "--malloc-arenas", str(args.malloc_arenas), "--malloc-keep-mb",
                            str(args.malloc_keep_mb if keep_mb is None else keep_mb), command, "--child",
                            *child_args])
