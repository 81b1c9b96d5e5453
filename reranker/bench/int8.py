"""The matrix products of one reranker layer in fp32, bf16 and int8 on a CPU: is int8 worth building?

A bf16 rerank on a CPU without AMX spends most of its time in the projections (`docs/benchmarks.md`). This
measures what int8 would buy there and what it costs in accuracy, on real inputs: one forward of the model over
SciFact text to `--rows` tokens, the input of every linear layer of layer `--layer` captured, then each layer
timed as fp32 and bf16 `F.linear` and as fbgemm's dynamic int8 linear (weights per channel, activations
quantised per call), side by side in one process. Accuracy: the relative error of each output against fp32's.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.ao.nn.quantized.dynamic as quantized_dynamic
from torch import nn

from common.beir import iter_corpus
from common.device import describe_device
from common.paths import SCIFACT
from common.plots import figure
from reranker.model import load_model

DTYPES = ("fp32", "bf16", "int8")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="")
    p.add_argument("--data", type=Path, default=SCIFACT)
    p.add_argument("--rows", type=int, default=1969, help="tokens in the batch (20 documents x 96 + a query: 1,969)")
    p.add_argument("--layer", type=int, default=-1, help="the layer whose projections are timed (-1: the middle)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", type=Path, default=Path("bench-results/cpu/reranker_int8.json"))


def sample_ids(tokenizer: Any, data: Path, rows: int) -> torch.Tensor:
    """(1, rows) token ids of the collection's first documents' text, one after another."""
    text = " ".join(doc.title + " " + doc.text for doc, _ in zip(iter_corpus(data), range(400), strict=False))
    ids: torch.Tensor = tokenizer(text, return_tensors="pt").input_ids[:, :rows]
    if ids.shape[1] < rows:
        raise ValueError(f"the first 400 documents of {data} give {ids.shape[1]} tokens, fewer than {rows}")
    return ids


def captured_inputs(args: argparse.Namespace) -> tuple[dict[str, nn.Linear], dict[str, torch.Tensor], int, str]:
    """Each linear layer of the chosen layer and the input it saw in one fp32 forward over real text."""
    loaded = load_model(args.model, device="cpu", dtype="fp32")
    layers = loaded.model.model.layers
    index = len(layers) // 2 if args.layer < 0 else args.layer
    ids = sample_ids(loaded.tokenizer, args.data, args.rows)
    linears = {name: m for name, m in layers[index].named_modules() if isinstance(m, nn.Linear)}
    inputs: dict[str, torch.Tensor] = {}

    def keeper(name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], None]:
        def keep(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:  # None: the input goes on unchanged
            inputs[name] = args[0][0].detach()
        return keep

    hooks = [m.register_forward_pre_hook(keeper(name)) for name, m in linears.items()]
    with torch.inference_mode():
        loaded.model(ids)
    for hook in hooks:
        hook.remove()
    return linears, inputs, index, loaded.name


def milliseconds(fn: Callable[[], object], repeats: int) -> float:
    for _ in range(3):  # warm-up: oneDNN builds each shape's kernel on first use
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    return float((output.float() - reference).norm() / reference.norm())


def measure_linear(linear: nn.Linear, x: torch.Tensor, repeats: int) -> dict[str, Any]:
    weight, bias = linear.weight.detach(), linear.bias
    as_bf16 = (x.bfloat16(), weight.bfloat16(), None if bias is None else bias.detach().bfloat16())
    as_int8 = quantized_dynamic.Linear.from_float(_with_qconfig(linear))
    runs = {"fp32": lambda: nn.functional.linear(x, weight, bias),
            "bf16": lambda: nn.functional.linear(*as_bf16),
            "int8": lambda: as_int8(x)}
    with torch.inference_mode():
        reference = runs["fp32"]()
        return {"shape": [x.shape[0], weight.shape[1], weight.shape[0]],
                "ms": {name: milliseconds(fn, repeats) for name, fn in runs.items()},
                "relative_error": {name: relative_error(runs[name](), reference) for name in ("bf16", "int8")}}


def _with_qconfig(linear: nn.Linear) -> nn.Linear:
    """fbgemm's dynamic int8: per-channel weights, activations quantised on each call (quantize_dynamic's own)."""
    linear.qconfig = torch.ao.quantization.per_channel_dynamic_qconfig  # type: ignore[assignment]
    return linear


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.backends.quantized.engine = "fbgemm"
    linears, inputs, index, model = captured_inputs(args)
    per_layer = {name: measure_linear(linears[name], inputs[name], args.repeats) for name in linears}
    totals = {dtype: sum(r["ms"][dtype] for r in per_layer.values()) for dtype in DTYPES}
    for name, r in per_layer.items():
        print(f"{name:<22} " + "  ".join(f"{d} {r['ms'][d]:7.2f} ms" for d in DTYPES)
              + f"  error bf16 {r['relative_error']['bf16']:.4f} int8 {r['relative_error']['int8']:.4f}")
    print("all projections: " + "  ".join(f"{d} {totals[d]:.1f} ms" for d in DTYPES)
          + f"; bf16/int8 {totals['bf16'] / totals['int8']:.2f}x")
    return {"model": model, "layer": index, "rows": args.rows, "device": describe_device(torch.device("cpu")),
            "threads": torch.get_num_threads(), "projections": per_layer, "total_ms": totals,
            "bf16_over_int8": totals["bf16"] / totals["int8"], "fp32_over_bf16": totals["fp32"] / totals["bf16"]}


def plot(result: dict[str, Any], path: Path) -> None:
    names = list(result["projections"])
    with figure(path, (8, 4)) as ax:
        width = 0.27
        for i, dtype in enumerate(DTYPES):
            ax.bar([n + (i - 1) * width for n in range(len(names))],
                   [result["projections"][name]["ms"][dtype] for name in names], width, label=dtype)
        ax.set_xticks(range(len(names)), [n.split(".")[-1] for n in names])
        ax.set_ylabel("ms per call")
        ax.set_title(f"layer {result['layer']} projections, {result['rows']} rows: "
                     f"bf16/int8 {result['bf16_over_int8']:.2f}x")
        ax.legend()
