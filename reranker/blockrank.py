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

import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise

import torch

from reranker.prompt import Prompt

NEG_INF = float("-inf")


@dataclass(frozen=True)
class ScoringSpec:
    layer: int  # l*, 0-indexed decoder layer whose attention scores documents
    heads: tuple[int, ...] = ()  # empty = all heads
    block_tokens: int = 160  # position offset of the final segment is L0 + block_tokens


@dataclass(frozen=True, eq=False)
class LoraDelta:
    """A low-rank update of one linear module: y += (x A^T) B^T, B pre-multiplied by the LoRA scale."""

    a: torch.Tensor  # (r, in)
    b: torch.Tensor  # (out, r), already scaled

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.a.T) @ self.b.T

    @property
    def nbytes(self) -> int:
        return self.a.numel() * self.a.element_size() + self.b.numel() * self.b.element_size()


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


class SharedPrefixCache:
    """Per layer, the K/V and output hidden states of the shared instruction tokens, keyed by
    (identity of the model chain up to that layer, token ids). Tenants whose chains agree up to a
    layer share the entry; keys name content, so entries never go stale. LRU, bounded in bytes."""

    def __init__(self, max_bytes: int = 64 << 20) -> None:
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
        size = sum(t.numel() * t.element_size() for t in entry)
        with self._lock:
            if key in self._entries:
                return
            self._entries[key] = entry
            self.nbytes += size
            while self.nbytes > self.max_bytes and len(self._entries) > 1:
                _, old = self._entries.popitem(last=False)
                self.nbytes -= sum(t.numel() * t.element_size() for t in old)


# Rows [lo, hi) of a batch and the deltas that apply to them; `owner` is the prompt they belong to.
@dataclass(frozen=True)
class _Segment:
    lo: int
    hi: int
    deltas: LayerDeltas | None
    owner: int = 0


@dataclass
class DocBatch:
    """Documents of several prompts as one right-padded (docs, T) batch."""

    ids: torch.Tensor  # (D, T)
    valid: torch.Tensor  # (D, T) bool: real tokens (keys everyone may see)
    scored: torch.Tensor  # (D, T) bool: content tokens whose attention mass scores the doc
    spans: list[tuple[int, int]]  # [start, end) rows of each prompt


