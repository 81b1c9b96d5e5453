"""Adapters on disk: PEFT LoRA directories and the BlockRank settings stored beside them.

An adapter directory holds `adapter_config.json` and `adapter_model.safetensors` (as peft writes them)
and `blockrank.json` (scoring layer, heads, block length, fusion weight, training record). Base models
have a scoring file of their own under `reranker/scoring/<model stem>.json` with the same keys.
Nothing here keeps state: the block zoo (reranker.zoo) decides what is resident.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open

from common.names import NameInvalid, check_adapter_name, is_adapter_name
from reranker.errors import AdapterInvalid, AdapterNotFound
from reranker.routing import LoraDelta

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
ADAPTERS_ROOT = PACKAGE_DIR / "adapters"  # the shipped adapters; `--adapters-root` points elsewhere
DEFAULT_ADAPTER = ADAPTERS_ROOT / "scifact-lora"
SCORING_DIR = PACKAGE_DIR / "scoring"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_META = "blockrank.json"

_KEY = re.compile(r"layers\.(\d+)\.((?:self_attn|mlp)\.[a-z_]+_proj)\.lora_([AB])\.weight$")
_UNSUPPORTED = ("use_dora", "modules_to_save", "lora_bias", "target_parameters", "layer_replication")


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def held_out_query_ids(meta_path: Path) -> set[str]:
    """The train queries an adapter's training held out (its blockrank.json's dev_query_ids): queries it never saw,
    on which adapters are compared."""
    return set(json.loads(meta_path.read_text())["dev_query_ids"])


def base_scoring(model_name: str) -> dict[str, Any]:
    """The base model's scoring file (layer, heads, fusion weight picked on train data), or {}."""
    return read_json(SCORING_DIR / f"{Path(model_name).stem}.json")


def scoring_file(model_name: str) -> Path:
    return SCORING_DIR / f"{Path(model_name).stem}.json"


def resolve_startup_adapter(adapter: str, model_name: str) -> Path | None:
    """The default tenant's adapter: "none"/"" = the base model; "default" = the shipped adapter when it
    was trained on this base model; anything else must be a PEFT adapter directory."""
    if adapter in ("", "none"):
        return None
    if adapter == "default":
        meta = read_json(DEFAULT_ADAPTER / ADAPTER_META)
        return DEFAULT_ADAPTER if meta.get("base_model") == model_name else None
    path = Path(adapter)
    if not (path / ADAPTER_CONFIG).exists():
        raise FileNotFoundError(f"{path} is not a PEFT adapter directory (no {ADAPTER_CONFIG})")
    return path


def resolve_adapter_name(root: Path, name: str) -> Path:
    """A client-supplied adapter *name* -> its directory under the server's adapters root.
    Names are plain identifiers; paths, '..' and links out of the root are refused."""
    try:
        check_adapter_name(name)  # the rule lives in common.names (shared with the tenant registry)
    except NameInvalid as exc:
        raise AdapterInvalid(str(exc)) from None
    root = root.resolve()
    directory = (root / name).resolve()
    if directory.parent != root:
        raise AdapterInvalid(f"adapter {name!r} resolves outside the adapters root")
    if not (directory / ADAPTER_CONFIG).is_file():
        raise AdapterNotFound(f"no adapter named {name!r} under the adapters root")
    return directory


def list_adapter_names(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / ADAPTER_CONFIG).is_file() and is_adapter_name(p.name))


@dataclass(frozen=True)
class LoraFile:
    """What an adapter directory says: per layer and module, the LoRA scale; the tensors stay on disk."""

    directory: Path
    scales: dict[tuple[int, str], float]  # (layer, module path in the layer) -> alpha / r
    meta: dict[str, Any]  # blockrank.json beside the weights, may be empty

    @property
    def weights(self) -> Path:
        return self.directory / ADAPTER_WEIGHTS

    @property
    def name(self) -> str:
        return self.directory.name

    def layers(self) -> list[int]:
        return sorted({layer for layer, _ in self.scales})

    def modules(self, layer: int) -> list[str]:
        return sorted(m for (i, m) in self.scales if i == layer)


def read_lora_file(directory: Path) -> LoraFile:
    """Validate an adapter directory and read its config (not its tensors). Raises AdapterInvalid."""
    config_path, weights = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise AdapterInvalid(f"{directory.name}: no {ADAPTER_WEIGHTS} (only safetensors adapters are served)")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AdapterInvalid(f"{directory.name}: unreadable {ADAPTER_CONFIG}: {exc}") from None
    if config.get("peft_type") != "LORA":
        raise AdapterInvalid(f"{directory.name}: peft_type {config.get('peft_type')!r}, only LORA is served")
    used = [k for k in _UNSUPPORTED if config.get(k)]
    if used:
        raise AdapterInvalid(f"{directory.name}: LoRA options not served as blocks: {used}")
    scales: dict[tuple[int, str], float] = {}
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
            match = _KEY.search(key)
            if match is None:
                raise AdapterInvalid(f"{directory.name}: tensor {key!r} is not a decoder-layer LoRA weight")
            layer, module = int(match.group(1)), match.group(2)
            scales[(layer, module)] = lora_scale(config, f"layers.{layer}.{module}")
    return LoraFile(directory, scales, read_json(directory / ADAPTER_META))


def lora_scale(config: dict[str, Any], module_path: str) -> float:
    """alpha / r (or alpha / sqrt(r) with rsLoRA), honouring peft's per-module rank/alpha patterns."""
    def pattern(table: dict[str, float], default: float) -> float:
        for key, value in table.items():
            if module_path == key or module_path.endswith("." + key) or re.fullmatch(rf".*\.{key}", module_path):
                return value
        return default

    r = pattern(config.get("rank_pattern") or {}, config["r"])
    alpha = pattern(config.get("alpha_pattern") or {}, config.get("lora_alpha", r))
    return float(alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r)


def read_layer_deltas(source: LoraFile, layer: int, target: Any) -> dict[str, LoraDelta]:
    """One decoder layer's LoRA tensors as deltas on `target`'s device and dtype, B pre-scaled;
    shapes are checked against the base layer. Raises AdapterInvalid, OSError."""
    weight = target.self_attn.q_proj.weight
    deltas: dict[str, LoraDelta] = {}
    with safe_open(str(source.weights), framework="pt") as f:
        for module in source.modules(layer):
            prefix = _tensor_prefix(f.keys(), layer, module)
            a, b = f.get_tensor(prefix + "lora_A.weight"), f.get_tensor(prefix + "lora_B.weight")
            linear = target.get_submodule(module)
            if a.shape[1] != linear.in_features or b.shape[0] != linear.out_features or a.shape[0] != b.shape[1]:
                raise AdapterInvalid(f"adapter {source.name}: layer {layer} {module} shapes "
                                     f"{tuple(a.shape)}/{tuple(b.shape)} do not fit this base model")
            b = b.float() * source.scales[(layer, module)]
            deltas[module] = LoraDelta(a.to(weight.device, weight.dtype), b.to(weight.device, weight.dtype))
    return deltas


def _tensor_prefix(keys: Iterable[str], layer: int, module: str) -> str:
    marker = f"layers.{layer}.{module}.lora_A.weight"
    for key in keys:
        if key.endswith(marker):
            return key[: -len("lora_A.weight")]
    raise AdapterInvalid(f"no lora_A tensor for layer {layer} {module}")
