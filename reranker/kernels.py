"""Fused element-wise kernels of the packed GPU forward (reranker.packed), in Triton where it is installed and
the tensors are on a GPU; the torch expressions they replace everywhere else (the same arithmetic, more passes).

Each decoder layer of a 100-document rerank runs its element-wise work over 16K rows, and on an H100 that work
is bound by memory traffic, not arithmetic: RoPE over q|k as torch ops is three passes (a multiply, the halves'
swap, an addcmul: ~90 us per layer), SiLU(gate) * up two (~85 us). One pass each reads every input once and
writes once. No library kernel fits the packed layout without copies (Liger's RoPE wants q and k as separate
contiguous (batch, heads, seq, hd) tensors; ours are one stacked (rows, heads, hd) matrix), so they are written
here: a dozen lines each, checked against the torch expressions (tests/reranker/test_kernels.py).

The third, `attend_few`, is the final segment's attention: a few dozen query rows over every key of a prompt
(16K at 100 documents). As torch ops it is some 17 small kernels per layer (scores per key part, the bias, a
softmax, products split by document so the GPU has parallelism over keys), over half of the forward's kernel
launches. Here it is flash-decoding: each program takes one key/value head and one slice of the keys (an online
softmax over its slice, keys read in place, padding skipped by a mask), and a second kernel merges the slices.
"""

from __future__ import annotations

import os

import torch

try:  # CUDA builds of torch ship Triton; the CPU build does not
    import triton  # type: ignore[import-not-found, unused-ignore]
    import triton.language as tl  # type: ignore[import-not-found, unused-ignore]
except ImportError:  # pragma: no cover - depends on the install
    triton = None

# RERANKER_TRITON=0 turns the kernels off (to compare, or to rule them out).
ENABLED = triton is not None and os.environ.get("RERANKER_TRITON", "1") != "0"
# Triton reads TRITON_INTERPRET when it compiles the kernels below: read once, here too.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def fused(x: torch.Tensor) -> bool:
    """Whether x's element-wise work runs as a Triton kernel: installed, enabled, on a GPU (or Triton's CPU
    interpreter, TRITON_INTERPRET=1, which the tests use where there is no GPU)."""
    return ENABLED and (x.is_cuda or INTERPRETED)


def rope(y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of y (rows, heads, hd): y * cos + swap_halves(y) * sin, cos and sin (rows, 1, hd) with
    the sin's first half negated (reranker.packed._rope_rows)."""
    if not fused(y):
        return rope_torch(y, cos, sin)
    rows, heads, hd = y.shape
    y, cos, sin = y.contiguous(), cos.contiguous(), sin.contiguous()
    out = torch.empty_like(y)
    _rope_kernel[(rows,)](y, cos, sin, out, heads * hd, hd, BLOCK=triton.next_power_of_2(heads * hd))
    return out


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up, the gated MLP's activation."""
    if not fused(gate):
        return silu_mul_torch(gate, up)
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    n = gate.numel()
    block = 2048
    _silu_mul_kernel[(triton.cdiv(n, block),)](gate, up, out, n, BLOCK=block)
    return out


# Keys per program of attend_few: 16K keys x 3 key heads make ~100 programs, most of an H100's 132 SMs.
FEW_SPLIT_KEYS = 512
FEW_BLOCK_KEYS = 64
FEW_COMBINE_ROWS = 16

# A key source of attend_few: keys and values (S, kv, hd) with the last dimension contiguous, which keys may be
# seen (S,) bool or None (all), and whether the last T keys are the queries' own (query t sees them up to t).
KeySource = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, bool]


# attend_few on or off alone (reranker.gpu.profiling measures the forward both ways).
FEW_ENABLED = True


def attends_few(x: torch.Tensor, head_dim: int) -> bool:
    """Whether attend_few runs for a model of this head size on x's device: fused kernels on, a power of two."""
    return FEW_ENABLED and fused(x) and head_dim >= 16 and head_dim & (head_dim - 1) == 0


