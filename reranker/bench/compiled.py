"""One reranker layer's row-wise work eager and under torch.compile (inductor) on a CPU: is compiling worth it?

The packed forward's work per layer outside attention is one chunk of rows at a time (2,048 on a CPU): RMSNorm,
q|k with RoPE and v (`reranker.packed._qkv_rows`), then o_proj with the residual, RMSNorm, the gated MLP and the
residual (`_finish_rows`). This runs exactly those functions, on layer `--layer` of the model in `--dtype`, on
its real inputs (one forward over SciFact text: the hidden state entering the layer and o_proj's input), four
ways side by side in one process: eager; with the row ops compiled as a reranker with `--cpu-compile on` serves
them (reranker.rowops: RMSNorm, RoPE, SiLU·up); all of it under `torch.compile` (inductor's fused C++
element-wise kernels); and that with inductor's freezing (weights as constants, prepacked for oneDNN,
element-wise work fused into the matmuls). Reports milliseconds per chunk, the compile time, and each output's relative error against
eager.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.device import Dtype, describe_device
from common.paths import SCIFACT
from common.plots import figure
from reranker import packed
from reranker.bench.int8 import milliseconds, relative_error, sample_ids
from reranker.blockrank import BlockRankForward
from reranker.model import load_model
from reranker.rowops import CompileSetting, row_ops_for

VARIANTS = ("eager", "row ops compiled (served)", "compiled", "compiled + freezing")
Block = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="")
    p.add_argument("--data", type=Path, default=SCIFACT)
    p.add_argument("--dtype", default="auto", help="auto, fp32 or bf16")
    p.add_argument("--rows", type=int, default=2048, help="rows per chunk (the CPU's packed chunk: 2,048)")
    p.add_argument("--layer", type=int, default=-1, help="-1: the middle layer")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3, help="the variants timed in turn, this many times")
    p.add_argument("--out", type=Path, default=Path("bench-results/cpu/reranker_compile.json"))


def layer_inputs(forward: BlockRankForward, ids: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The hidden state entering layer `index` and its o_proj's input, from one forward of the model."""
    layer = forward.decoder.layers[index]
    seen: dict[str, torch.Tensor] = {}

    def keep_hidden(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen["hidden"] = (args[0] if args else kwargs["hidden_states"])[0].detach().clone()

    def keep_attended(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        seen["attended"] = args[0][0].detach().clone()

    hooks = [layer.register_forward_pre_hook(keep_hidden, with_kwargs=True),
             layer.self_attn.o_proj.register_forward_pre_hook(keep_attended)]
    with torch.inference_mode():
        forward.model(ids)
    for hook in hooks:
        hook.remove()
    return seen["hidden"], seen["attended"]


def served_block(forward: BlockRankForward, index: int) -> Block:
    """The serving code's row-wise work of one layer and one chunk (no tenant deltas), as a function of tensors."""
    layer, qk = forward.decoder.layers[index], forward.weights.qk[index]

    def block(hidden: torch.Tensor, attended: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
              ) -> tuple[torch.Tensor, ...]:
        rotated, v = packed._qkv_rows(forward, layer, qk, hidden, (cos, sin), [])
        out = hidden.clone()  # _finish_rows updates the rows in place
        packed._finish_rows(forward, index, out, attended, [])
        return rotated, v, out

    return block


def compile_block(block: Block, freezing: bool, inputs: tuple[torch.Tensor, ...]) -> tuple[Block, float]:
    """`block` under torch.compile for these inputs' shapes, and the seconds its first call (the compile) took."""
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()  # each variant compiles anew
    fast = torch.compile(block, dynamic=False)
    start = time.perf_counter()
    with torch.inference_mode(), inductor_config.patch(freezing=freezing):  # the compile happens in the first call
        fast(*inputs)
    return fast, time.perf_counter() - start


def run(args: argparse.Namespace) -> dict[str, Any]:
    loaded = load_model(args.model, device="cpu", dtype=Dtype(args.dtype))
    forward = BlockRankForward(loaded.model)
    index = forward.num_layers // 2 if args.layer < 0 else args.layer
    hidden, attended = layer_inputs(forward, sample_ids(loaded.tokenizer, args.data, args.rows), index)
    cos, sin = packed._rope_rows(forward, torch.arange(args.rows))
    inputs = (hidden, attended, cos, sin)
    eager = served_block(forward, index)
    blocks: dict[str, Block] = {"eager": eager}
    compile_s: dict[str, float] = {}
    for name, freezing in (("compiled", False), ("compiled + freezing", True)):
        blocks[name], compile_s[name] = compile_block(served_block(forward, index), freezing, inputs)
    start = time.perf_counter()  # what a reranker with --cpu-compile on serves (after the resets of compile_block)
    served = BlockRankForward(loaded.model)
    served.ops = row_ops_for(CompileSetting.ON, served)
    blocks["row ops compiled (served)"] = served_block(served, index)
    compile_s["row ops compiled (served)"] = time.perf_counter() - start
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    # (dynamo's reset before the second compile drops the first's code: it recompiles, from inductor's cache, in its
    # first warm-up call)
    with torch.inference_mode():
        for _ in range(args.rounds):
            for name in VARIANTS:
                times[name].append(milliseconds(functools.partial(blocks[name], *inputs), args.repeats))
    with torch.inference_mode():
        reference = [t.float() for t in eager(*inputs)]
        errors = {name: max(relative_error(out, ref) for out, ref in zip(blocks[name](*inputs), reference, strict=True))
                  for name in VARIANTS[1:]}
    ms = {name: min(t) for name, t in times.items()}
    for name in VARIANTS:
        print(f"{name:<26} {ms[name]:7.2f} ms per chunk  {ms['eager'] / ms[name]:.2f}x"
              + (f"  compile {compile_s[name]:.1f} s, error {errors[name]:.2g}" if name in errors else ""))
    return {"model": loaded.name, "dtype": str(loaded.model.dtype).removeprefix("torch."), "layer": index,
            "rows": args.rows, "device": describe_device(torch.device("cpu")), "threads": torch.get_num_threads(),
            "ms_per_chunk": ms, "all_rounds_ms": times, "speedup_over_eager": {n: ms["eager"] / ms[n] for n in ms},
            "compile_s": compile_s, "relative_error_against_eager": errors}


def plot(result: dict[str, Any], path: Path) -> None:
    with figure(path) as ax:
        names = list(result["ms_per_chunk"])
        ax.bar(names, [result["ms_per_chunk"][n] for n in names])
        ax.set_ylabel(f"ms per {result['rows']}-row chunk")
        ax.set_title(f"layer {result['layer']}'s row-wise work, {result['dtype']}, {result['threads']} threads")
