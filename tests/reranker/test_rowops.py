"""reranker.rowops: the packed forward's norms, RoPE and SiLU·up compiled into fused CPU kernels (torch.compile),
held to arithmetic bounds against float64, compiled once for any row count, chosen only where asked for and
where they pay, and eager again when the compile fails."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from common.device import Dtype
from reranker import rowops
from reranker.blockrank import ForwardPath
from reranker.engine import Reranker, RerankerConfig
from reranker.model import load_model
from reranker.packed import packed_rows
from reranker.rowops import EAGER, CompileSetting, RowOps, row_ops_for, warm_up
from reranker.tenants import DEFAULT_TENANT, EquivalenceMode
from tests.conftest import FIXTURE_DOCS
from tests.reranker.lora import save_all_linear_adapter
from tests.reranker.numerics import fp32_bound, longest_inner_product, relative_error, scores_bound

WIDTH, INTERMEDIATE, HEADS, HEAD_DIM = 64, 160, 6, 16
BF16_UNIT_ROUNDOFF = 2.0 ** -8  # 8 significant bits


@pytest.fixture(scope="module")
def compiled() -> RowOps:
    ops = rowops.compiled_row_ops()
    for dtype in (torch.float32, torch.bfloat16):
        warm_up(ops, torch.ones(WIDTH, dtype=dtype), 1e-5, INTERMEDIATE, HEADS, HEAD_DIM)
    return ops


def inputs(rows: int, dtype: torch.dtype) -> dict[str, tuple[Any, ...]]:
    """Each op's arguments: hidden states with a few large channels (as a model's are), q|k heads and RoPE's
    cos and sin (the sin's first half negated), the MLP's gate and up."""
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, WIDTH, generator=generator)
    x[:, :3] *= 50
    angles = torch.rand(rows, 1, HEAD_DIM, generator=generator) * 6.28
    sin = angles.sin()
    sin[..., :HEAD_DIM // 2] *= -1
    return {"rms_norm": (x.to(dtype), (torch.rand(WIDTH, generator=generator) + 0.5).to(dtype), 1e-5),
            "rope": (torch.randn(rows, HEADS, HEAD_DIM, generator=generator).to(dtype), angles.cos().to(dtype),
                     sin.to(dtype)),
            "silu_mul": (torch.randn(rows, INTERMEDIATE, generator=generator).to(dtype) * 4,
                         torch.randn(rows, INTERMEDIATE, generator=generator).to(dtype))}


def in_float64(name: str, args: tuple[Any, ...]) -> torch.Tensor:
    """The op's exact result (float64 arithmetic on the same inputs) through the eager torch expression."""
    wide: tuple[Any, ...] = tuple(a.double() if isinstance(a, torch.Tensor) else a for a in args)
    if name == "rms_norm":
        return rowops.rms_norm_float(*wide)
    return getattr(EAGER, name)(*wide)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 37, 2048])
def test_compiled_ops_are_within_rounding_of_exact_arithmetic(compiled: RowOps, rows: int,
                                                              dtype: torch.dtype) -> None:
    # fp32: one layer's bound of the fp32 error model (tests/reranker/numerics.py) for the longest sum here (the
    # norm's mean of WIDTH squares). bf16: the compiled loop computes in fp32 and rounds to bf16 at most twice
    # (RMSNorm's normalised value, then its product with the weight, as the Llama family does): (1 + u)^2 - 1.
    bound = fp32_bound(1, WIDTH) if dtype == torch.float32 else (1 + BF16_UNIT_ROUNDOFF) ** 2 - 1
    with torch.inference_mode():
        for name, args in inputs(rows, dtype).items():
            got = getattr(compiled, name)(*args)
            assert got.dtype == dtype and got.shape == args[0].shape
            assert relative_error(got, in_float64(name, args)) <= bound, name


def test_past_the_recompile_limit_the_ops_run_eager_and_stay_right(compiled: RowOps) -> None:
    # A dtype the warm-up never saw, with no recompile left: dynamo runs the op eager instead of failing the call.
    # (torch's own patch: monkeypatch's undo would delete the setting, which lives outside the module's __dict__.)
    with torch._dynamo.config.patch(recompile_limit=1), torch.inference_mode():
        for name, args in inputs(5, torch.float64).items():
            assert relative_error(getattr(compiled, name)(*args), in_float64(name, args)) <= fp32_bound(1, WIDTH)


def test_one_compile_serves_every_row_count(compiled: RowOps) -> None:
    counters = torch._dynamo.utils.counters["stats"]
    before = counters["unique_graphs"]
    with torch.inference_mode():
        for rows in (2, 5, 100, 513, 2048, 3001):
            for name, args in inputs(rows, torch.bfloat16).items():
                getattr(compiled, name)(*args)
    assert counters["unique_graphs"] == before, "a new row count compiled again"


