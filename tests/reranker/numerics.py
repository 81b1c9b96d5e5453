"""Tolerances for comparing the reranker's fp32 forwards, from an fp32 rounding-error model rather than from
one machine: another instruction set (AVX2, AVX-512, AMX, ARM, CUDA) sums in another order and lands elsewhere
inside the same bound.

The model: an inner product of n terms computed in IEEE fp32 has a relative error of at most lambda * sqrt(n) * u
(u = 2^-24) with probability at least 1 - 2n exp(-lambda^2 / 2) (Higham & Mary, "A new approach to probabilistic
rounding error analysis", SIAM J. Sci. Comput. 2019). lambda = 6 makes that 1 - 5e-5 for the longest inner
product here (n = 1536, SmolLM2-135M's MLP). A decoder layer is a chain of such products (norms, projections,
attention, MLP) whose errors carry into the residual stream, so `depth` layers are allowed `depth` times one
layer's error (no cancellation assumed). Errors are measured relative to the largest reference value: hidden
states reach ~700 in a few channels, and an element-wise relative bound would measure only the rounding of
values near zero. Measured against a float64 reference on AVX2 and on ATEN_CPU_CAPABILITY=default, the worst is
2.7e-6 at depth 3, against a bound of 4.2e-5 there.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers import AutoConfig

from reranker.model import converted_directory, default_model_file, model_cache

FP32_UNIT_ROUNDOFF = 2.0 ** -24
LAMBDA = 6.0

# bf16 is not bounded by that model (8 bits of mantissa compound over the layers), but by comparison: the design
# note's bf16 target (../shared/docs/blockrank.md §3: scores within 2% of fp32's, relative to the prompt's largest)
# is not what bf16 is held to, since this 135M model's own dense bf16 forward is 1.3-3.3% from fp32 on the test
# prompts (measured on CPU), so bf16 misses it whatever the fast path does. A bf16 forward may be DENSE_BF16_FACTOR
# times the dense bf16 forward's error from fp32 (a mean over prompts), with the same top-1.
BF16_SCORE_REL_TOL = 2e-2
DENSE_BF16_FACTOR = 1.5
# Top-1 is compared only where fp32's best document leads its runner-up by this much of its score: closer
# documents lie within bf16 rounding of each other (0.1105 and 0.1104 on one volcano prompt).
TOP1_MARGIN = 2 * BF16_SCORE_REL_TOL


def longest_inner_product(config: Any) -> int:
    """The most terms any one product of a decoder layer sums: the MLP's down projection, usually."""
    return max(int(config.hidden_size), int(config.intermediate_size))


def bundled_model_config() -> Any:
    """The bundled model's config without its weights: from the converted directory a reranker process has already
    written (reranker.model.converted_gguf; config.json only), else from the GGUF's metadata (a few seconds)."""
    gguf = default_model_file()
    converted = converted_directory(gguf, cache) if (cache := model_cache()) else None
    if converted is not None and (converted / "config.json").exists():
        return AutoConfig.from_pretrained(converted)
    return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)


def fp32_bound(depth: int, inner: int) -> float:
    """Relative error (of the largest value) of an fp32 computation `depth` layers deep against exact arithmetic."""
    return LAMBDA * max(depth, 1) * math.sqrt(inner) * FP32_UNIT_ROUNDOFF


def scores_bound(scoring_layer: int, inner: int, fp32_sides: int = 1) -> float:
    """Attention-mass scores at layer l* (fractions of one) come from l* layers and one more set of projections:
    their absolute error is at most the relative error of depth l* + 1, once per fp32 side compared (one against
    a float64 reference, two when two fp32 forwards are compared with each other)."""
    return fp32_sides * fp32_bound(scoring_layer + 1, inner)


def relative_error(a: torch.Tensor, reference: torch.Tensor) -> float:
    """max |a - reference| over max |reference|, in float64."""
    a, reference = a.double(), reference.double()
    return float((a - reference).abs().max() / reference.abs().max())


def same_order_where_separated(scores: torch.Tensor, reference: torch.Tensor, tolerance: float) -> bool:
    """Every pair of documents whose reference scores differ by more than twice the tolerance keeps its order:
    two documents closer than that may swap on another machine without anything being wrong."""
    s, r = scores.double().cpu(), reference.double().cpu()
    separated = (r[:, None] - r[None, :]).abs() > 2 * tolerance
    agree = torch.sign(s[:, None] - s[None, :]) == torch.sign(r[:, None] - r[None, :])
    return bool(agree[separated].all())
