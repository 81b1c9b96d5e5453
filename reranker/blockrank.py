"""BlockRank's structured sparse attention, computed without the dense mask.

Who sees what (Gupta et al., 2025):
    prefix tokens   -> prefix (causal)
    document i      -> whole prefix + document i (causal)
    final segment   -> everything before it + itself (causal)
Position ids: prefix 0..L0-1; every document restarts at L0; the final segment
starts at L0 + block_tokens. Documents therefore never see each other, so all
documents of all requests run as one batch of shape (docs, T) through the
projections and MLPs; attention is computed per part and joined in one
softmax: the prefix K/V are read in place (no copy per document), scores over
[prefix | own block] are concatenated and normalised together.

Relevance: at the scoring layer l*, the last `signal_tokens` tokens of the final
segment attend over all document tokens (softmax over document tokens only);
a document's score is the attention mass on its tokens, averaged over the chosen
heads and signal tokens. The forward stops there: layers after l* never run,
and at l* only the documents' K and the signal tokens' Q are computed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from reranker.prompt import Prompt

NEG_INF = float("-inf")


@dataclass(frozen=True)
class ScoringSpec:
    layer: int  # l*, 0-indexed decoder layer whose attention scores documents
    heads: tuple[int, ...] = ()  # empty = all heads
    block_tokens: int = 160  # position offset of the final segment is L0 + block_tokens


@dataclass
class DocBatch:
    """Documents of several prompts as one right-padded (docs, T) batch."""

    ids: torch.Tensor  # (D, T)
    valid: torch.Tensor  # (D, T) bool: real tokens (keys everyone may see)
    scored: torch.Tensor  # (D, T) bool: content tokens whose attention mass scores the doc
    spans: list[tuple[int, int]]  # [start, end) rows of each prompt


class BlockRankForward:
    """Runs a Hugging Face Llama-family model's layers on BlockRank's sparse layout."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.decoder = model.model
        cfg = model.config
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.group = self.n_heads // self.n_kv
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.scale = self.head_dim ** -0.5
        self.num_layers = cfg.num_hidden_layers
        self.chunk_tokens = 2048  # document tokens per chunk inside a layer: temporaries stay ~10 MB
        self.keep_inputs = False  # set while capturing per-layer inputs

    @property
    def device(self) -> torch.device:
        return self.decoder.embed_tokens.weight.device

    # ---- public ----------------------------------------------------------------
    @torch.inference_mode()
    def score(self, prompts: Sequence[Prompt], spec: ScoringSpec) -> list[torch.Tensor]:
        """Per prompt, a float32 tensor (n_docs,) of attention-mass scores."""
        per_layer = self.head_masses(prompts, spec.layer, [spec.layer], spec.block_tokens)
        heads = list(spec.heads) if spec.heads else list(range(self.n_heads))
        return [mass[0][:, heads].mean(dim=(0, 1)) for mass in per_layer]

    def head_masses(self, prompts: Sequence[Prompt], last_layer: int, score_layers: Sequence[int],
                    block_tokens: int, capture: list | None = None) -> list[torch.Tensor]:
        """Per prompt, (len(score_layers), signal_tokens, heads, n_docs) attention masses.

        Runs layers 0..last_layer-1 fully and scores at each layer in `score_layers`
        (all <= last_layer). `capture`, if given, receives each layer's input hidden
        states (prefix, docs, final) for the equivalence tests.
        """
        if not 0 <= last_layer < self.num_layers:
            raise ValueError(f"scoring layer must be in 0..{self.num_layers - 1}, got {last_layer}")
        device = self.device
        self.keep_inputs = capture is not None
        docs = _pad_docs(prompts, device)
        state = self._embed(prompts, docs, block_tokens)
        wanted = sorted(set(score_layers))
        masses: list[list[torch.Tensor]] = [[] for _ in prompts]
        for index in range(last_layer + 1):
            layer = self.decoder.layers[index]
            if capture is not None:
                capture.append((state.prefix, state.docs, state.final))
            if index in wanted:
                for i, mass in enumerate(self._score_layer(layer, state, docs, prompts)):
                    masses[i].append(mass)
            if index < last_layer:
                state = self._layer(layer, state, docs)
        return [torch.stack(m) for m in masses]

    # ---- internals -------------------------------------------------------------
    def _embed(self, prompts: Sequence[Prompt], docs: DocBatch, block_tokens: int) -> _State:
        embed = self.decoder.embed_tokens
        device = self.device
        prefix, final, rope_prefix, rope_final, offsets = [], [], [], [], []
        for p in prompts:
            n0 = len(p.prefix)
            offsets.append(n0)
            prefix.append(embed(torch.tensor([p.prefix], device=device)))
            final.append(embed(torch.tensor([p.final], device=device)))
            rope_prefix.append(self._rope(torch.arange(n0, device=device)[None]))
            rope_final.append(self._rope(torch.arange(len(p.final), device=device)[None] + n0 + block_tokens))
        doc_offsets = torch.zeros(docs.ids.shape[0], 1, dtype=torch.long, device=device)
        for (start, end), n0 in zip(docs.spans, offsets, strict=True):
            doc_offsets[start:end] = n0
        positions = doc_offsets + torch.arange(docs.ids.shape[1], device=device)[None]
        return _State(prefix, embed(docs.ids), final, rope_prefix, self._rope(positions), rope_final)

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dummy = self.decoder.embed_tokens.weight[:1]
        return self.decoder.rotary_emb(dummy, positions)

    def _qkv(self, layer, hidden: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, T, D) -> q (B, T, kv, group, hd), k/v (B, T, kv, hd), RoPE applied."""
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)
        b, t, _ = x.shape
        q = attn.q_proj(x).view(b, t, self.n_heads, self.head_dim)
        k = attn.k_proj(x).view(b, t, self.n_kv, self.head_dim)
        v = attn.v_proj(x).view(b, t, self.n_kv, self.head_dim)
        q, k = _apply_rope(q, rope), _apply_rope(k, rope)
        return q.view(b, t, self.n_kv, self.group, self.head_dim), k, v

    def _finish(self, layer, hidden: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """o_proj, residual, MLP, residual. attn_out: (B, T, kv, group, hd)."""
        b, t = attn_out.shape[:2]
        hidden = hidden + layer.self_attn.o_proj(attn_out.reshape(b, t, self.n_heads * self.head_dim))
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))

    def _layer(self, layer, state: _State, docs: DocBatch) -> _State:
        n_docs, width = docs.ids.shape
        # At inference the documents' hidden states are updated in place (chunks are independent) and
        # one K/V buffer serves every layer: no large allocation per layer. Autograd and the
        # equivalence tests' captures need every layer's tensors kept, so they get fresh ones.
        in_place = torch.is_inference_mode_enabled() and not self.keep_inputs
        shape = (n_docs, width, self.n_kv, self.head_dim)
        if in_place:
            if state.kv_buffer is None:
                state.kv_buffer = torch.empty((2, *shape), dtype=state.docs.dtype, device=state.docs.device)
            doc_keys, doc_values = state.kv_buffer
        else:
            doc_keys = torch.empty(shape, dtype=state.docs.dtype, device=state.docs.device)
            doc_values = torch.empty_like(doc_keys)
        new_docs = state.docs if in_place else torch.empty_like(state.docs)
        new_prefix, new_final = [], []
        for i, (start, end) in enumerate(docs.spans):
            qp, kp, vp = self._qkv(layer, state.prefix[i], state.rope_prefix[i])
            kp, vp = kp[0], vp[0]
            new_prefix.append(self._finish(layer, state.prefix[i], self._attend(qp[0], [], causal=(kp, vp))[None]))
            # Documents go through the layer a chunk at a time: every tensor stays cache-sized, so the
            # cost per document does not grow with the number of documents.
            for lo in range(start, end, max(1, self.chunk_tokens // width)):
                hi = min(end, lo + max(1, self.chunk_tokens // width))
                rope = tuple(r[lo:hi] for r in state.rope_docs)
                q, doc_keys[lo:hi], doc_values[lo:hi] = self._qkv(layer, state.docs[lo:hi], rope)
                out = self._attend_docs(q, doc_keys[lo:hi], doc_values[lo:hi], docs.valid[lo:hi], kp, vp)
                new_docs[lo:hi] = self._finish(layer, state.docs[lo:hi], out)
            qf, kf, vf = self._qkv(layer, state.final[i], state.rope_final[i])
            keys = doc_keys[start:end].reshape(-1, self.n_kv, self.head_dim)
            values = doc_values[start:end].reshape(-1, self.n_kv, self.head_dim)
            pad = _key_bias(docs.valid[start:end].reshape(-1), qf.dtype)
            final_out = self._attend(qf[0], [(kp, vp, None), (keys, values, pad)], causal=(kf[0], vf[0]))
            new_final.append(self._finish(layer, state.final[i], final_out[None]))
        return _State(new_prefix, new_docs, new_final, state.rope_prefix, state.rope_docs, state.rope_final,
                      state.kv_buffer)

    def _attend(self, q: torch.Tensor, parts, causal) -> torch.Tensor:
        """One sequence of queries q (T, kv, g, hd) over key parts that it sees fully
        (each (keys (S, kv, hd), values, additive key bias (S,) or None)) plus its own
        keys/values under the causal rule; a single softmax over all of them."""
        scores, values = [], []
        for keys, vals, bias in parts:
            s = torch.einsum("tkgd,skd->tkgs", q, keys) * self.scale
            scores.append(s if bias is None else s + bias)
            values.append(vals)
        own_keys, own_values = causal
        t = q.shape[0]
        s = torch.einsum("tkgd,skd->tkgs", q, own_keys) * self.scale
        scores.append(s + _causal_bias(t, s.dtype, s.device)[:, None, None, :])
        values.append(own_values)
        probs = torch.softmax(torch.cat(scores, dim=-1).float(), dim=-1).to(q.dtype)
        out, offset = 0, 0
        for vals in values:
            out = out + torch.einsum("tkgs,skd->tkgd", probs[..., offset:offset + vals.shape[0]], vals)
            offset += vals.shape[0]
        return out

    def _attend_docs(self, q, k, v, valid, kp, vp) -> torch.Tensor:
        """Documents (N, T, kv, g, hd) over the shared prefix (read in place) and their own block."""
        n, t = q.shape[:2]
        to_prefix = torch.einsum("ntkgd,lkd->ntkgl", q, kp) * self.scale
        own = torch.einsum("ntkgd,nskd->ntkgs", q, k) * self.scale
        bias = _causal_bias(t, own.dtype, own.device)[None, :, None, None, :] + \
            _key_bias(valid, own.dtype)[:, None, None, None, :]
        probs = torch.softmax(torch.cat([to_prefix, own + bias], dim=-1).float(), dim=-1).to(q.dtype)
        n_prefix = kp.shape[0]
        return (torch.einsum("ntkgl,lkd->ntkgd", probs[..., :n_prefix], vp)
                + torch.einsum("ntkgs,nskd->ntkgd", probs[..., n_prefix:], v))

    def _score_layer(self, layer, state: _State, docs: DocBatch, prompts: Sequence[Prompt]) -> list[torch.Tensor]:
        """Attention mass of the signal tokens on each document: (signal, heads, n_docs) per prompt.
        Only the documents' K and the signal tokens' Q are computed here."""
        attn = layer.self_attn
        x = layer.input_layernorm(state.docs)
        d, t, _ = x.shape
        k = attn.k_proj(x).view(d, t, self.n_kv, self.head_dim)
        k = _apply_rope(k, state.rope_docs)
        out = []
        for i, (start, end) in enumerate(docs.spans):
            s = prompts[i].signal_tokens
            hf = layer.input_layernorm(state.final[i][:, -s:])
            q = attn.q_proj(hf).view(1, s, self.n_heads, self.head_dim)
            signal_rope = tuple(r[:, -s:] for r in state.rope_final[i])
            q = _apply_rope(q, signal_rope)[0].view(s, self.n_kv, self.group, self.head_dim)
            logits = torch.einsum("skgd,ntkd->skgnt", q, k[start:end]).float() * self.scale
            logits = logits + _key_bias(docs.scored[start:end], torch.float32)
            n = end - start
            probs = torch.softmax(logits.reshape(s, self.n_kv, self.group, n * t), dim=-1)
            out.append(probs.view(s, self.n_heads, n, t).sum(-1))
        return out


@dataclass
class _State:
    prefix: list[torch.Tensor]  # per prompt (1, L0, D)
    docs: torch.Tensor  # (D, T, hidden)
    final: list[torch.Tensor]  # per prompt (1, Lf, D)
    rope_prefix: list
    rope_docs: tuple[torch.Tensor, torch.Tensor]
    rope_final: list
    kv_buffer: torch.Tensor | None = None  # (2, docs, T, kv, hd), reused across layers at inference


def _pad_docs(prompts: Sequence[Prompt], device: torch.device) -> DocBatch:
    rows = [doc for p in prompts for doc in p.docs]
    if not rows or any(not row for row in rows):
        raise ValueError("every prompt needs at least one non-empty document")
    width = max(len(row) for row in rows)
    tags = [n for p in prompts for n in p.tag_lengths]
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    valid = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        valid[i, : len(row)] = True
    scored = valid & (torch.arange(width)[None] >= torch.tensor(tags)[:, None])
    spans, start = [], 0
    for p in prompts:
        spans.append((start, start + p.n_docs))
        start += p.n_docs
    return DocBatch(ids.to(device), valid.to(device), scored.to(device), spans)


def _causal_bias(t: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.full((t, t), NEG_INF, dtype=dtype, device=device).triu(1)


def _key_bias(valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(valid.shape, dtype=dtype, device=valid.device).masked_fill(~valid, NEG_INF)


def _apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotary embedding for x laid out (B, T, heads, hd); cos/sin are (B, T, hd)."""
    cos, sin = rope[0][:, :, None], rope[1][:, :, None]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


