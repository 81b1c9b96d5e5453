"""What the packed GPU forward (reranker.packed) and its CUDA graphs (reranker.graphs) need from the forward
that runs them: the model's geometry, RoPE, the stacked q|k weights and the shared-prefix K/V. A small module
of its own so that those two depend on it, and reranker.blockrank (which implements `ForwardContext`) depends
on them, one way."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from reranker.attention import Rope
from reranker.model import HFModule
from reranker.prompt import Prompt
from reranker.routing import FusedLinear, LayerDeltas, MergedWeights, Route
from reranker.rowops import ForwardGeometry, RowOps

SharedEntries = dict[tuple[str, tuple[int, ...]], tuple[torch.Tensor, ...]]  # (chain key, tokens) -> (k, v, out)


@dataclass
class SharedPrefix:
    """A prompt's shared instruction tokens and, at the current layer, their K/V and output."""

    tokens: tuple[int, ...]
    rope: Rope
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    hidden: torch.Tensor | None = None


class FusedWeights:
    """Per decoder layer, some of its projections that read the same input as one matmul (stacked on first use):
    q and k, so that RoPE runs once over both; with compiled CPU row ops also gate and up (GATE_UP). Not v, nor
    gate with up elsewhere: a column slice of a wider output is strided, and eager element-wise kernels after it
    run about 2x slower than on a contiguous tensor (SiLU over gate|up's slice: 73 against 34 us per call on an
    H100), while the compiled SiLU·up (reranker.rowops) reads the two strided halves as fast as contiguous ones.
    One matmul over the stacked weights is what it saves: on 2 AMX cores, 3.0 ms for gate|up over 2K bf16 rows
    against 2 x 1.7-1.9 ms for gate and up apart (the input is read once, and a wider product runs nearer peak).
    The stacks are copies, made for the layers a forward runs: gate|up adds 2 x hidden x intermediate weights
    per layer (1.8M for SmolLM2-135M, 3.4 MiB in bf16; 44 MiB for the 13 MLPs under the shipped adapter's
    scoring layer)."""

    QK = ("self_attn.q_proj", "self_attn.k_proj")
    GATE_UP = ("mlp.gate_proj", "mlp.up_proj")

    def __init__(self, layers: Sequence[HFModule], names: tuple[str, ...] = QK) -> None:
        self._layers = layers
        self._names = names
        self._fused: dict[int, FusedLinear] = {}

    def __getitem__(self, index: int) -> FusedLinear:
        if index not in self._fused:
            self._fused[index] = FusedLinear.of(self._layers[index], self._names)
        return self._fused[index]


class PackedWeights:
    """The packed path's weights beside the model's own, per forward: q|k and gate|up stacked per layer
    (FusedWeights; gate|up used with compiled row ops), and, on a CPU, chains' merged weights (None: off)."""

    def __init__(self, layers: Sequence[HFModule], merged_bytes: int) -> None:
        self.qk = FusedWeights(layers)
        self.gate_up = FusedWeights(layers, FusedWeights.GATE_UP)
        self.merged = MergedWeights(merged_bytes) if merged_bytes else None


class ForwardContext(ForwardGeometry, Protocol):
    """The forward's state the packed path reads (reranker.blockrank.BlockRankForward provides it): its
    geometry (model, decoder, heads, key heads, head width), and:"""

    group: int
    scale: float
    weights: PackedWeights  # stacked projections; one chain's merged weights, for chunks of that chain only
    ops: RowOps  # the element-wise work on rows (RMSNorm, RoPE, SiLU·up): eager, or compiled on a CPU
    packed_chunk_rows: int  # rows per row-wise step (norms, projections, MLP); 0: all rows at once
    ragged_docs: bool  # documents' real tokens only in the packed rows (padding only inside attention)

    @property
    def device(self) -> torch.device: ...

    def rope(self, positions: torch.Tensor) -> Rope: ...

    def shared_for(self, prompt: Prompt, route: Route, use_cache: bool) -> SharedPrefix | None:
        """The prompt's shared instruction tokens when they come from the prefix cache, else None."""

    def advance_shared(self, index: int, layer: HFModule, shared: Sequence[SharedPrefix | None],
                       local: SharedEntries, routes: Sequence[Route], deltas: Sequence[LayerDeltas | None]) -> None:
        """Every prompt's shared-prefix K/V at layer `index`, from the cache or computed once."""