def attend_few(q: torch.Tensor, sources: list[KeySource], scale: float) -> torch.Tensor:
    """Queries q (T, heads, hd) over the keys of all sources joined (one softmax), -> (T, heads, hd) in q's dtype.
    Query head h reads key head h // (heads // kv). Scores and the softmax in float32, the probabilities times
    values in q's dtype with float32 accumulation (as flash attention). Callers check attends_few."""
    t, heads, hd = q.shape
    kv = sources[0][0].shape[1]
    group = heads // kv
    block_m = max(16, triton.next_power_of_2(t * group))
    splits = [triton.cdiv(k.shape[0], FEW_SPLIT_KEYS) for k, _, _, _ in sources]
    total = sum(splits)
    maxima = torch.empty(total, kv, block_m, device=q.device, dtype=torch.float32)
    sums = torch.empty_like(maxima)
    accumulated = torch.empty(total, kv, block_m, hd, device=q.device, dtype=torch.float32)
    first = 0
    for (k, v, seen, causal), n in zip(sources, splits, strict=True):
        assert k.stride(-1) == 1 and v.stride(-1) == 1, "keys and values need a contiguous last dimension"
        n_keys = k.shape[0]
        _few_split_kernel[(kv, n)](
            q, k, v, k if seen is None else seen.view(torch.uint8), maxima, sums, accumulated,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            n_keys, t, n_keys - t if causal else n_keys, first, scale,
            GROUP=group, HD=hd, BLOCK_M=block_m, BLOCK_N=FEW_BLOCK_KEYS, SPLIT=FEW_SPLIT_KEYS,
            HAS_SEEN=seen is not None, IEEE=q.dtype == torch.float32 or INTERPRETED)
        first += n
    out = torch.empty((t, heads, hd), dtype=q.dtype, device=q.device)
    rows = min(block_m, FEW_COMBINE_ROWS)
    _few_combine_kernel[(kv, triton.cdiv(t * group, rows))](
        maxima, sums, accumulated, out, total, t, out.stride(0), out.stride(1),
        GROUP=group, HD=hd, BLOCK_M=block_m, ROWS=rows)
    return out


