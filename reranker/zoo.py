"""A BlockLLM-style block zoo: many tenants' rerankers over one resident base model.

A model is a chain of block ids: the embedding, then one block per decoder layer
(the final norm and LM head never run when scores are read from attention at
the scoring layer, so they are not part of a reranker's chain; adapter layers
after the scoring layer are not loaded either). Blocks are content-addressed:
a block's id is a hash of its weights (a tenant block: its base block's id plus
its LoRA tensors), so two tenants that upload the same adapter share every
block, and a tenant block is stored once however many chains use it.

The base blocks are the loaded model's own modules: loaded once, shared by all,
never evicted. A tenant block is its base block plus a low-rank delta per
adapted linear module. Tenant blocks live under a memory budget with LRU
eviction; an evicted block keeps its id and where it came from, and is read
back (and checked against its id) the next time a request needs it.

    zoo = BlockZoo(model, "SmolLM2-135M-Instruct.Q4_1.gguf", budget_bytes=256 << 20)
    zoo.add_tenant("acme", Path("adapters/acme-lora"))
    route = zoo.route("acme")       # per-layer deltas for BlockRankForward.score_routed
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from reranker.errors import AdapterInvalid, AdapterNotFound, BudgetExceeded, UnknownTenant
from reranker.routing import LoraDelta, Route

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_KEY = re.compile(r"layers\.(\d+)\.((?:self_attn|mlp)\.[a-z_]+_proj)\.lora_([AB])\.weight$")
_UNSUPPORTED = ("use_dora", "modules_to_save", "lora_bias", "target_parameters", "layer_replication")


# ---- adapters on disk ------------------------------------------------------------------------
def resolve_adapter_name(root: Path, name: str) -> Path:
    """A client-supplied adapter *name* -> its directory under the server's adapters root.
    Names are plain identifiers; paths, '..' and links out of the root are refused."""
    if not _NAME.fullmatch(name) or ".." in name:
        raise AdapterInvalid(f"adapter name {name!r} must match {_NAME.pattern} (a name, not a path)")
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
    return sorted(p.name for p in root.iterdir() if (p / ADAPTER_CONFIG).is_file() and _NAME.fullmatch(p.name))


@dataclass(frozen=True)
class LoraFile:
    """What an adapter directory says: per layer and module, the LoRA scale; the tensors stay on disk."""

    directory: Path
    scales: dict[tuple[int, str], float]  # (layer, module path in the layer) -> alpha / r
    meta: dict  # blockrank.json beside the weights (scoring layer, heads, fusion weight), may be empty

    @property
    def weights(self) -> Path:
        return self.directory / ADAPTER_WEIGHTS

    def layers(self) -> list[int]:
        return sorted({layer for layer, _ in self.scales})


def read_lora_file(directory: Path, meta_name: str) -> LoraFile:
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
            scales[(layer, module)] = _lora_scale(config, f"layers.{layer}.{module}")
    meta_path = directory / meta_name
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return LoraFile(directory, scales, meta)


def _lora_scale(config: dict, module_path: str) -> float:
    """alpha / r (or alpha / sqrt(r) with rsLoRA), honouring peft's per-module rank/alpha patterns."""
    def pattern(table: dict, default: float) -> float:
        for key, value in table.items():
            if module_path == key or module_path.endswith("." + key) or re.fullmatch(rf".*\.{key}", module_path):
                return value
        return default

    r = pattern(config.get("rank_pattern") or {}, config["r"])
    alpha = pattern(config.get("alpha_pattern") or {}, config.get("lora_alpha", r))
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


# ---- blocks ----------------------------------------------------------------------------------
@dataclass
class Block:
    id: str  # content hash
    kind: str  # "embed" | "layer"
    index: int  # decoder layer (-1 for the embedding)
    nbytes: int
    base: str | None = None  # tenant blocks: the base block they modify
    source: LoraFile | None = None  # tenant blocks: where their tensors are read from
    deltas: dict[str, LoraDelta] | None = None  # resident tenant block; None once evicted
    tenants: set[str] = field(default_factory=set)
    last_used: float = 0.0

    @property
    def is_base(self) -> bool:
        return self.base is None

    @property
    def resident(self) -> bool:
        return self.is_base or self.deltas is not None


