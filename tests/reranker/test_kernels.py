"""The packed forward's fused Triton kernels (reranker.kernels) against the torch expressions they replace. On a
GPU (the GPU job runs this module with --device cuda); where Triton is installed without a GPU, through its
CPU interpreter (TRITON_INTERPRET=1 before Python starts); skipped where Triton is missing (the CPU build of
torch, CI).

    TRITON_INTERPRET=1 python -m pytest tests/reranker/test_kernels.py -q
"""

from __future__ import annotations

import pytest
import torch

from reranker import kernels

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(not kernels.fused(torch.empty(0, device=DEVICE)),
                                reason="needs Triton and a GPU (or TRITON_INTERPRET=1)")
# One rounding of the float32 result against the torch expressions' two or three (bf16: 2^-8 relative).
TOLERANCE = {torch.float32: 1e-6, torch.bfloat16: 1e-2}


def close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return bool(((got.float() - want.float()).abs().max() / want.float().abs().max()) <= TOLERANCE[want.dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,hd", [(15, 64), (3, 32), (5, 128)])  # SmolLM2's q|k; odd widths; Qwen2's head
def test_rope_equals_the_torch_expression(dtype: torch.dtype, heads: int, hd: int) -> None:
    generator = torch.Generator().manual_seed(heads)
    rows = 37
    y = torch.randn(rows, heads, hd, generator=generator).to(DEVICE, dtype)
    angles = torch.rand(rows, 1, hd // 2, generator=generator).repeat(1, 1, 2) * 100
    cos, sin = angles.cos(), angles.sin()
    sin = torch.cat([-sin[..., :hd // 2], sin[..., hd // 2:]], dim=-1)
    cos, sin = cos.to(DEVICE, dtype), sin.to(DEVICE, dtype)
    got = kernels.rope(y, cos, sin)
    assert got.shape == y.shape and got.dtype == dtype
    assert close(got, kernels.rope_torch(y, cos, sin))
    assert close(got[:5, :2], kernels.rope_torch(y[:5, :2].contiguous(), cos[:5], sin[:5]))  # heads independent


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37, 1536), (3, 5), (1, 4097)])  # not multiples of the kernel's block
def test_silu_mul_equals_the_torch_expression(dtype: torch.dtype, shape: tuple[int, int]) -> None:
    generator = torch.Generator().manual_seed(shape[1])
    gate, up = (torch.randn(*shape, generator=generator).mul(4).to(DEVICE, dtype) for _ in range(2))
    got = kernels.silu_mul(gate, up)
    assert got.shape == gate.shape and got.dtype == dtype
    assert close(got, kernels.silu_mul_torch(gate, up))


def test_strided_inputs_are_read_as_their_values() -> None:
    # The packed forward passes contiguous tensors; a strided one (a column slice) must still give its values.
    wide = torch.randn(11, 3072, device=DEVICE)
    gate, up = wide[:, :1536], wide[:, 1536:]
    assert close(kernels.silu_mul(gate, up), kernels.silu_mul_torch(gate, up))