# ---- dense references (tests and the speed baseline) ---------------------------------------
def block_sparse_layout(prompt: Prompt, block_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                    torch.Tensor]:
    """The same prompt as ONE sequence: (ids, positions, additive mask (S, S), and per token the
    document slot whose score it counts towards, or -1).
    Documents are right-padded to the longest block; pads are masked as keys."""
    width = max(len(d) for d in prompt.docs)
    n0 = len(prompt.prefix)
    ids, pos, block, valid = list(prompt.prefix), list(range(n0)), [0] * n0, [True] * n0
    content = [False] * n0
    for i, doc in enumerate(prompt.docs):
        pad = width - len(doc)
        ids += doc + [0] * pad
        pos += list(range(n0, n0 + width))
        block += [i + 1] * width
        valid += [True] * len(doc) + [False] * pad
        tag = prompt.tag_lengths[i]
        content += [False] * tag + [True] * (len(doc) - tag) + [False] * pad
    nf = len(prompt.final)
    ids += prompt.final
    pos += list(range(n0 + block_tokens, n0 + block_tokens + nf))
    final_block = len(prompt.docs) + 1
    block += [final_block] * nf
    valid += [True] * nf
    content += [False] * nf
    block_t = torch.tensor(block)
    valid_t = torch.tensor(valid)
    s = len(ids)
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    query_block, key_block = block_t[:, None], block_t[None, :]
    allowed = causal & ((key_block == 0) | (query_block == key_block) | (query_block == final_block))
    allowed &= valid_t[None, :]
    allowed |= torch.eye(s, dtype=torch.bool)  # pad queries see themselves: no all -inf rows
    mask = torch.zeros(s, s).masked_fill(~allowed, NEG_INF)
    slot = torch.where(torch.tensor(content), block_t - 1, -1)
    return torch.tensor(ids), torch.tensor(pos), mask, slot


