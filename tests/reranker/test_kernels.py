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


def dense_few(q: torch.Tensor, sources: list[kernels.KeySource], scale: float) -> torch.Tensor:
    """attend_few's arithmetic written out: every source's keys joined, a bias for what each query sees, one
    softmax; in float64."""
    t, heads, _ = q.shape
    keys, values, visible = [], [], []
    for k, v, seen, causal in sources:
        n = k.shape[0]
        mask = torch.ones(t, n, dtype=torch.bool, device=k.device) if seen is None else seen[None].expand(t, -1).clone()
        if causal:
            mask &= torch.arange(n, device=k.device)[None] <= n - t + torch.arange(t, device=k.device)[:, None]
        keys.append(k)
        values.append(v)
        visible.append(mask)
    group = heads // keys[0].shape[1]
    k64 = torch.cat(keys).double().repeat_interleave(group, dim=1)
    v64 = torch.cat(values).double().repeat_interleave(group, dim=1)
    scores = torch.einsum("thd,shd->hts", q.double(), k64) * scale
    scores = scores.masked_fill(~torch.cat(visible, dim=1)[None], float("-inf"))
    return torch.einsum("hts,shd->thd", torch.softmax(scores, dim=-1), v64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kv,group,hd", [(3, 3, 64), (2, 4, 128), (1, 1, 32)])  # SmolLM2; Qwen2-like; MHA
@pytest.mark.parametrize("t", [1, 7, 27])  # query rows: one, a few, SmolLM2's final segment on SciFact
def test_attend_few_equals_dense_attention(dtype: torch.dtype, kv: int, group: int, hd: int, t: int) -> None:
    # The final segment's shape: a shared prefix seen whole, then [documents with padding | the queries' own keys]
    # seen causally at the end, over more keys than one program's slice.
    generator = torch.Generator().manual_seed(kv * 100 + t)
    heads, n_prefix, n_docs = kv * group, 37, 1300

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(DEVICE, dtype)

    q = rand(t, heads, hd)
    wide = rand(n_docs + t, heads + kv, hd)  # keys as the packed forward has them: a column slice of q|k
    docs_k, docs_v = wide[:, heads:], rand(n_docs + t, kv, hd)
    seen = torch.rand(n_docs + t, generator=generator).to(DEVICE) > 0.2
    seen[n_docs:] = True
    sources = [(rand(n_prefix, kv, hd), rand(n_prefix, kv, hd), None, False), (docs_k, docs_v, seen, True)]
    got = kernels.attend_few(q, sources, hd ** -0.5)
    want = dense_few(q, sources, hd ** -0.5)
    assert got.shape == q.shape and got.dtype == dtype
    error = ((got.double() - want).abs().max() / want.abs().max()).item()
    assert error <= (1e-5 if dtype == torch.float32 else 2e-2), error
