"""BlockRank's inference forward with every token of every prompt packed into one (rows, hidden) matrix: the
GPU's path, and the CPU's while a batch fits its caches (ForwardPath).

On a GPU a small model's rerank is bound by kernel launches, not by arithmetic. The chunked path
(reranker.blockrank) runs each prompt's prefix, its documents and its final segment as separate batches, so
every norm, projection, LoRA delta and MLP is launched three times per prompt per layer. Here the rows of all
parts of all prompts ([prefix | documents | final] per prompt; on a GPU the documents right-padded to one width,
on a CPU only their real tokens, padded only inside attention) go through them once per layer, the norms as one
fused kernel each, q and k as one matmul with RoPE over both, residual updates and LoRA deltas inside the
matmuls (addmm). Only attention is per part: the same who-sees-what and positions as the chunked path; the
prefix and the documents through SDPA with no mask (causal, bottom-right aligned: flash attention), the final
segment through one flash-decoding Triton kernel (kernels.attend_few) on a GPU, else with an additive bias built
once per forward (attention.attend_rows). `pack` lays a batch out on the host and `forward_packed` only launches
device work, so reranker.graphs can hold it in a CUDA graph. Inference only (no captures, no autograd); equal to
the dense reference (tests/reranker/test_attention.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import torch

from common.device import cpu_has_amx
from reranker import kernels
from reranker.attention import Rope, attend_docs_fused, attend_prefix, attend_rows, attention_mass, key_bias
from reranker.docbatch import pad_docs, segments_in
from reranker.forward_context import ForwardContext, SharedEntries, SharedPrefix
from reranker.model import HFModule
from reranker.prompt import Prompt
from reranker.routing import FusedLinear, LayerDeltas, Route, Segment, add_deltas, project


class ForwardPath(StrEnum):
    """Which inference forward runs. Packed (reranker.packed) joins every part of every prompt into one matrix:
    fewer, larger kernels, which is what a GPU needs and what a CPU gains from while the batch stays within its
    caches; beyond that the chunked path's cache-sized chunks are faster on a CPU (`python -m reranker.bench
    speed --path chunked,packed`). Training, captures and traces always run chunked."""

    AUTO = "auto"  # CUDA: packed; CPU: packed in groups of prompts whose rows fit cpu_packed_limit; a prompt
    # past it alone: chunked
    PACKED = "packed"
    CHUNKED = "chunked"


# The CPU crossover between the two paths, in packed rows (prefix + documents padded to one width + final) times
# the bytes of one element: measured on 2 cores with 96- and 160-token blocks, packed is the faster up to ~4K rows
# in fp32 and ~8K in bf16 (about even at 16K), the same bytes (docs/benchmarks.md#cpu-forward-paths). With AMX,
# whose bf16 matrix products leave the rest of the forward the larger share, bf16's packed path is still 1.45x
# the chunked one at 16K rows (100 x 160 tokens), so its limit there is 16K bf16 rows.
CPU_PACKED_MAX_ROW_BYTES = 4096 * 4
CPU_PACKED_MAX_ROW_BYTES_AMX_BF16 = 16384 * 2


def cpu_packed_limit(element_size: int) -> int:
    """This CPU's packed limit in row bytes for a model of this element size (2: bf16)."""
    return CPU_PACKED_MAX_ROW_BYTES_AMX_BF16 if element_size == 2 and cpu_has_amx() else CPU_PACKED_MAX_ROW_BYTES


def packed_rows(prompts: Sequence[Prompt]) -> int:
    """Rows of the packed matrix for these prompts on a CPU: every token, the documents' without padding
    (ForwardContext.ragged_docs)."""
    return sum(len(p.prefix) + len(p.final) + sum(map(len, p.docs)) for p in prompts)


def fits_cpu_packed(prompts: Sequence[Prompt], element_size: int, limit_bytes: int) -> bool:
    """Whether these prompts' packed rows stay within the CPU's packed limit (cpu_packed_limit)."""
    return packed_rows(prompts) * element_size <= limit_bytes


def cpu_packed_groups(prompts: Sequence[Prompt], element_size: int, limit_bytes: int) -> list[slice]:
    """Consecutive prompts in groups that each fit the CPU's packed limit (a prompt past it alone): a CPU batch
    larger than the limit runs as several packed forwards, which beat one chunked forward over all of it (eight
    queries of 20 SciFact documents in bf16: 0.72 s a query as two packed forwards of four, 0.93 s as one chunked
    forward; `python -m reranker.bench batch`). A query costs the same in a packed batch of one as of four, so
    nothing is lost by splitting."""
    groups: list[slice] = []
    start = 0
    for end in range(2, len(prompts) + 1):
        if not fits_cpu_packed(prompts[start:end], element_size, limit_bytes):
            groups.append(slice(start, end - 1))
            start = end - 1
    return [*groups, slice(start, len(prompts))]


@dataclass
class _Rows:
    """One prompt's rows in the packed matrix."""

    prefix: slice  # its own prefix tokens (after the shared cached ones)
    docs: slice  # n_docs * width rows, or with ragged documents their real tokens
    final: slice
    doc_span: slice  # its documents' rows in the (documents, width) batch
    n_shared: int  # shared prefix tokens read from the cache
    # Ragged documents only: the packed row each slot of the padded (n_docs * width) layout reads (a padding slot
    # reads its document's last real token: a finite value that no real query attends to and no score counts),
    # and the padded layout's real slots, in row order.
    gather: torch.Tensor | None = None
    real: torch.Tensor | None = None


@dataclass
class Packed:
    """A batch laid out for the packed forward: the device tensors are everything it reads (a CUDA graph's
    static inputs, reranker.graphs), the rest is Python layout fixed by the batch's shape."""

    ids: torch.Tensor  # (rows,) token ids
    positions: torch.Tensor  # (rows,)
    valid: torch.Tensor  # (documents, width) real document tokens
    scored: torch.Tensor  # (documents, width) tokens whose attention mass scores the document
    rows: list[_Rows]
    shared: list[SharedPrefix | None]

    @property
    def inputs(self) -> tuple[torch.Tensor, ...]:
        return self.ids, self.positions, self.valid, self.scored


def rms_norm(fw: ForwardContext, norm: HFModule, x: torch.Tensor) -> torch.Tensor:
    """The model's RMSNorm as one kernel (its HF forward is seven): torch's, or compiled (reranker.rowops)."""
    return fw.ops.rms_norm(x, norm.weight, norm.variance_epsilon)


def run_packed(fw: ForwardContext, prompts: Sequence[Prompt], routes: Sequence[Route],
               block_tokens: Sequence[int], score_layers: Sequence[Sequence[int]],
               last_layer: int) -> list[dict[int, torch.Tensor]]:
    """Per prompt, {layer: (signal, heads, n_docs) attention masses} for its score layers."""
    packed = pack(fw, prompts, routes, block_tokens)
    return forward_packed(fw, packed, [p.signal_tokens for p in prompts], routes, score_layers, last_layer)


def forward_packed(fw: ForwardContext, packed: Packed, signal_tokens: Sequence[int], routes: Sequence[Route],
                   score_layers: Sequence[Sequence[int]], last_layer: int,
                   local: SharedEntries | None = None) -> list[dict[int, torch.Tensor]]:
    """The forward itself: device work only (no host copies, no synchronisation), so a CUDA graph can hold it.
    `local` receives the shared prefix K/V entries it read (a graph keeps them)."""
    rows, shared = packed.rows, packed.shared
    hidden = fw.decoder.embed_tokens(packed.ids)
    rope = _rope_rows(fw, packed.positions)
    few = kernels.attends_few(hidden, fw.head_dim)
    final_keys = [_final_keys(r, packed.valid, few) for r in rows]
    local = {} if local is None else local
    masses: list[dict[int, torch.Tensor]] = [{} for _ in rows]
    spans = [(r.prefix.start, r.final.stop) for r in rows]  # each prompt's rows
    for index in range(last_layer + 1):
        layer = fw.decoder.layers[index]
        deltas = [route.at(index) for route in routes]
        if any(shared):
            fw.advance_shared(index, layer, shared, local, routes, deltas)
        chunks = _row_chunks(hidden.shape[0], fw.packed_chunk_rows, spans, deltas)
        q, k, v = _qkv(fw, layer, fw.weights.qk[index], hidden, rope, chunks)
        for i, layers in enumerate(score_layers):
            if index in layers:
                r, s = rows[i], signal_tokens[i]
                signal = q[r.final][-s:].view(s, fw.n_kv, fw.group, fw.head_dim)
                doc_keys = _padded(k, r).view(r.doc_span.stop - r.doc_span.start, -1, fw.n_kv, fw.head_dim)
                masses[i][index] = attention_mass(signal, doc_keys, packed.scored[r.doc_span], fw.scale)
        if index == last_layer:
            break
        out = torch.cat([part for i, r in enumerate(rows) for part in _attend(fw, q, k, v, r, shared[i],
                                                                              final_keys[i], few)]).flatten(1)
        for rows_slice, segments in chunks:
            _finish_rows(fw, index, hidden[rows_slice], out[rows_slice], segments)
    return masses


def _row_chunks(n_rows: int, chunk_rows: int, spans: Sequence[tuple[int, int]],
                deltas: Sequence[LayerDeltas | None]) -> list[tuple[slice, list[Segment]]]:
    """The rows in chunks of `chunk_rows` (0: one chunk), each with its prompts' segments relative to it: the
    row-wise work runs a chunk at a time, so on a CPU its temporaries stay cache-sized whatever the batch (an
    RMSNorm over 16K rows costs ~20x one over 2K, not 8x)."""
    step = chunk_rows or n_rows
    return [(slice(lo, min(n_rows, lo + step)),
             segments_in(spans, lo, min(n_rows, lo + step), deltas))
            for lo in range(0, n_rows, step)]


def _finish_rows(fw: ForwardContext, index: int, hidden: torch.Tensor, attended: torch.Tensor,
                 segments: Sequence[Segment]) -> None:
    """Rows of one chunk after attention, in place: o_proj and residual, RMSNorm, the gated MLP and residual."""
    layer = fw.decoder.layers[index]
    _add_projection(fw, hidden, layer.self_attn.o_proj, "self_attn.o_proj", attended, segments)
    x = rms_norm(fw, layer.post_attention_layernorm, hidden)
    _add_projection(fw, hidden, layer.mlp.down_proj, "mlp.down_proj", _gated(fw, index, layer, x, segments),
                    segments)


def _gated(fw: ForwardContext, index: int, layer: HFModule, x: torch.Tensor,
           segments: Sequence[Segment]) -> torch.Tensor:
    """The gated MLP's act_fn(gate(x)) * up(x): gate|up as one matmul where the compiled SiLU·up reads its
    strided halves (forward_context.FusedWeights says why only there), else the two projections apart."""
    if fw.ops.compiled and _silu(fw):
        gate_up = _fused(fw, fw.weights.gate_up[index], x, segments)
        half = gate_up.shape[1] // 2
        return fw.ops.silu_mul(gate_up[:, :half], gate_up[:, half:])
    gate = _project(fw, layer.mlp.gate_proj, "mlp.gate_proj", x, segments)
    up = _project(fw, layer.mlp.up_proj, "mlp.up_proj", x, segments)
    return _activate(fw, layer.mlp.act_fn, gate, up)


def _rope_rows(fw: ForwardContext, positions: torch.Tensor) -> Rope:
    """cos and sin (rows, 1, hd) of every row's position, the sin's first half negated: rotating x is then
    x * cos + swap_halves(x) * sin (the model's cos/sin repeat their frequencies in both halves)."""
    cos, sin = fw.rope(positions[None])
    half = sin.shape[-1] // 2
    return cos[0][:, None], torch.cat([-sin[0][:, :half], sin[0][:, half:]], dim=-1)[:, None]


def _qkv(fw: ForwardContext, layer: HFModule, qk: FusedLinear, hidden: torch.Tensor, rope: Rope,
         chunks: Sequence[tuple[slice, list[Segment]]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows (rows, D) -> q (rows, heads, hd), k/v (rows, kv, hd): RMSNorm, then q|k in one matmul with RoPE over
    both, and v; chunk by chunk."""
    heads, hd = fw.n_heads + fw.n_kv, fw.head_dim
    if len(chunks) == 1:  # one chunk (a GPU's): no copies into preallocated outputs
        rotated, v = _qkv_rows(fw, layer, qk, hidden, rope, chunks[0][1])
    else:
        rotated = hidden.new_empty(hidden.shape[0], heads, hd)
        v = hidden.new_empty(hidden.shape[0], fw.n_kv, hd)
        for rows, segments in chunks:
            rotated[rows], v[rows] = _qkv_rows(fw, layer, qk, hidden[rows], (rope[0][rows], rope[1][rows]), segments)
    return rotated[:, :fw.n_heads], rotated[:, fw.n_heads:], v


def _qkv_rows(fw: ForwardContext, layer: HFModule, qk: FusedLinear, hidden: torch.Tensor, rope: Rope,
              segments: Sequence[Segment]) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk's q|k (rows, heads + kv, hd) with RoPE applied, and its v (rows, kv, hd)."""
    x = rms_norm(fw, layer.input_layernorm, hidden)
    rotated = fw.ops.rope(_fused(fw, qk, x, segments).view(-1, fw.n_heads + fw.n_kv, fw.head_dim), *rope)
    v = _project(fw, layer.self_attn.v_proj, "self_attn.v_proj", x, segments).view(-1, fw.n_kv, fw.head_dim)
    return rotated, v


def _activate(fw: ForwardContext, act_fn: HFModule, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The gated MLP's act_fn(gate) * up, one fused kernel for SiLU (Llama, Mistral, Qwen2)."""
    return fw.ops.silu_mul(gate, up) if _silu(fw) else act_fn(gate) * up


def _silu(fw: ForwardContext) -> bool:
    return getattr(fw.model.config, "hidden_act", None) in ("silu", "swish")


def _add_projection(fw: ForwardContext, hidden: torch.Tensor, module: HFModule, name: str, x: torch.Tensor,
                    segments: Sequence[Segment]) -> None:
    """The residual update hidden += module(x) (+ each segment's delta) in place, the addition inside the matmul."""
    weight, segments = _module_weight(fw, module, name, segments)
    hidden.addmm_(x, weight.T)
    if module.bias is not None:
        hidden += module.bias
    add_deltas(hidden, name, x, segments)


def _project(fw: ForwardContext, module: HFModule, name: str, x: torch.Tensor,
             segments: Sequence[Segment]) -> torch.Tensor:
    """module(x) with each segment's delta (routing.project), or through the chunk's chain merged."""
    weight, segments = _module_weight(fw, module, name, segments)
    return project(module, name, x, segments, weight)


def _fused(fw: ForwardContext, fused: FusedLinear, x: torch.Tensor, segments: Sequence[Segment]) -> torch.Tensor:
    """Stacked projections (q|k, gate|up) with each segment's deltas, or through the chunk's chain merged."""
    weight, segments = _chunk_weight(fw, fused.weight, fused.parts, segments)
    return fused(x, segments, weight)


def _module_weight(fw: ForwardContext, module: HFModule, name: str,
                   segments: Sequence[Segment]) -> tuple[torch.Tensor, Sequence[Segment]]:
    """_chunk_weight for one module's own weight."""
    return _chunk_weight(fw, module.weight, ((name, slice(None)),), segments)


def _chunk_weight(fw: ForwardContext, weight: torch.Tensor, parts: Sequence[tuple[str, slice]],
                  segments: Sequence[Segment]) -> tuple[torch.Tensor, Sequence[Segment]]:
    """The weight a chunk's rows are multiplied by and the segments whose deltas are still to add: where every
    row runs one chain and the forward keeps merged weights (a CPU's), that chain's deltas folded into the
    weight (routing.MergedWeights) and no segments; else the base weight and every segment."""
    deltas, kept = segments[0].deltas if segments else None, fw.weights.merged
    if kept is None or not deltas or any(s.deltas != deltas for s in segments):
        return weight, segments
    merged = kept.weight(weight, [(cols, deltas.get(name)) for name, cols in parts])
    return (weight, segments) if merged is None else (merged, ())


def _attend(fw: ForwardContext, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, r: _Rows,
            shared: SharedPrefix | None, final_keys: torch.Tensor, few: bool) -> list[torch.Tensor]:
    """One prompt's attention outputs, (rows, heads, hd) per part: prefix, documents, final. The prefix and the
    documents need no mask (causal, bottom-right aligned); the final segment skips the documents' padding."""
    n, hd = r.doc_span.stop - r.doc_span.start, fw.head_dim
    if shared is not None and shared.k is not None and shared.v is not None:
        prefix_k, prefix_v = torch.cat([shared.k, k[r.prefix]]), torch.cat([shared.v, v[r.prefix]])
    else:
        prefix_k, prefix_v = k[r.prefix], v[r.prefix]
    docs = attend_docs_fused(_padded(q, r).view(n, -1, fw.n_kv, fw.group, hd),
                             _padded(k, r).view(n, -1, fw.n_kv, hd), _padded(v, r).view(n, -1, fw.n_kv, hd), None,
                             prefix_k, prefix_v, fw.scale).reshape(-1, fw.n_heads, hd)
    if r.real is not None:
        docs = docs[r.real]
    if few:  # the documents' and the final segment's own rows are adjacent in k and v: one source, read in place
        tail = slice(r.docs.start, r.final.stop)
        final = kernels.attend_few(q[r.final], [(prefix_k, prefix_v, None, False), (k[tail], v[tail], final_keys, True)],
                                   fw.scale)
    else:  # the final segment's keys, in its bias's order: the whole prefix, the documents, itself
        blocks = n if r.real is None else 1  # ragged documents are not blocks of one width
        parts = [(prefix_k, prefix_v, 1), (k[r.docs], v[r.docs], blocks), (k[r.final], v[r.final], 1)]
        final = attend_rows(q[r.final], parts, final_keys, fw.scale)
    return [attend_prefix(q[r.prefix], prefix_k, prefix_v, fw.scale), docs, final]


def _padded(x: torch.Tensor, r: _Rows) -> torch.Tensor:
    """The prompt's document rows of x in the padded (n_docs * width) layout attention and scoring read."""
    return x[r.docs] if r.gather is None else x[r.gather]


def _seen_docs(r: _Rows, valid: torch.Tensor) -> torch.Tensor:
    """Which of the prompt's document rows the final segment sees (bool, flat): the real tokens."""
    if r.real is None:
        return valid[r.doc_span].reshape(-1)
    return valid.new_ones(r.docs.stop - r.docs.start)  # ragged: every row is a real token


def _final_keys(r: _Rows, valid: torch.Tensor, few: bool) -> torch.Tensor:
    """What the final segment sees, in the form its attention takes: for kernels.attend_few, which of the
    [documents | final] rows it may see (n_docs * width + F,) (bool; the prefix is all seen, its own rows
    causally); for attend_rows, an additive float32 bias over [prefix | documents | final]."""
    if few:
        n_final = r.final.stop - r.final.start
        return torch.cat([_seen_docs(r, valid), valid.new_ones(n_final)])
    return key_bias(_final_mask(r, valid), torch.float32)


def _final_mask(r: _Rows, valid: torch.Tensor) -> torch.Tensor:
    """Who the final segment's tokens see, (F, S + P + n_docs * width + F): the prefix, the real document tokens,
    itself causally."""
    n_prefix, n_final = r.n_shared + r.prefix.stop - r.prefix.start, r.final.stop - r.final.start
    causal = torch.ones(n_final, n_final, dtype=torch.bool, device=valid.device).tril()
    return torch.cat([causal.new_ones(n_final, n_prefix), _seen_docs(r, valid)[None].expand(n_final, -1), causal],
                     dim=1)


def pack(fw: ForwardContext, prompts: Sequence[Prompt], routes: Sequence[Route],
         block_tokens: Sequence[int]) -> Packed:
    """Token ids and positions of the packed rows and each prompt's rows, built on the host with a handful of
    tensor ops per prompt (no per-token Python), copied to the device once. Positions as in the chunked path:
    prefix 0..L0-1, every document from L0, the final from L0 + block_tokens."""
    cpu = torch.device("cpu")
    docs = pad_docs(prompts, cpu)
    shared = [fw.shared_for(p, r, use_cache=True) for p, r in zip(prompts, routes, strict=True)]
    width = docs.ids.shape[1]
    ids: list[torch.Tensor] = []
    positions: list[torch.Tensor] = []
    rows: list[_Rows] = []
    first = 0
    device = fw.device
    for p, (start, end), block, cached in zip(prompts, docs.spans, block_tokens, shared, strict=True):
        n0, s, n = len(p.prefix), len(cached.tokens) if cached is not None else 0, end - start
        prefix = slice(first, first + n0 - s)
        doc_ids, doc_positions = docs.ids[start:end].reshape(-1), torch.arange(n0, n0 + width).repeat(n)
        gather = real = None
        slots = docs.valid[start:end].reshape(-1)
        # Only the real tokens (a GPU's padded layout needs no masking on the host); with no padding (documents
        # that fill their blocks) the real tokens are the padded layout itself, read in place without gathers.
        if fw.ragged_docs and not bool(slots.all()):
            doc_ids, doc_positions = doc_ids[slots], doc_positions[slots]
            gather, real = _ragged_index(slots, prefix.stop, device)
        ids += [torch.tensor(p.prefix[s:], dtype=torch.long), doc_ids, torch.tensor(p.final, dtype=torch.long)]
        positions += [torch.arange(s, n0), doc_positions, torch.arange(n0 + block, n0 + block + len(p.final))]
        doc_rows = slice(prefix.stop, prefix.stop + len(doc_ids))
        rows.append(_Rows(prefix, doc_rows, slice(doc_rows.stop, doc_rows.stop + len(p.final)), slice(start, end), s,
                          gather, real))
        first = rows[-1].final.stop
    as_tensor = torch.stack([torch.cat(ids), torch.cat(positions)]).to(device)
    return Packed(as_tensor[0], as_tensor[1], docs.valid.to(device), docs.scored.to(device), rows, shared)


def _ragged_index(valid: torch.Tensor, first: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """For documents laid out as their real tokens from row `first`: the row each slot of the padded layout reads
    (`valid` (n_docs * width,): documents are right-padded, so a padding slot's running count of real tokens names
    its document's last one), and the padded layout's real slots."""
    gather = first + torch.cumsum(valid, 0) - 1
    return gather.to(device), valid.nonzero().squeeze(1).to(device)
