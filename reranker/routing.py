"""Many model chains through one set of base weights: the per-row LoRA deltas of
each prompt's chain (Route), how a linear layer applies them (one base matmul
over every row, then one grouped low-rank matmul per distinct delta), and the
cache of the shared instruction prefix's K/V per chain prefix.
Used by reranker.blockrank; filled by reranker.zoo.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import torch


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(frozen=True, eq=False)
class LoraDelta:
    """A low-rank update of one linear module: y += (x A^T) B^T, B pre-multiplied by the LoRA scale."""

    a: torch.Tensor  # (r, in)
    b: torch.Tensor  # (out, r), already scaled

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.a.T) @ self.b.T

    def add_to(self, y: torch.Tensor, x: torch.Tensor) -> None:
        """y += delta(x) in place; for rows (2-D, the packed path) the addition inside the second matmul."""
        if y.dim() == 2:
            y.addmm_(x @ self.a.T, self.b.T)
        else:
            y += self(x)

    @property
    def nbytes(self) -> int:
        return tensor_bytes((self.a, self.b))


# One decoder layer's deltas, keyed by module path inside the layer ("self_attn.q_proj", "mlp.up_proj").
LayerDeltas = Mapping[str, LoraDelta]


@dataclass(frozen=True)
class Route:
    """How one prompt runs through the shared base layers: per decoder layer the LoRA deltas of its
    model chain (None or missing = the base block) and, for the shared-prefix cache, the identity
    of the chain up to each layer (chain_keys[l] names blocks 0..l; empty = no caching)."""

    layers: tuple[LayerDeltas | None, ...] = ()
    chain_keys: tuple[str, ...] = ()

    def at(self, layer: int) -> LayerDeltas | None:
        return self.layers[layer] if layer < len(self.layers) else None


BASE_ROUTE = Route()


class TensorCache:
    """Tensors by key, least recently used out beyond `max_bytes` (the newest entry always stays); thread-safe."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple, tuple[torch.Tensor, ...]] = OrderedDict()
        self._lock = threading.Lock()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple) -> tuple[torch.Tensor, ...] | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry

    def put(self, key: tuple, entry: tuple[torch.Tensor, ...]) -> None:
        size = tensor_bytes(entry)
        with self._lock:
            if key in self._entries:
                return
            self._entries[key] = entry
            self.nbytes += size
            while self.nbytes > self.max_bytes and len(self._entries) > 1:
                _, old = self._entries.popitem(last=False)
                self.nbytes -= tensor_bytes(old)


class SharedPrefixCache(TensorCache):
    """Per layer, the K/V and output hidden states of the shared instruction tokens, keyed by
    (identity of the model chain up to that layer, token ids). Tenants whose chains agree up to a
    layer share the entry; keys name content, so entries never go stale. LRU, bounded in bytes."""

    def __init__(self, max_bytes: int = 64 << 20) -> None:
        super().__init__(max_bytes)


# Columns of a (possibly stacked) weight and the delta of the module they belong to (None: not adapted).
WeightPart = tuple[slice, LoraDelta | None]


class MergedWeights(TensorCache):
    """One chain's LoRA deltas folded into a copy of a base weight, W + B A, for rows that all run that chain (a
    batch of one tenant, the usual case): the projection is then one matmul, without the two thin ones per
    adapted module beside it (rank 16 against width 576: on a CPU ~10% of a bf16 rerank with the shipped
    adapter). Keyed by the delta objects themselves, which the key holds, so an entry can never answer for
    another tenant's delta (a reloaded adapter brings new objects); LRU, bounded in bytes. The
    merge runs in float32 and rounds once to the weight's dtype, as merging the adapter into the model does."""

    def weight(self, base: torch.Tensor, parts: Sequence[WeightPart]) -> torch.Tensor | None:
        """`base` with each part's delta added to its columns (rows of the weight); None when nothing is
        adapted or a merged copy would not fit the budget."""
        if not any(delta is not None for _, delta in parts) or tensor_bytes([base]) > self.max_bytes:
            return None
        # The base by id (a tensor compared with == would compare elements): it is a weight of the model this
        # cache's forward runs, alive as long as the cache. The deltas as objects (their == is identity).
        key = (id(base), *(delta for _, delta in parts))
        entry = self.get(key)
        if entry is not None:
            return entry[0]
        merged = base.to(torch.float32, copy=True)  # a copy even in float32: the base weight stays as it is
        for cols, delta in parts:
            if delta is not None:
                merged[cols] += delta.b.float() @ delta.a.float()
        weight = merged.to(base.dtype)
        self.put(key, (weight,))
        return weight


