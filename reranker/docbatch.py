"""Documents of several prompts as one right-padded (docs, T) batch: BlockRank runs every document of every
batched request through the projections and MLPs together; each prompt owns a span of rows."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from reranker.prompt import Prompt
from reranker.routing import LayerDeltas, Segment


@dataclass
class DocBatch:
    """Documents of several prompts as one right-padded (docs, T) batch."""

    ids: torch.Tensor  # (D, T)
    valid: torch.Tensor  # (D, T) bool: real tokens (keys everyone may see)
    scored: torch.Tensor  # (D, T) bool: content tokens whose attention mass scores the doc
    spans: list[tuple[int, int]]  # [start, end) rows of each prompt


def segments_in(spans: Sequence[tuple[int, int]], lo: int, hi: int,
                 deltas: Sequence[LayerDeltas | None]) -> list[Segment]:
    """The prompts' row ranges inside rows [lo, hi), relative to lo."""
    out: list[Segment] = []
    for owner, (start, end) in enumerate(spans):
        a, b = max(start, lo), min(end, hi)
        if a < b:
            out.append(Segment(a - lo, b - lo, deltas[owner], owner))
    return out


def pad_docs(prompts: Sequence[Prompt], device: torch.device) -> DocBatch:
    """Every prompt's documents, right-padded to the longest. Built with one scatter from the prompts' flat
    token arrays (a Python loop over documents costs milliseconds at hundreds of documents, as much as a GPU
    forward); copied to the device once per tensor."""
    tokens = [p.doc_tokens for p in prompts]  # laid out when each prompt was built
    if not tokens or any(not len(n) or int(n.min()) == 0 for _, n in tokens):
        raise ValueError("every prompt needs at least one non-empty document")
    lengths = torch.from_numpy(np.concatenate([n for _, n in tokens]))
    width = int(lengths.max())
    valid = torch.arange(width)[None] < lengths[:, None]
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    ids[valid] = torch.from_numpy(np.concatenate([flat for flat, _ in tokens]))
    tags = torch.tensor([n for p in prompts for n in p.tag_lengths])
    scored = valid & (torch.arange(width)[None] >= tags[:, None])
    spans: list[tuple[int, int]] = []
    start = 0
    for p in prompts:
        spans.append((start, start + p.n_docs))
        start += p.n_docs
    return DocBatch(ids.to(device), valid.to(device), scored.to(device), spans)
