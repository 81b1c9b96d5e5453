"""The packed forward's element-wise work on its rows: RMSNorm, RoPE over q|k, and the gated MLP's SiLU(gate)·up,
eager or compiled into fused CPU kernels by torch.compile (inductor).

Why compile on a CPU: in eager mode each of these is several passes over the rows (an RMSNorm in bf16 is an
up-cast, a square, a mean, a reciprocal root, two products and a down-cast), which costs little beside fp32
matrix products but a third of a bf16 rerank on a CPU with AMX, whose matrix products are several times
faster. Compiled, each is one vectorised loop: on one 2,048-row chunk of SmolLM2's middle layer in bf16 (2 cores
with AMX), RMSNorm 1.22 → 0.39 ms, RoPE 0.90 → 0.61 ms, SiLU·up 1.40 → 1.20 ms (`python -m reranker.bench
compile` measures a layer's row-wise work with them eager and compiled).

What it costs: a C++ compiler at run time (inductor builds its kernels with it) and, at start-up, 3.5 s on 2 cores
(18 s when inductor's on-disk cache is cold), where `warm_up` compiles every op for the model's width and dtype
(shapes dynamic in the row count, so a batch of any size reuses them). Compiled ops run only under inference (the
packed path; no autograd); on a GPU the Triton kernels of reranker.kernels run instead.
"""

from __future__ import annotations

import functools
import itertools
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

import torch

from common.device import cpu_has_amx
from reranker import kernels
from reranker.model import HFModule

log = logging.getLogger(__name__)

Norm = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
Rope3 = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Gated = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class CompileSetting(StrEnum):
    """Whether the CPU row ops are compiled (the reranker's `--cpu-compile`)."""

    AUTO = "auto"  # bf16 on a CPU with AMX, when a C++ compiler is found; elsewhere eager
    ON = "on"  # on any CPU (a failed compile falls back to eager, with a warning)
    OFF = "off"


def rms_norm_fused(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """torch's RMSNorm kernel (one kernel on a GPU)."""
    return torch.nn.functional.rms_norm(x, (x.shape[-1],), weight, eps)


def rms_norm_float(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as the Llama family computes it (in float32, then the input's dtype, then the weight): the
    expression inductor fuses into one loop."""
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@dataclass(frozen=True)
class RowOps:
    """The element-wise ops the packed forward calls per row chunk."""

    rms_norm: Norm
    rope: Rope3
    silu_mul: Gated
    compiled: bool = False


# Eager: torch's RMSNorm kernel; RoPE and SiLU·up as Triton kernels on a GPU, torch expressions elsewhere.
EAGER = RowOps(rms_norm_fused, kernels.rope, kernels.silu_mul)


class ForwardGeometry(Protocol):
    """What row_ops_for reads of a forward (reranker.forward_context.ForwardContext extends it)."""

    model: HFModule
    decoder: HFModule
    n_heads: int
    n_kv: int
    head_dim: int


def compiler_available() -> bool:
    """Whether inductor can build CPU kernels here: it needs a C++ compiler on the PATH."""
    return any(shutil.which(name) for name in ("g++", "c++", "clang++"))


def wanted(setting: CompileSetting, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `setting` asks for compiled row ops for a model on `device` in `dtype` (GPUs run Triton kernels
    instead). Automatically only where it was measured to pay: bf16 with AMX (on AVX-512 CPUs without AMX the
    matrix products dominate, and a layer's row-wise work gained 1.06-1.1x)."""
    if device.type != "cpu" or setting is CompileSetting.OFF:
        return False
    if setting is CompileSetting.ON:
        return True
    return dtype == torch.bfloat16 and cpu_has_amx() and compiler_available()


@functools.cache
def compiled_row_ops() -> RowOps:
    """The three ops under torch.compile, dynamic in every dimension (one compile serves any row count); one set
    per process, shared by its forwards. Not `fullgraph`: inputs the warm-up did not foresee compile once more,
    and past dynamo's recompile limit run eager instead of failing the request."""
    return RowOps(torch.compile(rms_norm_float, dynamic=True), torch.compile(kernels.rope_torch, dynamic=True),
                  torch.compile(kernels.silu_mul_torch, dynamic=True), compiled=True)


def warm_up(ops: RowOps, norm_weight: torch.Tensor, eps: float, intermediate: int, heads: int,
            head_dim: int) -> None:
    """Compile every op now, not in a request, for what the forward passes them: the model's own norm weight (a
    Parameter: the compiled code is specific to its type, dtype and width) and epsilon, activations in its dtype
    and layout (SiLU·up reads the two halves of one gate|up product; RoPE gets distinct cos and sin tensors),
    row counts of 1 and of several, and inputs at the start of their storage and past it (a chunk of rows after
    the first): the compiler specialises sizes and storage offsets of 0 and 1, and guards on which inputs are
    the same tensor, so each of these compiles once."""
    width, dtype = norm_weight.shape[0], norm_weight.dtype

    def rows_of(rows: int, offset: int, *shape: int) -> torch.Tensor:
        return torch.randn(offset + rows, *shape, dtype=dtype)[offset:]

    with torch.inference_mode():
        for rows, offset in itertools.product((1, 7), (0, 7)):
            ops.rms_norm(rows_of(rows, offset, width), norm_weight, eps)
            ops.rope(rows_of(rows, 0, heads, head_dim), rows_of(rows, offset, 1, head_dim),
                     rows_of(rows, offset, 1, head_dim))
            gate_up = rows_of(rows, 0, 2 * intermediate)
            ops.silu_mul(gate_up[:, :intermediate], gate_up[:, intermediate:])


def row_ops_for(setting: CompileSetting, forward: ForwardGeometry) -> RowOps:
    """The row ops `forward` should run: compiled and warmed up where `setting` asks for them on its model's device
    and dtype and the compile succeeds, else eager."""
    weight = forward.decoder.embed_tokens.weight
    if not wanted(setting, weight.device, weight.dtype):
        return EAGER
    ops = compiled_row_ops()
    try:
        norm = forward.decoder.layers[0].input_layernorm
        warm_up(ops, norm.weight, norm.variance_epsilon, forward.model.config.intermediate_size,
                forward.n_heads + forward.n_kv, forward.head_dim)  # RoPE runs over q|k
    except Exception as error:  # noqa: BLE001  # a missing or broken compiler only costs speed
        log.warning("compiling the CPU row ops failed (%s); running them eager", str(error).splitlines()[0][:200])
        return EAGER
    log.info("CPU row ops compiled (RMSNorm, RoPE, SiLU·up; torch.compile)")
    return ops