def full_causal_ids(prompt: Prompt) -> torch.Tensor:
    """The usual listwise reranker input: all segments back to back, ordinary causal attention."""
    return torch.tensor(prompt.prefix + [t for doc in prompt.docs for t in doc] + prompt.final)


def reference_scores(model: torch.nn.Module, prompt: Prompt, spec: ScoringSpec) -> tuple[torch.Tensor, tuple]:
    """Dense masked reference: eager attention over the full sequence with the block mask.
    Returns (scores (n_docs,), hidden states per layer) computed from the model's own attention
    probabilities at l*, renormalised over document tokens."""
    ids, pos, mask, slot = block_sparse_layout(prompt, spec.block_tokens)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    out = model.model(input_ids=ids[None].to(device), position_ids=pos[None].to(device),
                      attention_mask=mask[None, None].to(device=device, dtype=dtype),
                      output_hidden_states=True, output_attentions=True, use_cache=False)
    probs = out.attentions[spec.layer][0, :, -prompt.signal_tokens:, :].float()  # (heads, signal, S)
    on_docs = slot >= 0
    doc_probs = probs[:, :, on_docs.to(device)]
    doc_probs = doc_probs / doc_probs.sum(-1, keepdim=True)
    per_doc = torch.zeros(probs.shape[0], probs.shape[1], prompt.n_docs, device=device)
    per_doc.index_add_(2, slot[on_docs].to(device), doc_probs)
    heads = list(spec.heads) if spec.heads else list(range(probs.shape[0]))
    return per_doc[heads].mean(dim=(0, 1)).cpu(), out.hidden_states


