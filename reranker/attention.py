"""The attention arithmetic of BlockRank's sparse layout: softmax over several key parts joined
together (read in place, never concatenated into a dense sequence), causal and padding biases,
and rotary position embeddings. Pure tensor functions; reranker.blockrank decides who sees what.

Layouts: queries (T, kv, group, hd) for one sequence or (N, T, kv, group, hd) for documents;
keys and values (S, kv, hd) or (N, S, kv, hd); `kv` key/value heads, `group` query heads per kv head.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

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