class BlockRankForward:
    """Runs a Hugging Face Llama-family model's layers on BlockRank's sparse layout.

    Several model chains can share one forward: each prompt has a Route (its per-layer LoRA
    deltas). The base projections run once over every row of the batch; each chain's delta is
    added to its own rows only (grouped low-rank matmuls), so tenants are never run one at a time.
    """

    def __init__(self, model: torch.nn.Module, prefix_cache: SharedPrefixCache | None = None) -> None:
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
        self.prefix_cache = prefix_cache

    @property
    def device(self) -> torch.device:
        return self.decoder.embed_tokens.weight.device

    # ---- public ----------------------------------------------------------------
    @torch.inference_mode()
    def score(self, prompts: Sequence[Prompt], spec: ScoringSpec) -> list[torch.Tensor]:
        """Per prompt, a float32 tensor (n_docs,) of attention-mass scores (base model)."""
        return self.score_routed(prompts, [spec] * len(prompts), [BASE_ROUTE] * len(prompts))

    @torch.inference_mode()
    def score_routed(self, prompts: Sequence[Prompt], specs: Sequence[ScoringSpec],
                     routes: Sequence[Route]) -> list[torch.Tensor]:
        """Prompts of different model chains and scoring specs in one pass: the forward runs to the
        deepest scoring layer and scores each prompt at its own."""
        masses = self._run(prompts, routes, [s.block_tokens for s in specs], [[s.layer] for s in specs],
                           max(s.layer for s in specs))
        out = []
        for mass, spec in zip(masses, specs, strict=True):
            heads = list(spec.heads) if spec.heads else list(range(self.n_heads))
            out.append(mass[spec.layer][:, heads].mean(dim=(0, 1)))
        return out

    def head_masses(self, prompts: Sequence[Prompt], last_layer: int, score_layers: Sequence[int],
                    block_tokens: int, capture: list | None = None,
                    routes: Sequence[Route] | None = None) -> list[torch.Tensor]:
        """Per prompt, (len(score_layers), signal_tokens, heads, n_docs) attention masses.

        Runs layers 0..last_layer-1 fully and scores at each layer in `score_layers`
        (all <= last_layer). `capture`, if given, receives each layer's input hidden
        states (prefix, docs, final) for the equivalence tests. `routes`: per prompt chain (default: base).
        """
        wanted = sorted(set(score_layers))
        n = len(prompts)
        masses = self._run(prompts, routes or [BASE_ROUTE] * n, [block_tokens] * n, [wanted] * n, last_layer, capture)
        return [torch.stack([m[layer] for layer in wanted]) for m in masses]

    # ---- internals -------------------------------------------------------------
    def _run(self, prompts: Sequence[Prompt], routes: Sequence[Route], block_tokens: Sequence[int],
             score_layers: Sequence[Sequence[int]], last_layer: int,
             capture: list | None = None) -> list[dict[int, torch.Tensor]]:
        if not 0 <= last_layer < self.num_layers:
            raise ValueError(f"scoring layer must be in 0..{self.num_layers - 1}, got {last_layer}")
        # At inference the documents' hidden states are updated in place; captures need every layer's.
        in_place = torch.is_inference_mode_enabled() and capture is None
        docs = _pad_docs(prompts, self.device)
        state = self._embed(prompts, docs, block_tokens, routes, use_cache=in_place)
        masses: list[dict[int, torch.Tensor]] = [{} for _ in prompts]
        for index in range(last_layer + 1):
            layer = self.decoder.layers[index]
            deltas = [route.at(index) for route in routes]
            if state.shared:
                self._advance_shared(index, layer, state, routes, deltas)
            if capture is not None:
                capture.append((state.prefix, state.docs, state.final))
            scoring = [i for i, layers in enumerate(score_layers) if index in layers]
            if scoring:
                for i, mass in zip(scoring, self._score_layer(layer, state, docs, prompts, scoring, deltas),
                                   strict=True):
                    masses[i][index] = mass
            if index < last_layer:
                state = self._layer(index, layer, state, docs, deltas, in_place)
        return masses

    @torch.inference_mode()
    def trace(self, prompts: Sequence[Prompt], block_tokens: int, last_layer: int) -> LayerTrace:
        """The base chain's input to every layer 0..last_layer (and the last one's output), kept
        for comparing blocks on the same calibration inputs (reranker.equivalence)."""
        n = len(prompts)
        docs = _pad_docs(prompts, self.device)
        state = self._embed(prompts, docs, [block_tokens] * n, [BASE_ROUTE] * n, use_cache=False)
        states = [state]
        for index in range(last_layer + 1):
            state = self._layer(index, self.decoder.layers[index], state, docs, [None] * n, in_place=False)
            states.append(state)
        return LayerTrace(docs, states)

    @torch.inference_mode()
    def layer_update(self, trace: LayerTrace, index: int, deltas: LayerDeltas | None) -> torch.Tensor:
        """What layer `index` (with these deltas) adds to the residual stream of the traced inputs:
        (real tokens, hidden). With deltas=None it is the base block's update."""
        n = len(trace.docs.spans)
        before = trace.states[index]
        if deltas is None:
            after = trace.states[index + 1]
        else:
            after = self._layer(index, self.decoder.layers[index], before, trace.docs, [deltas] * n, in_place=False)
        return _real_tokens(after, trace.docs) - _real_tokens(before, trace.docs)

    def _embed(self, prompts: Sequence[Prompt], docs: DocBatch, block_tokens: Sequence[int],
               routes: Sequence[Route], use_cache: bool) -> _State:
        embed = self.decoder.embed_tokens
        device = self.device
        cache_on = self.prefix_cache is not None and use_cache
        prefix, final, rope_prefix, rope_final, offsets, shared = [], [], [], [], [], []
        for p, route, width in zip(prompts, routes, block_tokens, strict=True):
            n0 = len(p.prefix)
            offsets.append(n0)
            # The shared instruction tokens come from the cache; only the query part runs per prompt.
            s = p.shared_prefix if cache_on and route.chain_keys and 0 < p.shared_prefix < n0 else 0
            shared.append(_Shared(tuple(p.prefix[:s]), self._rope(torch.arange(s, device=device)[None]))
                          if s else None)
            prefix.append(embed(torch.tensor([p.prefix[s:]], device=device)))
            final.append(embed(torch.tensor([p.final], device=device)))
            rope_prefix.append(self._rope(torch.arange(s, n0, device=device)[None]))
            rope_final.append(self._rope(torch.arange(len(p.final), device=device)[None] + n0 + width))
        doc_offsets = torch.zeros(docs.ids.shape[0], 1, dtype=torch.long, device=device)
        for (start, end), n0 in zip(docs.spans, offsets, strict=True):
            doc_offsets[start:end] = n0
        positions = doc_offsets + torch.arange(docs.ids.shape[1], device=device)[None]
        return _State(prefix, embed(docs.ids), final, rope_prefix, self._rope(positions), rope_final,
                      shared=shared if any(shared) else [])

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dummy = self.decoder.embed_tokens.weight[:1]
        return self.decoder.rotary_emb(dummy, positions)

    def _advance_shared(self, index: int, layer, state: _State, routes: Sequence[Route],
                        deltas: Sequence[LayerDeltas | None]) -> None:
        """Make sure every prompt's shared-prefix K/V at this layer exist: from the cache, or computed
        once per distinct (chain up to here, tokens) from the previous layer's output."""
        assert self.prefix_cache is not None
        for i, shared in enumerate(state.shared):
            if shared is None:
                continue
            key = (routes[i].chain_keys[index], shared.tokens)
            entry = state.shared_local.get(key) or self.prefix_cache.get(key)
            if entry is None:
                hidden = self.decoder.embed_tokens(torch.tensor([shared.tokens], device=self.device)) \
                    if index == 0 else shared.hidden
                seg = [_Segment(0, 1, deltas[i])]
                q, k, v = self._qkv(layer, hidden, shared.rope, seg)
                out = self._attend(q[0], [], causal=(k[0], v[0]))
                entry = (k[0], v[0], self._finish(layer, hidden, out[None], seg))
                self.prefix_cache.put(key, entry)
            state.shared_local[key] = entry
            shared.k, shared.v, shared.hidden = entry

    def _qkv(self, layer, hidden: torch.Tensor, rope, segments: Sequence[_Segment] = ()
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, T, D) -> q (B, T, kv, group, hd), k/v (B, T, kv, hd), RoPE applied."""
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)
        b, t, _ = x.shape
        q = _project(attn.q_proj, "self_attn.q_proj", x, segments).view(b, t, self.n_heads, self.head_dim)
        k = _project(attn.k_proj, "self_attn.k_proj", x, segments).view(b, t, self.n_kv, self.head_dim)
        v = _project(attn.v_proj, "self_attn.v_proj", x, segments).view(b, t, self.n_kv, self.head_dim)
        q, k = _apply_rope(q, rope), _apply_rope(k, rope)
        return q.view(b, t, self.n_kv, self.group, self.head_dim), k, v

    def _finish(self, layer, hidden: torch.Tensor, attn_out: torch.Tensor,
                segments: Sequence[_Segment] = ()) -> torch.Tensor:
        """o_proj, residual, MLP, residual. attn_out: (B, T, kv, group, hd)."""
        b, t = attn_out.shape[:2]
        flat = attn_out.reshape(b, t, self.n_heads * self.head_dim)
        hidden = hidden + _project(layer.self_attn.o_proj, "self_attn.o_proj", flat, segments)
        return hidden + _mlp(layer.mlp, layer.post_attention_layernorm(hidden), segments)

    def _layer(self, index: int, layer, state: _State, docs: DocBatch,
               deltas: Sequence[LayerDeltas | None], in_place: bool) -> _State:
        n_docs, width = docs.ids.shape
        # In place, the documents' hidden states are overwritten chunk by chunk (chunks are independent)
        # and one K/V buffer serves every layer: no large allocation per layer. Autograd, captures and
        # traces need every layer's tensors kept, so they get fresh ones.
        shape = (n_docs, width, self.n_kv, self.head_dim)
        if in_place:
            if state.kv_buffer is None:
                state.kv_buffer = torch.empty((2, *shape), dtype=state.docs.dtype, device=state.docs.device)
            doc_keys, doc_values = state.kv_buffer
        else:
            doc_keys = torch.empty(shape, dtype=state.docs.dtype, device=state.docs.device)
            doc_values = torch.empty_like(doc_keys)
        new_docs = state.docs if in_place else torch.empty_like(state.docs)
        new_prefix, prefix_kv = [], []
        for i in range(len(docs.spans)):
            seg = [_Segment(0, 1, deltas[i])]
            qp, kp, vp = self._qkv(layer, state.prefix[i], state.rope_prefix[i], seg)
            kp, vp = kp[0], vp[0]
            shared = state.shared[i] if state.shared else None
            parts = [(shared.k, shared.v, None)] if shared is not None else []
            new_prefix.append(self._finish(layer, state.prefix[i], self._attend(qp[0], parts, causal=(kp, vp))[None],
                                           seg))
            if shared is not None:
                kp, vp = torch.cat([shared.k, kp]), torch.cat([shared.v, vp])
            prefix_kv.append((kp, vp))
        # Documents go through the layer a chunk at a time: every tensor stays cache-sized, so the cost
        # per document does not grow with the number of documents. A chunk may hold several prompts (and
        # chains): projections run once over the chunk, attention per prompt over its own prefix.
        rows = max(1, self.chunk_tokens // width)
        for lo in range(0, n_docs, rows):
            hi = min(n_docs, lo + rows)
            segments = _segments_in(docs.spans, lo, hi, deltas)
            rope = tuple(r[lo:hi] for r in state.rope_docs)
            q, doc_keys[lo:hi], doc_values[lo:hi] = self._qkv(layer, state.docs[lo:hi], rope, segments)
            k, v = doc_keys[lo:hi], doc_values[lo:hi]
            out = torch.empty_like(q)
            for s in segments:
                out[s.lo:s.hi] = self._attend_docs(q[s.lo:s.hi], k[s.lo:s.hi], v[s.lo:s.hi],
                                                   docs.valid[lo + s.lo:lo + s.hi], *prefix_kv[s.owner])
            new_docs[lo:hi] = self._finish(layer, state.docs[lo:hi], out, segments)
        new_final = []
        for i, (start, end) in enumerate(docs.spans):
            seg = [_Segment(0, 1, deltas[i])]
            qf, kf, vf = self._qkv(layer, state.final[i], state.rope_final[i], seg)
            keys = doc_keys[start:end].reshape(-1, self.n_kv, self.head_dim)
            values = doc_values[start:end].reshape(-1, self.n_kv, self.head_dim)
            pad = _key_bias(docs.valid[start:end].reshape(-1), qf.dtype)
            kp, vp = prefix_kv[i]
            final_out = self._attend(qf[0], [(kp, vp, None), (keys, values, pad)], causal=(kf[0], vf[0]))
            new_final.append(self._finish(layer, state.final[i], final_out[None], seg))
        return _State(new_prefix, new_docs, new_final, state.rope_prefix, state.rope_docs, state.rope_final,
                      state.kv_buffer, state.shared, state.shared_local)

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

    def _score_layer(self, layer, state: _State, docs: DocBatch, prompts: Sequence[Prompt],
                     which: Sequence[int], deltas: Sequence[LayerDeltas | None]) -> list[torch.Tensor]:
        """Attention mass of the signal tokens on each document: (signal, heads, n_docs) for each
        prompt in `which`. Only those documents' K and the signal tokens' Q are computed here."""
        attn = layer.self_attn
        out = []
        for i in which:
            start, end = docs.spans[i]
            seg = [_Segment(0, end - start, deltas[i])]
            x = layer.input_layernorm(state.docs[start:end])
            n, t, _ = x.shape
            k = _project(attn.k_proj, "self_attn.k_proj", x, seg).view(n, t, self.n_kv, self.head_dim)
            k = _apply_rope(k, tuple(r[start:end] for r in state.rope_docs))
            s = prompts[i].signal_tokens
            hf = layer.input_layernorm(state.final[i][:, -s:])
            q = _project(attn.q_proj, "self_attn.q_proj", hf, [_Segment(0, 1, deltas[i])])
            q = q.view(1, s, self.n_heads, self.head_dim)
            signal_rope = tuple(r[:, -s:] for r in state.rope_final[i])
            q = _apply_rope(q, signal_rope)[0].view(s, self.n_kv, self.group, self.head_dim)
            logits = torch.einsum("skgd,ntkd->skgnt", q, k).float() * self.scale
            logits = logits + _key_bias(docs.scored[start:end], torch.float32)
            probs = torch.softmax(logits.reshape(s, self.n_kv, self.group, n * t), dim=-1)
            out.append(probs.view(s, self.n_heads, n, t).sum(-1))
        return out


@dataclass
class LayerTrace:
    docs: DocBatch
    states: list[_State]  # states[l]: input of layer l; states[-1]: output of the last traced layer


@dataclass
class _Shared:
    """A prompt's shared instruction tokens and, at the current layer, their K/V and output."""

    tokens: tuple[int, ...]
    rope: tuple[torch.Tensor, torch.Tensor]
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    hidden: torch.Tensor | None = None


