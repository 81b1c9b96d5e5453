"""The attention arithmetic of BlockRank's sparse layout: softmax over several key parts joined
together (read in place, never concatenated into a dense sequence), causal and padding biases,
and rotary position embeddings. Pure tensor functions; reranker.blockrank decides who sees what.

Layouts: queries (T, kv, group, hd) for one sequence or (N, T, kv, group, hd) for documents;
keys and values (S, kv, hd) or (N, S, kv, hd); `kv` key/value heads, `group` query heads per kv head.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn.attention.bias import CausalBias, causal_lower_right

NEG_INF = float("-inf")
# A key part one sequence sees fully: keys (S, kv, hd), values (S, kv, hd), additive key bias (S,) or None.
KeyPart = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]
Rope = tuple[torch.Tensor, torch.Tensor]  # cos, sin of the rotary embedding at each position


def attend(q: torch.Tensor, parts: Sequence[KeyPart], own: tuple[torch.Tensor, torch.Tensor],
           scale: float) -> torch.Tensor:
    """One sequence of queries q (T, kv, g, hd) over key parts it sees fully plus its own keys/values
    (T, kv, hd) under the causal rule; a single softmax over all of them."""
    scores, values = [], []
    for keys, vals, bias in parts:
        s = torch.einsum("tkgd,skd->tkgs", q, keys) * scale
        scores.append(s if bias is None else s + bias)
        values.append(vals)
    own_keys, own_values = own
    s = torch.einsum("tkgd,skd->tkgs", q, own_keys) * scale
    scores.append(s + causal_bias(q.shape[0], s.dtype, s.device)[:, None, None, :])
    values.append(own_values)
    probs = torch.softmax(torch.cat(scores, dim=-1).float(), dim=-1).to(q.dtype)
    out = torch.zeros_like(q)
    offset = 0
    for vals in values:
        out = out + torch.einsum("tkgs,skd->tkgd", probs[..., offset:offset + vals.shape[0]], vals)
        offset += vals.shape[0]
    return out


def attend_docs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor,
                prefix_k: torch.Tensor, prefix_v: torch.Tensor, scale: float) -> torch.Tensor:
    """Documents q (N, T, kv, g, hd) over the shared prefix (L, kv, hd), read in place, and their own
    block k/v (N, T, kv, hd) under the causal rule; `valid` (N, T) masks padding keys."""
    t = q.shape[1]
    to_prefix = torch.einsum("ntkgd,lkd->ntkgl", q, prefix_k) * scale
    own = torch.einsum("ntkgd,nskd->ntkgs", q, k) * scale
    bias = causal_bias(t, own.dtype, own.device)[None, :, None, None, :] + \
        key_bias(valid, own.dtype)[:, None, None, None, :]
    probs = torch.softmax(torch.cat([to_prefix, own + bias], dim=-1).float(), dim=-1).to(q.dtype)
    n_prefix = prefix_k.shape[0]
    return (torch.einsum("ntkgl,lkd->ntkgd", probs[..., :n_prefix], prefix_v)
            + torch.einsum("ntkgs,nskd->ntkgd", probs[..., n_prefix:], v))


def attend_docs_fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None,
                      prefix_k: torch.Tensor, prefix_v: torch.Tensor, scale: float) -> torch.Tensor:
    """attend_docs through torch's fused SDPA kernels, with no mask: each document's keys are [prefix | own
    block] and its token i sees the whole prefix and its own tokens 0..i, which is exactly causal attention
    aligned to the bottom-right corner (causal_lower_right), the flash kernel's native causal mode. Documents are
    right-padded, so a real token never reaches a padding key; `valid` is therefore implied (it is kept for
    attend_docs' signature). The prefix K/V are broadcast to every document (L rows per document, small beside
    the block itself)."""
    n, t, kv, g, hd = q.shape
    n_prefix = prefix_k.shape[0]
    keys = torch.cat([prefix_k.permute(1, 0, 2)[None].expand(n, kv, n_prefix, hd), k.permute(0, 2, 1, 3)], dim=2)
    values = torch.cat([prefix_v.permute(1, 0, 2)[None].expand(n, kv, n_prefix, hd), v.permute(0, 2, 1, 3)], dim=2)
    queries = q.reshape(n, t, kv * g, hd).transpose(1, 2)  # (N, heads, T, hd); head = kv * g + group
    out = attend_causal(queries, keys, values, scale)
    return out.transpose(1, 2).reshape(n, t, kv, g, hd)


def attend_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q (B, heads, T, hd) over k/v (B, kv, S, hd), S >= T, query i seeing keys 0..S-T+i: a part that sees
    everything before it (a prefix) and then itself causally, with no mask tensor (flash attention on a GPU)."""
    bias = causal_lower_right(q.shape[2], k.shape[2])
    if q.shape[1] != k.shape[1] and _native_gqa(q.device, q.dtype):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale, enable_gqa=True)
    return _sdpa(q, k, v, bias, scale)


_NATIVE_GQA: dict[tuple[torch.device, torch.dtype], bool] = {}


