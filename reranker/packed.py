"""BlockRank's inference forward with every token of every prompt packed into one (rows, hidden) matrix: the
GPU path.

On a GPU a small model's rerank is bound by kernel launches, not by arithmetic. The chunked path
(reranker.blockrank) runs each prompt's prefix, its documents and its final segment as separate batches, so
every norm, projection, LoRA delta and MLP is launched three times per prompt per layer. Here the rows of all
parts of all prompts ([prefix | documents | final] per prompt, documents right-padded to one width) go through
them once per layer, the norms as one fused kernel each; only attention is per part: the same who-sees-what and
positions as the chunked path, through SDPA with boolean masks built once per forward. Inference only (no
captures, no autograd); equal to the dense reference (tests/reranker/test_attention.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from reranker.attention import apply_rope, attend_docs_fused, attend_masked, attention_mass, docs_mask
from reranker.docbatch import DocBatch, pad_docs
from reranker.model import HFModule
from reranker.prompt import Prompt
from reranker.routing import Route, Segment, mlp, project

if TYPE_CHECKING:
    from reranker.blockrank import BlockRankForward, _Shared


@dataclass
class _Rows:
    """One prompt's rows in the packed matrix and its attention masks (fixed for the whole forward)."""

    prefix: slice  # its own prefix tokens (after the shared cached ones)
    docs: slice  # n_docs * width rows
    final: slice
    n_docs: int
    valid: torch.Tensor  # (n_docs, width) real document tokens
    scored: torch.Tensor  # (n_docs, width) tokens whose attention mass scores the document
    prefix_mask: torch.Tensor  # (P, S + P): shared tokens, then causal
    docs_mask: torch.Tensor  # (n_docs, 1, width, S + P + width): the prefix, then the own block causally
    final_mask: torch.Tensor  # (F, S + P + n_docs * width + F): prefix, real document tokens, causal


def rms_norm(norm: HFModule, x: torch.Tensor) -> torch.Tensor:
    """The model's RMSNorm as one fused kernel (its HF forward is seven)."""
    return torch.nn.functional.rms_norm(x, (x.shape[-1],), norm.weight, norm.variance_epsilon)


def run_packed(fw: BlockRankForward, prompts: Sequence[Prompt], routes: Sequence[Route],
               block_tokens: Sequence[int], score_layers: Sequence[Sequence[int]],
               last_layer: int) -> list[dict[int, torch.Tensor]]:
    """Per prompt, {layer: (signal, heads, n_docs) attention masses} for its score layers."""
    docs = pad_docs(prompts, fw.device)
    shared = [fw.shared_for(p, r, use_cache=True) for p, r in zip(prompts, routes, strict=True)]
    ids, positions, rows = _pack(prompts, docs, block_tokens, shared)
    hidden = fw.decoder.embed_tokens(ids)
    rope = fw.rope(positions[None])
    local: dict = {}
    masses: list[dict[int, torch.Tensor]] = [{} for _ in prompts]
    spans = [Segment(r.prefix.start, r.final.stop, None, i) for i, r in enumerate(rows)]
    for index in range(last_layer + 1):
        layer = fw.decoder.layers[index]
        deltas = [route.at(index) for route in routes]
        if any(shared):
            fw.advance_shared(index, layer, shared, local, routes, deltas)
        segments = [Segment(s.lo, s.hi, deltas[i], i) for i, s in enumerate(spans)]
        q, k, v = _qkv(fw, layer, hidden, rope, segments)
        for i, layers in enumerate(score_layers):
            if index in layers:
                r, s = rows[i], prompts[i].signal_tokens
                signal = q[r.final][-s:].view(s, fw.n_kv, fw.group, fw.head_dim)
                doc_keys = k[r.docs].view(r.n_docs, -1, fw.n_kv, fw.head_dim)
                masses[i][index] = attention_mass(signal, doc_keys, r.scored, fw.scale)
        if index == last_layer:
            break
        out = torch.cat([part for i, r in enumerate(rows) for part in _attend(fw, q, k, v, r, shared[i])])
        hidden = hidden + project(layer.self_attn.o_proj, "self_attn.o_proj", out.flatten(1), segments)
        hidden = hidden + mlp(layer.mlp, rms_norm(layer.post_attention_layernorm, hidden), segments)
    return masses