@dataclass
class _State:
    prefix: list[torch.Tensor]  # per prompt (1, L0 - shared, D)
    docs: torch.Tensor  # (D, T, hidden)
    final: list[torch.Tensor]  # per prompt (1, Lf, D)
    rope_prefix: list
    rope_docs: tuple[torch.Tensor, torch.Tensor]
    rope_final: list
    kv_buffer: torch.Tensor | None = None  # (2, docs, T, kv, hd), reused across layers at inference
    shared: list[_Shared | None] = field(default_factory=list)  # empty: no prompt uses the cache
    shared_local: dict = field(default_factory=dict)  # this forward's shared entries, safe from eviction


def _real_tokens(state: _State, docs: DocBatch) -> torch.Tensor:
    """Every real token's hidden state as one (tokens, hidden) matrix (padding dropped)."""
    parts = [p[0] for p in state.prefix] + [state.docs[docs.valid]] + [f[0] for f in state.final]
    return torch.cat(parts).float()


def _segments_in(spans: Sequence[tuple[int, int]], lo: int, hi: int,
                 deltas: Sequence[LayerDeltas | None]) -> list[_Segment]:
    """The prompts' row ranges inside rows [lo, hi), relative to lo."""
    out = []
    for owner, (start, end) in enumerate(spans):
        a, b = max(start, lo), min(end, hi)
        if a < b:
            out.append(_Segment(a - lo, b - lo, deltas[owner], owner))
    return out


