"""Derived and merged tenant adapters for tests and sizing runs.

A real deployment gets one trained adapter per tenant; to size the service for
16 tenants without training 16 adapters, `derive_adapter` writes new PEFT
adapter directories from a trained one: same config and blockrank.json, LoRA
tensors with seeded relative noise (distinct weights, comparable behaviour).
`noise=0` with `zero_b=True` gives an untrained adapter (B = 0, the delta is
exactly zero), the case where equivalence evaluation must substitute the base.
`merge_adapter` folds an adapter into a standalone copy of the model (the naive
one-model-per-tenant deployment, and the reference that tenant blocks are tested against).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from reranker.adapters import ADAPTER_CONFIG, ADAPTER_META, ADAPTER_WEIGHTS


def derive_adapter(source: Path, target: Path, seed: int, noise: float = 0.05, zero_b: bool = False) -> Path:
    """Copy `source` to `target` with every LoRA tensor t replaced by t + noise * std(t) * N(0, 1)."""
    target.mkdir(parents=True, exist_ok=True)
    for name in (ADAPTER_CONFIG, ADAPTER_META):
        if (source / name).exists():
            shutil.copyfile(source / name, target / name)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, tensor in sorted(load_file(str(source / ADAPTER_WEIGHTS)).items()):
        if zero_b and ".lora_B." in key:
            tensors[key] = torch.zeros_like(tensor)
            continue
        jitter = torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
        tensors[key] = (tensor.float() + noise * tensor.float().std() * jitter).to(tensor.dtype).contiguous()
    save_file(tensors, str(target / ADAPTER_WEIGHTS))
    return target


def merge_adapter(model: torch.nn.Module, adapter_dir: Path) -> torch.nn.Module:
    """Fold the LoRA deltas into a model's weights (a standalone copy of one tenant's reranker)."""
    from peft import PeftModel

    merged: torch.nn.Module = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    return merged