@pytest.mark.parametrize(("setting", "device", "dtype", "amx", "compiler", "expected"), [
    (CompileSetting.AUTO, "cpu", torch.bfloat16, True, True, True),
    (CompileSetting.AUTO, "cpu", torch.bfloat16, False, True, False),  # AVX-512 without AMX: not worth it
    (CompileSetting.AUTO, "cpu", torch.bfloat16, True, False, False),  # no C++ compiler: eager
    (CompileSetting.AUTO, "cpu", torch.float32, True, True, False),  # fp32: the matrix products dominate
    (CompileSetting.ON, "cpu", torch.float32, False, False, True),
    (CompileSetting.OFF, "cpu", torch.bfloat16, True, True, False),
    (CompileSetting.ON, "cuda", torch.bfloat16, True, True, False),  # GPUs run the Triton kernels
])
def test_compiled_only_where_asked_for_and_where_it_pays(monkeypatch: pytest.MonkeyPatch, setting: CompileSetting,
                                                         device: str, dtype: torch.dtype, amx: bool, compiler: bool,
                                                         expected: bool) -> None:
    monkeypatch.setattr(rowops, "cpu_has_amx", lambda: amx)
    monkeypatch.setattr(rowops, "compiler_available", lambda: compiler)
    assert rowops.wanted(setting, torch.device(device), dtype) is expected


def test_a_failed_compile_runs_eager_with_a_warning(monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    def broken(*_: object) -> torch.Tensor:
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore detail")

    monkeypatch.setattr(rowops, "compiled_row_ops", lambda: RowOps(broken, broken, broken, compiled=True))
    norm = SimpleNamespace(weight=torch.ones(WIDTH), variance_epsilon=1e-5)
    # A stand-in with what row_ops_for reads of a forward.
    decoder = SimpleNamespace(embed_tokens=torch.nn.Embedding(8, WIDTH), layers=[SimpleNamespace(input_layernorm=norm)])
    config = SimpleNamespace(intermediate_size=INTERMEDIATE)
    forward: Any = SimpleNamespace(decoder=decoder, model=SimpleNamespace(config=config), n_heads=4, n_kv=2, head_dim=16)
    with caplog.at_level(logging.WARNING, logger="reranker.rowops"):
        assert row_ops_for(CompileSetting.ON, forward) is EAGER
    assert "No working C++ compiler found" in caplog.text and "more detail" not in caplog.text


def test_a_reranker_with_compiled_ops_gives_the_eager_scores(tmp_path: Path) -> None:
    """The engine's setting reaches its forward, and the whole packed forward in fp32 gives the eager scores, for
    a batch that mixes the default tenant with one whose adapter changes every linear (gate|up as one matmul
    with its deltas on their columns): compiled and eager row ops are two fp32 computations of the same scores."""
    lm = load_model(device="cpu", dtype=Dtype.FP32)
    save_all_linear_adapter(lm.model, tmp_path / "all-linear", lm.name, layer=5, block_tokens=40)
    rerankers = {setting: Reranker(RerankerConfig(device="cpu", dtype=Dtype.FP32, block_tokens=40, cpu_compile=setting,
                                                  equivalence=EquivalenceMode.OFF, adapters_root=str(tmp_path)),
                                   loaded=lm)
                 for setting in (CompileSetting.ON, CompileSetting.OFF)}
    assert rerankers[CompileSetting.ON].forward.ops.compiled and rerankers[CompileSetting.OFF].forward.ops is EAGER
    graphs_after_warm_up = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    scores = {}
    for setting, reranker in rerankers.items():
        reranker.forward.path = ForwardPath.PACKED
        reranker.tenants.load("wide", "all-linear")
        handles = [reranker.handle(), reranker.handle("wide")]
        prompts = [reranker.build_prompt(query, [(title, text) for _, title, text in FIXTURE_DOCS[:5]], handle)
                   for query in ("blood sugar and insulin", "roman emperors") for handle in handles]
        for chunk_rows in (2048, 31):  # the batch in one chunk of rows; in chunks, 1 row the last
            reranker.forward.packed_chunk_rows = chunk_rows
            scores[setting, chunk_rows] = reranker.score_prompts(prompts, handles * 2)
    assert packed_rows(prompts) % 31 == 1
    # The start-up warm-up compiled what the forward calls: no request compiles.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs_after_warm_up
    layer = max(rerankers[CompileSetting.ON].handle(t).settings.spec.layer for t in (DEFAULT_TENANT, "wide"))
    tolerance = scores_bound(layer, longest_inner_product(lm.model.config), fp32_sides=2)
    for chunk_rows in (2048, 31):
        for got, expected in zip(scores[CompileSetting.ON, chunk_rows], scores[CompileSetting.OFF, chunk_rows],
                                 strict=True):
            assert max(abs(a - b) for a, b in zip(got, expected, strict=True)) <= tolerance
