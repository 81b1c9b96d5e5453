"""Test adapters written on the spot with peft: LoRA on every linear of the first layers (MLP included)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from reranker.adapters import ADAPTER_META
from reranker.model import HFModule

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def save_all_linear_adapter(model: HFModule, directory: Path, base_model: str, layer: int, block_tokens: int,
                            seed: int = 0) -> None:
    """A rank-4 adapter on every linear of layers 0..layer with random non-zero A and B scaled by 0.05 (small
    beside the base weights, as a trained adapter's), and the metadata that makes it a reranker adapter scoring
    at `layer`."""
    from peft import LoraConfig, get_peft_model  # the [train] extra

    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(
        r=4, lora_alpha=8, target_modules=list(ALL_LINEAR), layers_to_transform=list(range(layer + 1)),
        init_lora_weights=False))
    for name, param in peft_model.named_parameters():
        if "lora_" in name:
            param.data.mul_(0.05)
    peft_model.save_pretrained(str(directory))
    meta = {"layer": layer, "heads": [], "block_tokens": block_tokens, "base_model": base_model}
    (directory / ADAPTER_META).write_text(json.dumps(meta))
