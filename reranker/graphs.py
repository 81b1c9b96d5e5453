"""CUDA graphs of the packed forward (reranker.packed): record a batch shape's kernels once, replay them after.

On a GPU one rerank of a 135M model is some 650 small kernels, and launching them from Python takes longer than
running them (profile: 29 ms wall for 19 ms of device work at 100 documents). A CUDA graph records the launches
once and replays them with one call. A graph is bound to the shapes it saw and to the memory it read, so:

- its key is the batch's layout (per prompt: own prefix, documents, final and signal lengths, the shared prefix
  tokens read from the cache; the documents' width; the scoring layers) and the identity of every LoRA delta it
  reads; it holds references to those deltas, to the shared prefix K/V it read and to its input and output
  tensors, so none is freed or reused while it lives (a reloaded tenant block is a new key);
- a shape is captured the second time it is seen: a one-off shape runs eagerly and costs no capture;
- at most `capacity` graphs are kept (LRU); they share one memory pool, which is safe because they never run
  concurrently (the engine's forward_lock) and every replay's outputs are copied out before the next;
- a capture that fails leaves its shape eager (logged once) and serving goes on.

CUDA only; elsewhere `run` is the eager forward.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from reranker.forward_context import ForwardContext
from reranker.packed import Packed, forward_packed, pack
from reranker.prompt import Prompt
from reranker.routing import Route

log = logging.getLogger(__name__)

Masses = list[dict[int, torch.Tensor]]


@dataclass
class _Graph:
    graph: Any  # torch.cuda.CUDAGraph
    inputs: Packed  # the tensors the graph reads: copy a new batch's into them, then replay
    outputs: Masses  # the tensors the graph writes
    keep: tuple  # what the graph reads besides the model's weights: deltas, shared prefix K/V


class PackedGraphs:
    """Replays a CUDA graph per batch shape; see the module docstring."""

    def __init__(self, capacity: int = 32) -> None:
        self.capacity = capacity
        self._graphs: OrderedDict[Hashable, _Graph] = OrderedDict()
        self._seen: dict[Hashable, int] = {}
        self._failed: set[Hashable] = set()
        self._pool: Any = None
        self.captures = 0
        self.replays = 0

    def run(self, fw: ForwardContext, prompts: Sequence[Prompt], routes: Sequence[Route],
            block_tokens: Sequence[int], score_layers: Sequence[Sequence[int]], last_layer: int) -> Masses:
        packed = pack(fw, prompts, routes, block_tokens)
        signal = [p.signal_tokens for p in prompts]
        layers = [tuple(sorted(set(s))) for s in score_layers]
        if self.capacity <= 0 or fw.device.type != "cuda":
            return forward_packed(fw, packed, signal, routes, layers, last_layer)
        key = _key(packed, signal, routes, layers, last_layer)
        entry = self._graphs.get(key)
        if entry is not None:
            self._graphs.move_to_end(key)
            return self._replay(entry, packed)
        if key in self._failed or self._count(key) < 2:
            return forward_packed(fw, packed, signal, routes, layers, last_layer)
        entry = self._capture(fw, packed, signal, routes, layers, last_layer, key)
        if entry is None:
            return forward_packed(fw, packed, signal, routes, layers, last_layer)
        self._graphs[key] = entry
        while len(self._graphs) > self.capacity:
            self._graphs.popitem(last=False)
        return self._replay(entry, packed)

    @contextmanager
    def eager(self) -> Iterator[None]:
        """Inside, every batch runs without graphs (kept graphs stay for afterwards): to measure what they save."""
        capacity, self.capacity = self.capacity, 0
        try:
            yield
        finally:
            self.capacity = capacity

    def clear(self) -> None:
        """Drop every graph. Their memory pool goes with the last of them, so the next capture starts a new one
        (capturing into the released pool fails an allocator assertion: seen on an H100)."""
        self._graphs.clear()
        self._seen.clear()
        self._pool = None

    def _count(self, key: Hashable) -> int:
        if len(self._seen) > 64 * max(1, self.capacity):  # bound the bookkeeping of shapes seen once
            self._seen.clear()
        self._seen[key] = self._seen.get(key, 0) + 1
        return self._seen[key]

    def _replay(self, entry: _Graph, packed: Packed) -> Masses:
        for static, new in zip(entry.inputs.inputs, packed.inputs, strict=True):
            static.copy_(new)
        entry.graph.replay()
        self.replays += 1
        return [{layer: mass.clone() for layer, mass in masses.items()} for masses in entry.outputs]

    def _capture(self, fw: ForwardContext, packed: Packed, signal: Sequence[int], routes: Sequence[Route],
                 layers: Sequence[Sequence[int]], last_layer: int, key: Hashable) -> _Graph | None:
        device = fw.device
        local: dict = {}  # the shared prefix entries the graph reads, kept alive with it
        try:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):  # warm-up on a side stream, as capture requires
                forward_packed(fw, packed, signal, routes, layers, last_layer)
            torch.cuda.current_stream(device).wait_stream(side)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                outputs = forward_packed(fw, packed, signal, routes, layers, last_layer, local)
        except Exception as exc:  # a kernel or op that cannot be captured: this shape stays eager
            self._failed.add(key)
            log.warning("CUDA graph capture failed, this batch shape runs eagerly: %s", exc)
            return None
        self.captures += 1
        return _Graph(graph, packed, outputs, (tuple(routes), local, tuple(packed.shared)))


def _key(packed: Packed, signal: Sequence[int], routes: Sequence[Route], layers: Sequence[Sequence[int]],
         last_layer: int) -> Hashable:
    """What a graph is bound to: the batch's layout and the identity of every delta it reads."""
    prompts = tuple(
        (r.prefix.stop - r.prefix.start, r.doc_span.stop - r.doc_span.start, r.final.stop - r.final.start, s,
         shared.tokens if shared is not None else (), route.chain_keys[:last_layer + 1] if shared else (),
         _delta_ids(route, last_layer), tuple(score))
        for r, s, shared, route, score in zip(packed.rows, signal, packed.shared, routes, layers, strict=True))
    return prompts, packed.valid.shape[1], last_layer


def _delta_ids(route: Route, last_layer: int) -> tuple:
    return tuple(tuple((name, id(delta)) for name, delta in sorted(deltas.items())) if deltas else ()
                 for deltas in route.layers[:last_layer + 1])