@dataclass
class Tenant:
    name: str
    adapter: str  # the adapter's name (directory name)
    source: LoraFile
    chain: list[str]  # block ids: embedding, then every decoder layer
    chain_keys: tuple[str, ...]  # chain_keys[l]: identity of the chain up to layer l (prefix-cache key)
    loaded_at: float
    load_ms: float


@dataclass(frozen=True)
class TenantUsage:
    tenant: str
    adapter: str
    own_blocks: int  # tenant blocks only this tenant uses
    shared_blocks: int  # blocks it shares (base blocks and other tenants' identical blocks)
    own_bytes: int
    shared_bytes: int
    resident: bool  # every block of its chain is in memory
    load_ms: float
    meta: dict


@dataclass(frozen=True)
class ZooUsage:
    base_bytes: int
    tenant_bytes: int  # resident tenant blocks, each counted once
    budget_bytes: int
    resident_tenant_blocks: int
    known_tenant_blocks: int
    evictions: int
    reloads: int
    tenants: list[TenantUsage]


class BlockZoo:
    """Blocks, chains and tenants. Thread-safe; never imports gRPC."""

    def __init__(self, model: torch.nn.Module, base_name: str, budget_bytes: int = 1 << 30,
                 meta_name: str = "blockrank.json") -> None:
        self.model = model
        self.base_name = base_name
        self.budget_bytes = budget_bytes
        self.meta_name = meta_name
        self.decoder = model.model
        self._lock = threading.RLock()
        self.blocks: dict[str, Block] = {}
        self.tenants: dict[str, Tenant] = {}
        self.evictions = 0
        self.reloads = 0
        self.base_chain = self._register_base()
        self.base_bytes = unique_bytes(model.parameters())
        self._base_route = Route(chain_keys=_chain_keys(self.base_chain))

    # ---- base ----------------------------------------------------------------
    def _register_base(self) -> list[str]:
        start = time.perf_counter()
        chain = [self._add_base("embed", -1, self.decoder.embed_tokens)]
        chain += [self._add_base("layer", i, layer) for i, layer in enumerate(self.decoder.layers)]
        log.info("block zoo: %d base blocks hashed in %.2fs", len(chain), time.perf_counter() - start)
        return chain

    def _add_base(self, kind: str, index: int, module: torch.nn.Module) -> str:
        h = _hasher(f"base:{kind}")
        for name, tensor in sorted(module.state_dict().items()):
            _feed(h, name, tensor)
        block = Block(h.hexdigest(), kind, index, unique_bytes(module.parameters()))
        self.blocks.setdefault(block.id, block)
        return block.id

    def base_route(self) -> Route:
        return self._base_route

    # ---- tenants -------------------------------------------------------------
    def add_tenant(self, tenant: str, directory: Path, scoring_layer: int | None = None,
                   adapter: str | None = None) -> Tenant:
        """Load (or hot-replace) a tenant's adapter as blocks. Identical blocks already resident are
        shared, not loaded again. Raises AdapterInvalid / BudgetExceeded."""
        start = time.perf_counter()
        source = read_lora_file(directory, self.meta_name)
        base = source.meta.get("base_model")
        if base and base != self.base_name:
            raise AdapterInvalid(f"adapter {directory.name} was trained on {base}, this server runs {self.base_name}")
        last = scoring_layer if scoring_layer is not None else int(source.meta.get("layer", len(self.decoder.layers) - 1))
        if not 0 <= last < len(self.decoder.layers):
            raise AdapterInvalid(f"adapter {directory.name}: scoring layer {last} out of range")
        skipped = [layer for layer in source.layers() if layer > last]
        if skipped:
            log.info("adapter %s: layers %s are after the scoring layer %d and never run; not loaded",
                     directory.name, skipped, last)
        new_blocks = self._tenant_blocks(source, [layer for layer in source.layers() if layer <= last])
        chain = list(self.base_chain)  # layers after the scoring layer stay base blocks (never run)
        for block in new_blocks:
            chain[block.index + 1] = block.id
        size = sum(b.nbytes for b in {b.id: b for b in new_blocks}.values() if b.id not in self.blocks)
        if size > self.budget_bytes:
            raise BudgetExceeded(f"adapter {directory.name} needs {size} bytes, the tenant budget is "
                                 f"{self.budget_bytes}")
        with self._lock:
            old = self.tenants.get(tenant)
            for block in new_blocks:
                existing = self.blocks.setdefault(block.id, block)
                if existing.deltas is None:  # known but evicted: take the freshly read tensors
                    existing.deltas = block.deltas
                existing.tenants.add(tenant)
                existing.last_used = time.monotonic()
            record = Tenant(tenant, adapter or directory.name, source, chain, _chain_keys(chain), time.time(),
                            (time.perf_counter() - start) * 1000)
            self.tenants[tenant] = record
            if old is not None:
                self._release(old, keep=set(chain))
            self._enforce_budget(pinned=set(chain))
        return record

    def remove_tenant(self, tenant: str) -> int:
        """Forget a tenant; returns the bytes of tenant blocks no chain uses any more. In-flight
        requests keep the deltas they already hold and finish normally."""
        with self._lock:
            record = self.tenants.pop(tenant, None)
            if record is None:
                raise UnknownTenant(f"tenant {tenant!r} has no adapter loaded")
            return self._release(record, keep=set())

    def replace_block(self, tenant: str, position: int, replacement: str) -> None:
        """Point one chain position of a tenant at an equivalent block (see reranker.equivalence)."""
        with self._lock:
            record = self.tenants.get(tenant)
            if record is None or replacement not in self.blocks:
                return
            old = record.chain[position]
            record.chain[position] = replacement
            record.chain_keys = _chain_keys(record.chain)
            self.blocks[replacement].tenants.add(tenant)
            if old not in record.chain:
                self._drop_ref(old, tenant)

    def route(self, tenant: str) -> tuple[Tenant, Route]:
        """The tenant's chain as per-layer deltas, reading back any evicted block. The returned Route
        holds its own references, so a later eviction or unload does not disturb its request."""
        with self._lock:
            record = self.tenants.get(tenant)
            if record is None:
                raise UnknownTenant(f"tenant {tenant!r} has no adapter loaded")
            now = time.monotonic()
            blocks = [self.blocks[block_id] for block_id in record.chain]
            missing = [b for b in blocks if not b.resident]
            for block in blocks:
                block.last_used = now
            for block in missing:
                self._reload(block)
            if missing:  # only a read-back can push resident bytes over the budget
                self._enforce_budget(pinned=set(record.chain))
            layers = tuple(None if b.is_base else dict(b.deltas or {}) for b in blocks[1:])
            return record, Route(layers=layers, chain_keys=record.chain_keys)

    # ---- memory --------------------------------------------------------------
    def set_budget(self, budget_bytes: int) -> None:
        """Change the tenant-block budget; evicts at once if resident blocks no longer fit."""
        with self._lock:
            self.budget_bytes = budget_bytes
            self._enforce_budget(pinned=set())

    def usage(self) -> ZooUsage:
        with self._lock:
            tenant_blocks = [b for b in self.blocks.values() if not b.is_base]
            resident = [b for b in tenant_blocks if b.resident]
            per_tenant = [self._tenant_usage(t) for t in self.tenants.values()]
            return ZooUsage(self.base_bytes, sum(b.nbytes for b in resident), self.budget_bytes, len(resident),
                            len(tenant_blocks), self.evictions, self.reloads, per_tenant)

    def _tenant_usage(self, record: Tenant) -> TenantUsage:
        blocks = [self.blocks[i] for i in dict.fromkeys(record.chain)]
        own = [b for b in blocks if not b.is_base and b.tenants == {record.name}]
        shared_tenant = [b for b in blocks if not b.is_base and b.tenants != {record.name}]
        return TenantUsage(
            tenant=record.name, adapter=record.adapter, own_blocks=len(own),
            shared_blocks=len(blocks) - len(own), own_bytes=sum(b.nbytes for b in own if b.resident),
            shared_bytes=self.base_bytes + sum(b.nbytes for b in shared_tenant if b.resident),
            resident=all(b.resident for b in blocks), load_ms=record.load_ms, meta=record.source.meta)

    def _resident_tenant_bytes(self) -> int:
        return sum(b.nbytes for b in self.blocks.values() if not b.is_base and b.deltas is not None)

    def _enforce_budget(self, pinned: set[str]) -> None:
        """Evict least recently used tenant blocks until the budget holds; base blocks and the chain
        being served are never evicted."""
        over = self._resident_tenant_bytes() - self.budget_bytes
        if over <= 0:
            return
        victims = sorted((b for b in self.blocks.values() if not b.is_base and b.deltas is not None
                          and b.id not in pinned), key=lambda b: b.last_used)
        for block in victims:
            if over <= 0:
                break
            block.deltas = None
            over -= block.nbytes
            self.evictions += 1
            log.info("evicted block %s (layer %d, %d bytes)", block.id[:12], block.index, block.nbytes)

    def _reload(self, block: Block) -> None:
        assert block.source is not None and block.base is not None
        try:
            fresh = self._read_layer_block(block.source, block.index, block.base)
        except OSError as exc:
            raise AdapterNotFound(f"adapter {block.source.directory.name} is gone from disk ({exc}); "
                                  "load it again") from None
        if fresh.id != block.id:
            raise AdapterInvalid(f"adapter {block.source.directory.name} changed on disk since it was loaded "
                                 f"(layer {block.index}); load it again")
        block.deltas = fresh.deltas
        self.reloads += 1

    def _release(self, record: Tenant, keep: set[str]) -> int:
        freed = 0
        for block_id in set(record.chain) - keep:
            freed += self._drop_ref(block_id, record.name)
        return freed

    def _drop_ref(self, block_id: str, tenant: str) -> int:
        block = self.blocks.get(block_id)
        if block is None or block.is_base:
            return 0
        block.tenants.discard(tenant)
        if block.tenants:
            return 0
        del self.blocks[block_id]
        return block.nbytes if block.deltas is not None else 0

    # ---- reading tenant blocks ----------------------------------------------
    def _tenant_blocks(self, source: LoraFile, layers: Iterable[int]) -> list[Block]:
        return [self._read_layer_block(source, layer, self.base_chain[layer + 1]) for layer in layers]

    def _read_layer_block(self, source: LoraFile, layer: int, base_id: str) -> Block:
        """One decoder layer's LoRA tensors -> a tenant block (base id + deltas, content-addressed)."""
        modules = sorted(m for (i, m) in source.scales if i == layer)
        target = self.decoder.layers[layer]
        weight = target.self_attn.q_proj.weight
        h = _hasher(f"lora:{base_id}")
        deltas: dict[str, LoraDelta] = {}
        with safe_open(str(source.weights), framework="pt") as f:
            for module in modules:
                prefix = _tensor_prefix(f.keys(), layer, module)
                a, b = f.get_tensor(prefix + "lora_A.weight"), f.get_tensor(prefix + "lora_B.weight")
                linear = target.get_submodule(module)
                if a.shape[1] != linear.in_features or b.shape[0] != linear.out_features or a.shape[0] != b.shape[1]:
                    raise AdapterInvalid(f"adapter {source.directory.name}: layer {layer} {module} shapes "
                                         f"{tuple(a.shape)}/{tuple(b.shape)} do not fit this base model")
                b = b.float() * source.scales[(layer, module)]
                a = a.to(weight.device, weight.dtype)
                b = b.to(weight.device, weight.dtype)
                _feed(h, module + ".A", a)
                _feed(h, module + ".B", b)
                deltas[module] = LoraDelta(a, b)
        return Block(h.hexdigest(), "layer", layer, sum(d.nbytes for d in deltas.values()), base=base_id,
                     source=source, deltas=deltas)


