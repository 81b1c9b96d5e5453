"""BlockRank's structured sparse attention, computed without the dense mask.

Who sees what (Gupta et al., 2025):
    prefix tokens   -> prefix (causal)
    document i      -> whole prefix + document i (causal)
    final segment   -> everything before it + itself (causal)
Position ids: prefix 0..L0-1; every document restarts at L0; the final segment starts at L0 + block_tokens.
Documents therefore never see each other, so all documents of all requests run as one batch of shape (docs, T)
through the projections and MLPs; attention is computed per part and joined in one softmax: the prefix K/V are
read in place (no copy per document), scores over [prefix | own block] are concatenated and normalised together.

Relevance: at the scoring layer l*, the last `signal_tokens` tokens of the final segment attend over all document
tokens (softmax over document tokens only); a document's score is the attention mass on its tokens, averaged over
the chosen heads and signal tokens. The forward stops there: layers after l* never run, and at l* only the
documents' K and the signal tokens' Q are computed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from reranker.attention import (
    KeyPart,
    Rope,
    apply_rope,
    attend,
    attend_docs,
    attend_docs_fused,
    attention_mass,
    key_bias,
)
from reranker.docbatch import DocBatch, pad_docs, segments_in
from reranker.forward_context import PackedWeights, SharedEntries, SharedPrefix
from reranker.graphs import PackedGraphs
from reranker.model import HFModule
from reranker.packed import ForwardPath, cpu_packed_groups, cpu_packed_limit, fits_cpu_packed
from reranker.prompt import DEFAULT_BLOCK_TOKENS, Prompt
from reranker.routing import BASE_ROUTE, LayerDeltas, Route, Segment, SharedPrefixCache, mlp, project
from reranker.rowops import EAGER, RowOps

# One layer's input hidden states as captured for tests and training: per-prompt prefixes, the (docs, T, D)
# document batch, per-prompt final segments.
Captured = tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor]]


@dataclass(frozen=True)
class ScoringSpec:
    layer: int  # l*, 0-indexed decoder layer whose attention scores documents
    heads: tuple[int, ...] = ()  # empty = all heads
    block_tokens: int = DEFAULT_BLOCK_TOKENS  # position offset of the final segment is L0 + block_tokens


class BlockRankForward:
    """Runs a Hugging Face Llama-family model's layers on BlockRank's sparse layout.

    Several model chains can share one forward: each prompt has a Route (its per-layer LoRA
    deltas). The base projections run once over every row of the batch; each chain's delta is
    added to its own rows only (grouped low-rank matmuls), so tenants are never run one at a time.
    """

    def __init__(self, model: HFModule, prefix_cache: SharedPrefixCache | None = None,
                 path: ForwardPath | str = ForwardPath.AUTO, cuda_graphs: int = 32, row_ops: RowOps = EAGER,
                 merged_weights_bytes: int = 0) -> None:
        self.model = model
        self.decoder: HFModule = model.model
        cfg = model.config
        self.n_heads: int = cfg.num_attention_heads
        self.n_kv: int = cfg.num_key_value_heads
        self.group = self.n_heads // self.n_kv
        self.head_dim: int = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.scale: float = self.head_dim ** -0.5
        self.num_layers: int = cfg.num_hidden_layers
        # Inference on packed rows (reranker.packed: fused norms and projections, SDPA kernels) or in chunks of
        # documents (below); both equal the dense reference. See ForwardPath for which runs when.
        self.path = ForwardPath(path)
        on_gpu = self.device.type == "cuda"
        self.attend_docs = attend_docs_fused if on_gpu else attend_docs
        # Document tokens per chunk inside a layer (chunked path). CPU: temporaries stay cache-sized (~10 MB).
        # GPU: launches, not memory, bound the time, so whole shortlists run as one chunk.
        self.chunk_tokens = 1 << 16 if on_gpu else 2048
        # The packed path's row-wise work (norms, projections, MLP) in chunks of rows, for the same reason.
        self.packed_chunk_rows = 0 if on_gpu else 2048
        self.ops = row_ops  # the packed path's norms, RoPE, SiLU·up: eager, or compiled on a CPU (reranker.rowops)
        # On a CPU the packed rows hold only the documents' real tokens (reranker.packed; CACM's are half padding).
        # A GPU keeps them padded: its CUDA graphs are keyed by the batch's shape, which ragged rows would multiply.
        self.ragged_docs = not on_gpu
        self.cpu_packed_bytes = cpu_packed_limit(self.element_size)  # CPU: rows x bytes the automatic path packs
        self.prefix_cache = prefix_cache
        self.graphs = PackedGraphs(cuda_graphs)  # CUDA graphs per batch shape seen twice (reranker.graphs); 0: off
        # Merged weights on a CPU only: a GPU's CUDA graphs hold the weights they read, and launches bound its time.
        self.weights = PackedWeights(self.decoder.layers, 0 if on_gpu else merged_weights_bytes)

    @property
    def device(self) -> torch.device:
        device: torch.device = self.decoder.embed_tokens.weight.device
        return device

    def runs_packed(self, prompts: Sequence[Prompt]) -> bool:
        """Whether an inference batch of these prompts takes the packed path (ForwardPath)."""
        if self.path is not ForwardPath.AUTO:
            return self.path is ForwardPath.PACKED
        return self.device.type == "cuda" or fits_cpu_packed(prompts, self.element_size, self.cpu_packed_bytes)

    @property
    def element_size(self) -> int:
        return int(self.decoder.embed_tokens.weight.element_size())

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
                    block_tokens: int, capture: list[Captured] | None = None,
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
             capture: list[Captured] | None = None) -> list[dict[int, torch.Tensor]]:
        if not 0 <= last_layer < self.num_layers:
            raise ValueError(f"scoring layer must be in 0..{self.num_layers - 1}, got {last_layer}")
        # At inference the documents' hidden states are updated in place; captures need every layer's.
        in_place = torch.is_inference_mode_enabled() and capture is None
        if in_place and self.runs_packed(prompts):
            return self.graphs.run(self, prompts, routes, block_tokens, score_layers, last_layer)
        if in_place and self.path is ForwardPath.AUTO and len(prompts) > 1:  # a CPU batch past the packed limit
            return [mass for g in cpu_packed_groups(prompts, self.element_size, self.cpu_packed_bytes)
                    for mass in self._run(prompts[g], routes[g], block_tokens[g], score_layers[g], last_layer)]
        docs = pad_docs(prompts, self.device)
        state = self._embed(prompts, docs, block_tokens, routes, use_cache=in_place)
        masses: list[dict[int, torch.Tensor]] = [{} for _ in prompts]
        for index in range(last_layer + 1):
            layer = self.decoder.layers[index]
            deltas = [route.at(index) for route in routes]
            if state.shared:
                self.advance_shared(index, layer, state.shared, state.shared_local, routes, deltas)
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
        docs = pad_docs(prompts, self.device)
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
        prefix: list[torch.Tensor] = []
        final: list[torch.Tensor] = []
        rope_prefix: list[Rope] = []
        rope_final: list[Rope] = []
        offsets: list[int] = []
        shared: list[SharedPrefix | None] = []
        for p, route, width in zip(prompts, routes, block_tokens, strict=True):
            n0 = len(p.prefix)
            offsets.append(n0)
            # The shared instruction tokens come from the cache; only the query part runs per prompt.
            cached = self.shared_for(p, route, use_cache)
            s = len(cached.tokens) if cached is not None else 0
            shared.append(cached)
            prefix.append(embed(torch.tensor([p.prefix[s:]], device=device)))
            final.append(embed(torch.tensor([p.final], device=device)))
            rope_prefix.append(self.rope(torch.arange(s, n0, device=device)[None]))
            rope_final.append(self.rope(torch.arange(len(p.final), device=device)[None] + n0 + width))
        doc_offsets = torch.zeros(docs.ids.shape[0], 1, dtype=torch.long, device=device)
        for (start, end), n0 in zip(docs.spans, offsets, strict=True):
            doc_offsets[start:end] = n0
        positions = doc_offsets + torch.arange(docs.ids.shape[1], device=device)[None]
        return _State(prefix, embed(docs.ids), final, rope_prefix, self.rope(positions), rope_final,
                      shared=shared if any(shared) else [])

    def shared_for(self, prompt: Prompt, route: Route, use_cache: bool) -> SharedPrefix | None:
        """The prompt's shared instruction tokens when they come from the cache: caching on, a chain that has
        an identity, and a query part after them."""
        s = prompt.shared_prefix
        if self.prefix_cache is None or not use_cache or not route.chain_keys or not 0 < s < len(prompt.prefix):
            return None
        return SharedPrefix(tuple(prompt.prefix[:s]), self.rope(torch.arange(s, device=self.device)[None]))

    def rope(self, positions: torch.Tensor) -> Rope:
        dummy = self.decoder.embed_tokens.weight[:1]
        cos, sin = self.decoder.rotary_emb(dummy, positions)
        return cos, sin

    def advance_shared(self, index: int, layer: HFModule, shared: Sequence[SharedPrefix | None],
                       local: SharedEntries, routes: Sequence[Route],
                       deltas: Sequence[LayerDeltas | None]) -> None:
        """Make sure every prompt's shared-prefix K/V at this layer exist: from the cache, or computed
        once per distinct (chain up to here, tokens) from the previous layer's output."""
        assert self.prefix_cache is not None
        for i, cached in enumerate(shared):
            if cached is None:
                continue
            key = (routes[i].chain_keys[index], cached.tokens)
            entry = local.get(key) or self.prefix_cache.get(key)
            if entry is None:
                hidden = self.decoder.embed_tokens(torch.tensor([cached.tokens], device=self.device)) \
                    if index == 0 else cached.hidden
                assert hidden is not None
                out, k, v = self._sequence(layer, hidden, cached.rope, deltas[i])
                entry = (k, v, out)
                self.prefix_cache.put(key, entry)
            local[key] = entry
            cached.k, cached.v, cached.hidden = entry

    def _sequence(self, layer: HFModule, hidden: torch.Tensor, rope: Rope, deltas: LayerDeltas | None,
                  parts: Sequence[KeyPart] = ()) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One sequence (1, T, D) of one chain through the layer, attending to `parts` fully and to
        itself causally: (output (1, T, D), its K, its V (T, kv, hd))."""
        seg = [Segment(0, 1, deltas)]
        q, k, v = self._qkv(layer, hidden, rope, seg)
        out = attend(q[0], list(parts), (k[0], v[0]), self.scale)
        return self._finish(layer, hidden, out[None], seg), k[0], v[0]

    def _qkv(self, layer: HFModule, hidden: torch.Tensor, rope: Rope, segments: Sequence[Segment] = ()
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, T, D) -> q (B, T, kv, group, hd), k/v (B, T, kv, hd), RoPE applied."""
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)
        b, t, _ = x.shape
        q = project(attn.q_proj, "self_attn.q_proj", x, segments).view(b, t, self.n_heads, self.head_dim)
        k = project(attn.k_proj, "self_attn.k_proj", x, segments).view(b, t, self.n_kv, self.head_dim)
        v = project(attn.v_proj, "self_attn.v_proj", x, segments).view(b, t, self.n_kv, self.head_dim)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        return q.view(b, t, self.n_kv, self.group, self.head_dim), k, v

    def _finish(self, layer: HFModule, hidden: torch.Tensor, attn_out: torch.Tensor,
                segments: Sequence[Segment] = ()) -> torch.Tensor:
        """o_proj, residual, MLP, residual. attn_out: (B, T, kv, group, hd)."""
        b, t = attn_out.shape[:2]
        flat = attn_out.reshape(b, t, self.n_heads * self.head_dim)
        hidden = hidden + project(layer.self_attn.o_proj, "self_attn.o_proj", flat, segments)
        out: torch.Tensor = hidden + mlp(layer.mlp, layer.post_attention_layernorm(hidden), segments)
        return out

    def _layer(self, index: int, layer: HFModule, state: _State, docs: DocBatch,
               deltas: Sequence[LayerDeltas | None], in_place: bool) -> _State:
        """One decoder layer over every part: prefixes, documents (chunked), final segments."""
        doc_keys, doc_values = self._kv_buffers(state, docs, in_place)
        new_docs = state.docs if in_place else torch.empty_like(state.docs)
        new_prefix, prefix_kv = [], []
        for i in range(len(docs.spans)):
            shared = state.shared[i] if state.shared else None
            parts: list[KeyPart] = [(shared.k, shared.v, None)] if shared is not None and shared.k is not None \
                and shared.v is not None else []
            out, kp, vp = self._sequence(layer, state.prefix[i], state.rope_prefix[i], deltas[i], parts)
            new_prefix.append(out)
            if parts:
                kp, vp = torch.cat([parts[0][0], kp]), torch.cat([parts[0][1], vp])
            prefix_kv.append((kp, vp))
        self._docs_layer(layer, state, docs, deltas, prefix_kv, (doc_keys, doc_values), new_docs)
        new_final = []
        for i, (start, end) in enumerate(docs.spans):
            keys = doc_keys[start:end].reshape(-1, self.n_kv, self.head_dim)
            values = doc_values[start:end].reshape(-1, self.n_kv, self.head_dim)
            pad = key_bias(docs.valid[start:end].reshape(-1), keys.dtype)
            kp, vp = prefix_kv[i]
            final_parts: list[KeyPart] = [(kp, vp, None), (keys, values, pad)]
            new_final.append(self._sequence(layer, state.final[i], state.rope_final[i], deltas[i], final_parts)[0])
        return _State(new_prefix, new_docs, new_final, state.rope_prefix, state.rope_docs, state.rope_final,
                      state.kv_buffer, state.shared, state.shared_local)

    def _kv_buffers(self, state: _State, docs: DocBatch, in_place: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Where the documents' K/V of this layer go. In place (inference), one buffer serves every layer: no
        large allocation per layer. Autograd, captures and traces keep every layer's tensors: fresh ones."""
        n_docs, width = docs.ids.shape
        shape = (n_docs, width, self.n_kv, self.head_dim)
        if in_place:
            if state.kv_buffer is None:
                state.kv_buffer = torch.empty((2, *shape), dtype=state.docs.dtype, device=state.docs.device)
            return state.kv_buffer[0], state.kv_buffer[1]
        keys = torch.empty(shape, dtype=state.docs.dtype, device=state.docs.device)
        return keys, torch.empty_like(keys)

    def _docs_layer(self, layer: HFModule, state: _State, docs: DocBatch, deltas: Sequence[LayerDeltas | None],
                    prefix_kv: Sequence[tuple[torch.Tensor, torch.Tensor]],
                    doc_kv: tuple[torch.Tensor, torch.Tensor], new_docs: torch.Tensor) -> None:
        """Documents go through the layer a chunk at a time: every tensor stays cache-sized, so the cost per
        document does not grow with the number of documents. A chunk may hold several prompts (and chains):
        projections run once over the chunk, attention per prompt over its own prefix. In place, a chunk's
        hidden states are overwritten (chunks are independent); the K/V land in `doc_kv`."""
        doc_keys, doc_values = doc_kv
        n_docs, width = docs.ids.shape
        rows = max(1, self.chunk_tokens // width)
        for lo in range(0, n_docs, rows):
            hi = min(n_docs, lo + rows)
            segments = segments_in(docs.spans, lo, hi, deltas)
            rope = (state.rope_docs[0][lo:hi], state.rope_docs[1][lo:hi])
            q, doc_keys[lo:hi], doc_values[lo:hi] = self._qkv(layer, state.docs[lo:hi], rope, segments)
            k, v = doc_keys[lo:hi], doc_values[lo:hi]
            out = torch.empty_like(q)
            for s in segments:
                out[s.lo:s.hi] = self.attend_docs(q[s.lo:s.hi], k[s.lo:s.hi], v[s.lo:s.hi],
                                             docs.valid[lo + s.lo:lo + s.hi], *prefix_kv[s.owner], self.scale)
            new_docs[lo:hi] = self._finish(layer, state.docs[lo:hi], out, segments)

    def _score_layer(self, layer: HFModule, state: _State, docs: DocBatch, prompts: Sequence[Prompt],
                     which: Sequence[int], deltas: Sequence[LayerDeltas | None]) -> list[torch.Tensor]:
        """Attention mass of the signal tokens on each document: (signal, heads, n_docs) for each
        prompt in `which`. Only those documents' K and the signal tokens' Q are computed here."""
        attn = layer.self_attn
        out = []
        for i in which:
            start, end = docs.spans[i]
            seg = [Segment(0, end - start, deltas[i])]
            x = layer.input_layernorm(state.docs[start:end])
            n, t, _ = x.shape
            k = project(attn.k_proj, "self_attn.k_proj", x, seg).view(n, t, self.n_kv, self.head_dim)
            k = apply_rope(k, (state.rope_docs[0][start:end], state.rope_docs[1][start:end]))
            s = prompts[i].signal_tokens
            hf = layer.input_layernorm(state.final[i][:, -s:])
            q = project(attn.q_proj, "self_attn.q_proj", hf, [Segment(0, 1, deltas[i])])
            q = q.view(1, s, self.n_heads, self.head_dim)
            signal_rope = (state.rope_final[i][0][:, -s:], state.rope_final[i][1][:, -s:])
            q = apply_rope(q, signal_rope)[0].view(s, self.n_kv, self.group, self.head_dim)
            out.append(attention_mass(q, k, docs.scored[start:end], self.scale))
        return out


@dataclass
class LayerTrace:
    docs: DocBatch
    states: list[_State]  # states[l]: input of layer l; states[-1]: output of the last traced layer


@dataclass
class _State:
    prefix: list[torch.Tensor]  # per prompt (1, L0 - shared, D)
    docs: torch.Tensor  # (D, T, hidden)
    final: list[torch.Tensor]  # per prompt (1, Lf, D)
    rope_prefix: list[Rope]
    rope_docs: Rope
    rope_final: list[Rope]
    kv_buffer: torch.Tensor | None = None  # (2, docs, T, kv, hd), reused across layers at inference
    shared: list[SharedPrefix | None] = field(default_factory=list)  # empty: no prompt uses the cache
    # this forward's shared entries, safe from eviction
    shared_local: SharedEntries = field(default_factory=dict)


def _real_tokens(state: _State, docs: DocBatch) -> torch.Tensor:
    """Every real token's hidden state as one (tokens, hidden) matrix (padding dropped)."""
    parts = [p[0] for p in state.prefix] + [state.docs[docs.valid]] + [f[0] for f in state.final]
    return torch.cat(parts).float()