def _native_gqa(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the causal kernel on this device and dtype reads grouped key heads in place (flash does), sparing
    the copies that repeat them per query head. Probed once per (device, dtype) on a small problem against the
    repeated heads, outside any CUDA graph capture (a shape is captured after it ran eagerly)."""
    key = (device, dtype)
    if key not in _NATIVE_GQA:
        generator = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(2, h, 24, 64, generator=generator).to(device, dtype) for h in (6, 2, 2))
        try:
            with torch.no_grad():
                bias = causal_lower_right(16, 24)
                native = torch.nn.functional.scaled_dot_product_attention(q[:, :, 8:], k, v, attn_mask=bias,
                                                                          enable_gqa=True)
                repeated = _sdpa(q[:, :, 8:], k, v, bias, 64 ** -0.5)
            _NATIVE_GQA[key] = bool(torch.allclose(native.float(), repeated.float(), atol=2e-2))
        except (RuntimeError, ValueError):
            _NATIVE_GQA[key] = False
    return _NATIVE_GQA[key]


# A part of the keys the final segment sees: keys and values (S, kv, hd), and the number of equal blocks its
# probabilities-times-values product is split into (its documents; 1: not split).
RowPart = tuple[torch.Tensor, torch.Tensor, int]


def attend_rows(q: torch.Tensor, parts: Sequence[RowPart], bias: torch.Tensor, scale: float) -> torch.Tensor:
    """A few queries q (T, heads, hd) over key/value parts read in place as one sequence, with an additive bias
    (T, sum S_i) (-inf: not seen): the packed path's final segment, a dozen queries over every row of its prompt.
    One softmax in float32, the products in q's dtype (as the model's own attention).

    Every product reads its operands in place (no permuting copies): the queries as (kv, T * group, hd), the
    values of all kv heads as one (S, kv * hd) matrix, whose product with a head's probabilities is kept only
    for that head (the diagonal blocks; kv times the arithmetic of a few rows, which costs nothing beside a
    kernel launch). A part split into blocks has its probabilities-times-values product batched per block and
    summed in float32: one product 16K keys deep gets a small-tile kernel with no parallelism over keys (0.28
    ms per call on an H100, 7.6 of 18.4 ms per 100-document rerank), a hundred products 160 deep fill the GPU."""
    t, heads, hd = q.shape
    kv = parts[0][0].shape[1]
    group = heads // kv
    rows = t * group  # per kv head, row t * group + g
    queries = q.view(t, kv, group, hd).transpose(0, 1).reshape(kv, rows, hd)
    scores = torch.cat([torch.matmul(queries, k.permute(1, 2, 0)) for k, _, _ in parts], dim=-1)
    biased = torch.add(bias[None, :, None, :], scores.view(kv, t, group, -1), alpha=scale)
    probs = torch.softmax(biased, dim=-1).to(q.dtype).view(kv * rows, -1)
    out: torch.Tensor | None = None
    offset = 0
    for _, v, blocks in parts:
        n_keys = v.shape[0]
        p, values = probs[:, offset:offset + n_keys], v.reshape(n_keys, kv * hd)
        offset += n_keys
        if blocks > 1:
            width = n_keys // blocks
            per_block = torch.bmm(p.view(kv * rows, blocks, width).transpose(0, 1), values.view(blocks, width, -1))
            part = per_block.view(blocks, kv, rows, kv, hd).diagonal(dim1=1, dim2=3).sum(0, dtype=torch.float32)
        else:
            part = (p @ values).view(kv, rows, kv, hd).diagonal(dim1=0, dim2=2).float()
        out = part if out is None else out + part  # (rows, hd, kv)
    assert out is not None
    by_head = out.reshape(t, group, hd, kv).permute(0, 3, 1, 2)
    out_q = torch.empty((t, kv, group, hd), dtype=q.dtype, device=q.device)
    return out_q.copy_(by_head).view(t, heads, hd)  # the cast and the reordering in one copy


def attend_prefix(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """One sequence's own tokens q (T, heads, hd) over [earlier tokens | itself] (S, kv, hd), causally."""
    out = attend_causal(q.transpose(0, 1)[None], keys.transpose(0, 1)[None], values.transpose(0, 1)[None], scale)
    return out[0].transpose(0, 1)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | CausalBias,
          scale: float) -> torch.Tensor:
    """q (B, heads, T, hd) over k/v (B, kv, S, hd): key heads repeated to query heads (head = kv * group + g),
    so that every fused kernel applies (flash for a causal bias, memory-efficient for a boolean mask)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def attention_mass(q: torch.Tensor, k: torch.Tensor, scored: torch.Tensor, scale: float) -> torch.Tensor:
    """BlockRank's relevance: signal queries q (s, kv, g, hd) over the documents' keys k (N, T, kv, hd), softmax
    over the `scored` (N, T) tokens only, summed per document: (s, heads, N)."""
    s, n, t = q.shape[0], k.shape[0], k.shape[1]
    logits = torch.einsum("skgd,ntkd->skgnt", q, k).float() * scale
    logits = logits + key_bias(scored, torch.float32)
    probs = torch.softmax(logits.reshape(s, q.shape[1], q.shape[2], n * t), dim=-1)
    return probs.view(s, q.shape[1] * q.shape[2], n, t).sum(-1)


def causal_bias(t: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.full((t, t), NEG_INF, dtype=dtype, device=device).triu(1)


def key_bias(valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(valid.shape, dtype=dtype, device=valid.device).masked_fill(~valid, NEG_INF)


def apply_rope(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotary embedding for x laid out (B, T, heads, hd); cos/sin are (B, T, hd)."""
    cos, sin = rope[0][:, :, None], rope[1][:, :, None]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
