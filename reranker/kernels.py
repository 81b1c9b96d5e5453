"""Fused element-wise kernels of the packed GPU forward (reranker.packed), in Triton where it is installed and
the tensors are on a GPU; the torch expressions they replace everywhere else (the same arithmetic, more passes).

Each decoder layer of a 100-document rerank runs its element-wise work over 16K rows, and on an H100 that work
is bound by memory traffic, not arithmetic: RoPE over q|k as torch ops is three passes (a multiply, the halves'
swap, an addcmul: ~90 us per layer), SiLU(gate) * up two (~85 us). One pass each reads every input once and
writes once. No library kernel fits the packed layout without copies (Liger's RoPE wants q and k as separate
contiguous (batch, heads, seq, hd) tensors; ours are one stacked (rows, heads, hd) matrix), so they are written
here: a dozen lines each, checked against the torch expressions (tests/reranker/test_kernels.py).
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