def _project(module: torch.nn.Module, name: str, x: torch.Tensor, segments: Sequence[_Segment]) -> torch.Tensor:
    """The shared base projection over all rows, then each chain's low-rank delta on its own rows:
    one grouped matmul per distinct delta, whatever the number of prompts using it."""
    y = module(x)
    groups: dict[int, tuple[LoraDelta, list[_Segment]]] = {}
    for s in segments:
        delta = s.deltas.get(name) if s.deltas else None
        if delta is not None:
            groups.setdefault(id(delta), (delta, []))[1].append(s)
    for delta, segs in groups.values():
        if len(segs) == 1 or all(a.hi == b.lo for a, b in pairwise(segs)):
            lo, hi = segs[0].lo, segs[-1].hi
            y[lo:hi] += delta(x[lo:hi])
        else:
            rows = torch.cat([torch.arange(s.lo, s.hi, device=x.device) for s in segs])
            y.index_add_(0, rows, delta(x.index_select(0, rows)))
    return y


_MLP_MODULES = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _mlp(mlp: torch.nn.Module, x: torch.Tensor, segments: Sequence[_Segment]) -> torch.Tensor:
    if not any(s.deltas and any(m in s.deltas for m in _MLP_MODULES) for s in segments):
        return mlp(x)
    gate = _project(mlp.gate_proj, "mlp.gate_proj", x, segments)
    up = _project(mlp.up_proj, "mlp.up_proj", x, segments)
    return _project(mlp.down_proj, "mlp.down_proj", mlp.act_fn(gate) * up, segments)


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