def rope_torch(y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = y.shape[-1] // 2
    return torch.addcmul(y * cos, torch.cat([y[..., half:], y[..., :half]], dim=-1), sin)


def silu_mul_torch(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(gate) * up


if triton is not None:

    @triton.jit
    def _rope_kernel(y, cos, sin, out, width, hd, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]  # noqa: N803
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        inside = offs < width
        d = offs % hd
        partner = offs - d + (d + hd // 2) % hd  # the same head's other half
        x = tl.load(y + row * width + offs, mask=inside).to(tl.float32)
        x_swapped = tl.load(y + row * width + partner, mask=inside).to(tl.float32)
        c = tl.load(cos + row * hd + d, mask=inside).to(tl.float32)
        s = tl.load(sin + row * hd + d, mask=inside).to(tl.float32)
        tl.store(out + row * width + offs, (x * c + x_swapped * s).to(out.dtype.element_ty), mask=inside)

    @triton.jit
    def _silu_mul_kernel(gate, up, out, n, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]  # noqa: N803
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = offs < n
        g = tl.load(gate + offs, mask=inside).to(tl.float32)
        u = tl.load(up + offs, mask=inside).to(tl.float32)
        tl.store(out + offs, (g * tl.sigmoid(g) * u).to(out.dtype.element_ty), mask=inside)

    @triton.jit
    def _few_split_kernel(q, k, v, seen, maxima, sums, accumulated,  # type: ignore[no-untyped-def]  # noqa: N803
                          sqt, sqh, skn, skh, svn, svh, n_keys, n_queries, causal_from, split0, scale,
                          GROUP: tl.constexpr, HD: tl.constexpr, BLOCK_M: tl.constexpr,  # noqa: N803
                          BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, HAS_SEEN: tl.constexpr,  # noqa: N803
                          IEEE: tl.constexpr):  # noqa: N803
        """One key head's query rows (row = t * GROUP + g) over one slice of the keys: an online softmax,
        written out unnormalised (running max, sum, weighted values) for _few_combine_kernel. Query t sees key j
        when j <= causal_from + t (and seen[j]). IEEE: float32 products, operands upcast (fp32 inputs; and Triton's
        CPU interpreter, whose bf16 dot is wrong)."""
        head_kv, split = tl.program_id(0), tl.program_id(1)
        rows = tl.arange(0, BLOCK_M)
        t = rows // GROUP
        head = head_kv * GROUP + rows % GROUP
        d = tl.arange(0, HD)
        queries = tl.load(q + t[:, None] * sqt + head[:, None] * sqh + d[None, :], mask=(t < n_queries)[:, None],
                          other=0.0)
        if IEEE:
            queries = queries.to(tl.float32)
        running_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        running_sum = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, HD), tl.float32)
        lo = split * SPLIT
        for start in range(0, SPLIT, BLOCK_N):
            keys = lo + start + tl.arange(0, BLOCK_N)
            inside = keys < n_keys
            key_block = tl.load(k + keys[:, None] * skn + head_kv * skh + d[None, :], mask=inside[:, None], other=0.0)
            if IEEE:
                scores = tl.dot(queries, tl.trans(key_block.to(tl.float32)), input_precision="ieee") * scale
            else:
                scores = tl.dot(queries, tl.trans(key_block)) * scale
            visible = inside[None, :] & (keys[None, :] <= causal_from + t[:, None])
            if HAS_SEEN:
                visible = visible & (tl.load(seen + keys, mask=inside, other=0) != 0)[None, :]
            scores = tl.where(visible, scores, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(scores, 1))
            safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)  # a row that has seen nothing yet
            probs = tl.exp(scores - safe_max[:, None])
            rescale = tl.exp(running_max - safe_max)
            running_sum = running_sum * rescale + tl.sum(probs, 1)
            value_block = tl.load(v + keys[:, None] * svn + head_kv * svh + d[None, :], mask=inside[:, None],
                                  other=0.0)
            if IEEE:
                acc = acc * rescale[:, None] + tl.dot(probs, value_block.to(tl.float32), input_precision="ieee")
            else:
                acc = acc * rescale[:, None] + tl.dot(probs.to(value_block.dtype), value_block)
            running_max = new_max
        at = (split0 + split) * tl.num_programs(0) + head_kv
        tl.store(maxima + at * BLOCK_M + rows, running_max)
        tl.store(sums + at * BLOCK_M + rows, running_sum)
        tl.store(accumulated + (at * BLOCK_M + rows[:, None]) * HD + d[None, :], acc)

    @triton.jit
    def _few_combine_kernel(maxima, sums, accumulated, out, n_splits, n_queries,  # type: ignore[no-untyped-def]  # noqa: N803
                            sot, soh, GROUP: tl.constexpr, HD: tl.constexpr,  # noqa: N803
                            BLOCK_M: tl.constexpr, ROWS: tl.constexpr):  # noqa: N803
        """The key slices' partial softmaxes of ROWS query rows merged: out = sum(w_s acc_s) / sum(w_s sum_s)."""
        head_kv, block = tl.program_id(0), tl.program_id(1)
        n_kv = tl.num_programs(0)
        rows = block * ROWS + tl.arange(0, ROWS)
        d = tl.arange(0, HD)
        total_max = tl.full((ROWS,), float("-inf"), tl.float32)
        total_sum = tl.zeros((ROWS,), tl.float32)
        acc = tl.zeros((ROWS, HD), tl.float32)
        for split in tl.range(0, n_splits):
            at = split * n_kv + head_kv
            part_max = tl.load(maxima + at * BLOCK_M + rows)
            new_max = tl.maximum(total_max, part_max)
            safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
            old_weight, weight = tl.exp(total_max - safe_max), tl.exp(part_max - safe_max)
            total_sum = total_sum * old_weight + tl.load(sums + at * BLOCK_M + rows) * weight
            acc = acc * old_weight[:, None] + tl.load(accumulated + (at * BLOCK_M + rows[:, None]) * HD + d[None, :]) \
                * weight[:, None]
            total_max = new_max
        t = rows // GROUP
        head = head_kv * GROUP + rows % GROUP
        result = acc / tl.where(total_sum > 0, total_sum, 1.0)[:, None]
        tl.store(out + t[:, None] * sot + head[:, None] * soh + d[None, :], result.to(out.dtype.element_ty),
                 mask=(t < n_queries)[:, None])