@dataclass(frozen=True)
class Segment:
    """Rows [lo, hi) of a batch and the deltas that apply to them; `owner` is the prompt they belong to."""

    lo: int
    hi: int
    deltas: LayerDeltas | None
    owner: int = 0


def project(module: torch.nn.Linear, name: str, x: torch.Tensor, segments: Sequence[Segment],
            weight: torch.Tensor | None = None) -> torch.Tensor:
    """The shared base projection over all rows (or `weight`, a stand-in of the module's: a chain's merged
    copy), then each chain's low-rank delta on its own rows: one grouped matmul per distinct delta, whatever the
    number of prompts using it."""
    y = module(x) if weight is None else torch.nn.functional.linear(x, weight, module.bias)
    add_deltas(y, name, x, segments)
    return y


def add_deltas(y: torch.Tensor, name: str, x: torch.Tensor, segments: Sequence[Segment]) -> None:
    """y (rows, out) += each segment's delta of module `name` applied to its rows of x; y may be a column view."""
    groups: dict[int, tuple[LoraDelta, list[Segment]]] = {}
    for s in segments:
        delta = s.deltas.get(name) if s.deltas else None
        if delta is not None:
            groups.setdefault(id(delta), (delta, []))[1].append(s)
    for delta, segs in groups.values():
        if len(segs) == 1 or all(a.hi == b.lo for a, b in pairwise(segs)):
            lo, hi = segs[0].lo, segs[-1].hi
            delta.add_to(y[lo:hi], x[lo:hi])
        else:
            rows = torch.cat([torch.arange(s.lo, s.hi, device=x.device) for s in segs])
            y.index_add_(0, rows, delta(x.index_select(0, rows)))


@dataclass(frozen=True)
class FusedLinear:
    """Several linear modules of one decoder layer reading the same input as one matmul (the packed path's q|k):
    their weights stacked by output rows (a copy: the base weights are frozen while served), `parts` naming each
    module's columns of the output, where its deltas go."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    parts: tuple[tuple[str, slice], ...]

    @classmethod
    def of(cls, block: Any, names: Sequence[str]) -> FusedLinear:
        modules: list[Any] = [block.get_submodule(name) for name in names]
        weights: list[torch.Tensor] = [m.weight for m in modules]
        biases: list[torch.Tensor | None] = [m.bias for m in modules]
        bias = None
        if any(b is not None for b in biases):  # Qwen2 has q/k/v biases: the stack has one, zeros where absent
            bias = torch.cat([w.new_zeros(w.shape[0]) if b is None else b for w, b in zip(weights, biases, strict=True)])
        parts, start = [], 0
        for name, w in zip(names, weights, strict=True):
            parts.append((name, slice(start, start + w.shape[0])))
            start += w.shape[0]
        return cls(torch.cat(weights), bias, tuple(parts))

    def __call__(self, x: torch.Tensor, segments: Sequence[Segment], weight: torch.Tensor | None = None
                 ) -> torch.Tensor:
        """x through the stacked weight (or `weight`, a stand-in of its shape: a chain's merged copy) and the
        segments' deltas."""
        y = torch.nn.functional.linear(x, self.weight if weight is None else weight, self.bias)
        for name, cols in self.parts:
            add_deltas(y[:, cols], name, x, segments)
        return y


_MLP_MODULES = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def mlp(block: Any, x: torch.Tensor, segments: Sequence[Segment]) -> torch.Tensor:
    """A gated MLP with per-row deltas; the module's own forward when no row's chain adapts it."""
    if not any(s.deltas and any(m in s.deltas for m in _MLP_MODULES) for s in segments):
        out: torch.Tensor = block(x)
        return out
    gate = project(block.gate_proj, "mlp.gate_proj", x, segments)
    up = project(block.up_proj, "mlp.up_proj", x, segments)
    return project(block.down_proj, "mlp.down_proj", block.act_fn(gate) * up, segments)