def _tensor_prefix(keys: Iterable[str], layer: int, module: str) -> str:
    marker = f"layers.{layer}.{module}.lora_A.weight"
    for key in keys:
        if key.endswith(marker):
            return key[: -len("lora_A.weight")]
    raise AdapterInvalid(f"no lora_A tensor for layer {layer} {module}")


def _hasher(tag: str):
    h = hashlib.blake2b(digest_size=16)
    h.update(tag.encode())
    return h


def _feed(h, name: str, tensor: torch.Tensor) -> None:
    t = tensor.detach().contiguous().cpu()
    h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
    if t.numel():
        h.update(t.view(-1).view(torch.uint8).numpy())


def _chain_keys(chain: list[str]) -> tuple[str, ...]:
    """keys[l] names the embedding and decoder layers 0..l: equal keys mean equal computations."""
    keys, h = [], _hasher("chain")
    h.update(chain[0].encode())
    for block_id in chain[1:]:
        h.update(block_id.encode())
        keys.append(h.copy().hexdigest())
    return tuple(keys)


def unique_bytes(params: Iterator[torch.Tensor] | Iterable[torch.Tensor]) -> int:
    """Bytes of distinct storages (tied weights, such as a shared embedding and LM head, count once)."""
    seen, total = set(), 0
    for p in params:
        ptr = p.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += p.untyped_storage().nbytes()
    return total