def _qkv(fw: BlockRankForward, layer: HFModule, hidden: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
         segments: Sequence[Segment]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, D) -> q (rows, heads, hd), k/v (rows, kv, hd), RoPE applied."""
    attn = layer.self_attn
    x = rms_norm(layer.input_layernorm, hidden)
    q = project(attn.q_proj, "self_attn.q_proj", x, segments).view(-1, fw.n_heads, fw.head_dim)
    k = project(attn.k_proj, "self_attn.k_proj", x, segments).view(-1, fw.n_kv, fw.head_dim)
    v = project(attn.v_proj, "self_attn.v_proj", x, segments).view(-1, fw.n_kv, fw.head_dim)
    return apply_rope(q[None], rope)[0], apply_rope(k[None], rope)[0], v


def _attend(fw: BlockRankForward, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, r: _Rows,
            shared: _Shared | None) -> list[torch.Tensor]:
    """One prompt's attention outputs, (rows, heads, hd) per part: prefix, documents, final."""
    whole = slice(r.prefix.start, r.final.stop)  # the final segment sees every row of its prompt (masked)
    if shared is not None and shared.k is not None and shared.v is not None:
        prefix_k, prefix_v = torch.cat([shared.k, k[r.prefix]]), torch.cat([shared.v, v[r.prefix]])
        keys, values = torch.cat([shared.k, k[whole]]), torch.cat([shared.v, v[whole]])
    else:
        prefix_k, prefix_v, keys, values = k[r.prefix], v[r.prefix], k[whole], v[whole]
    n, hd = r.n_docs, fw.head_dim
    docs = attend_docs_fused(q[r.docs].view(n, -1, fw.n_kv, fw.group, hd), k[r.docs].view(n, -1, fw.n_kv, hd),
                             v[r.docs].view(n, -1, fw.n_kv, hd), r.valid, prefix_k, prefix_v, fw.scale,
                             r.docs_mask)
    return [attend_masked(q[r.prefix], prefix_k, prefix_v, r.prefix_mask, fw.scale),
            docs.reshape(-1, fw.n_heads, hd),
            attend_masked(q[r.final], keys, values, r.final_mask, fw.scale)]


def _pack(prompts: Sequence[Prompt], docs: DocBatch, block_tokens: Sequence[int],
          shared: Sequence[_Shared | None]) -> tuple[torch.Tensor, torch.Tensor, list[_Rows]]:
    """Token ids and positions of the packed rows (built here, copied to the device once) and each prompt's rows.
    Positions as in the chunked path: prefix 0..L0-1, every document from L0, the final from L0 + block_tokens."""
    device, width = docs.ids.device, docs.ids.shape[1]
    ids: list[int] = []
    positions: list[int] = []
    rows: list[_Rows] = []
    for p, (start, end), block, cached in zip(prompts, docs.spans, block_tokens, shared, strict=True):
        n0, s = len(p.prefix), len(cached.tokens) if cached is not None else 0
        first = len(ids)
        ids += p.prefix[s:]
        positions += range(s, n0)
        for doc in p.docs:
            ids += doc + [0] * (width - len(doc))
            positions += range(n0, n0 + width)
        ids += p.final
        positions += range(n0 + block, n0 + block + len(p.final))
        prefix, n = slice(first, first + n0 - s), end - start
        doc_rows = slice(prefix.stop, prefix.stop + n * width)
        valid = docs.valid[start:end]
        n_final = len(p.final)
        causal_prefix = torch.ones(n0 - s, n0 - s, dtype=torch.bool, device=device).tril()
        causal_final = torch.ones(n_final, n_final, dtype=torch.bool, device=device).tril()
        rows.append(_Rows(prefix, doc_rows, slice(doc_rows.stop, doc_rows.stop + n_final), n, valid,
                          docs.scored[start:end],
                          torch.cat([causal_prefix.new_ones(n0 - s, s), causal_prefix], dim=1),
                          docs_mask(valid, n0),
                          torch.cat([causal_final.new_ones(n_final, n0), valid.reshape(1, -1).expand(n_final, -1),
                                     causal_final], dim=1)))
    as_tensor = torch.tensor([ids, positions], dtype=torch.long).to(device)
    return as_tensor[0], as_tensor[1], rows
