"""A BlockLLM-style block zoo: many tenants' rerankers over one resident base model.

A model is a Chain of block ids: the embedding, then one block per decoder layer
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

Locking: `BlockZoo._lock` guards blocks, tenants, chains and residency; it is never held while a
forward pass runs (a Route holds its own references to the deltas it needs).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

import torch

from reranker.adapters import LoraFile, read_layer_deltas, read_lora_file
from reranker.errors import AdapterInvalid, AdapterNotFound, BudgetExceeded, UnknownTenant
from reranker.routing import LoraDelta, Route

log = logging.getLogger(__name__)


class BlockKind(StrEnum):
    EMBED = "embed"
    LAYER = "layer"


@dataclass(frozen=True)
class Chain:
    """A model as block ids: the embedding block, then one block per decoder layer."""

    embed: str
    layers: tuple[str, ...]

    def with_layer(self, layer: int, block_id: str) -> Chain:
        layers = list(self.layers)
        layers[layer] = block_id
        return replace(self, layers=tuple(layers))

    def block_ids(self) -> tuple[str, ...]:
        return (self.embed, *self.layers)

    def keys(self) -> tuple[str, ...]:
        """keys[l] names the embedding and decoder layers 0..l: equal keys mean equal computations
        (the shared-prefix cache is keyed by them)."""
        keys, h = [], _hasher("chain")
        h.update(self.embed.encode())
        for block_id in self.layers:
            h.update(block_id.encode())
            keys.append(h.copy().hexdigest())
        return tuple(keys)


@dataclass
class Block:
    id: str  # content hash
    kind: BlockKind
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
    chain: Chain
    load_ms: float
    chain_keys: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.chain_keys = self.chain.keys()


@dataclass(frozen=True)
class Resolved:
    """A tenant's chain and, for the forward pass, its per-layer deltas (read back if evicted)."""

    chain: Chain
    route: Route


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

    def __init__(self, model: torch.nn.Module, base_name: str, budget_bytes: int = 1 << 30) -> None:
        self.base_name = base_name
        self.budget_bytes = budget_bytes
        self.decoder: Any = model.model
        self._lock = threading.RLock()
        self.blocks: dict[str, Block] = {}
        self.tenants: dict[str, Tenant] = {}
        self.evictions = 0
        self.reloads = 0
        self.base_chain = self._register_base()
        self.base_bytes = unique_bytes(model.parameters())
        self.base_route = Route(chain_keys=self.base_chain.keys())

    @property
    def num_layers(self) -> int:
        return len(self.decoder.layers)

    def _register_base(self) -> Chain:
        start = time.perf_counter()
        embed = self._add_base(BlockKind.EMBED, -1, self.decoder.embed_tokens)
        layers = tuple(self._add_base(BlockKind.LAYER, i, layer) for i, layer in enumerate(self.decoder.layers))
        log.info("block zoo: %d base blocks hashed in %.2fs", len(layers) + 1, time.perf_counter() - start)
        return Chain(embed, layers)

    def _add_base(self, kind: BlockKind, index: int, module: torch.nn.Module) -> str:
        h = _hasher(f"base:{kind.value}")
        for name, tensor in sorted(module.state_dict().items()):
            _feed(h, name, tensor)
        block = Block(h.hexdigest(), kind, index, unique_bytes(module.parameters()))
        self.blocks.setdefault(block.id, block)
        return block.id

    # ---- tenants -------------------------------------------------------------
    def add_tenant(self, tenant: str, directory: Path, scoring_layer: int | None = None,
                   adapter: str | None = None) -> Tenant:
        """Load (or hot-replace) a tenant's adapter as blocks. Identical blocks already resident are
        shared, not loaded again. Raises AdapterInvalid / BudgetExceeded."""
        start = time.perf_counter()
        source = read_lora_file(directory)
        last = self._check_source(source, scoring_layer)
        new_blocks = [self._read_layer_block(source, layer) for layer in source.layers() if layer <= last]
        chain = self.base_chain  # layers after the scoring layer stay base blocks (never run)
        for block in new_blocks:
            chain = chain.with_layer(block.index, block.id)
        size = sum(b.nbytes for b in {b.id: b for b in new_blocks}.values() if b.id not in self.blocks)
        if size > self.budget_bytes:
            raise BudgetExceeded(f"adapter {source.name} needs {size} bytes, the tenant budget is "
                                 f"{self.budget_bytes}")
        with self._lock:
            old = self.tenants.get(tenant)
            for block in new_blocks:
                existing = self.blocks.setdefault(block.id, block)
                if existing.deltas is None:  # known but evicted: take the freshly read tensors
                    existing.deltas = block.deltas
                existing.tenants.add(tenant)
                existing.last_used = time.monotonic()
            record = Tenant(tenant, adapter or source.name, source, chain, (time.perf_counter() - start) * 1000)
            self.tenants[tenant] = record
            if old is not None:
                self._release(old, keep=set(chain.block_ids()))
            self._enforce_budget(pinned=set(chain.block_ids()))
        return record

    def _check_source(self, source: LoraFile, scoring_layer: int | None) -> int:
        """The last layer to load (the tenant's scoring layer); refuses adapters of another base model."""
        base = source.meta.get("base_model")
        if base and base != self.base_name:
            raise AdapterInvalid(f"adapter {source.name} was trained on {base}, this server runs {self.base_name}")
        last = scoring_layer if scoring_layer is not None else int(source.meta.get("layer", self.num_layers - 1))
        if not 0 <= last < self.num_layers:
            raise AdapterInvalid(f"adapter {source.name}: scoring layer {last} out of range")
        skipped = [layer for layer in source.layers() if layer > last]
        if skipped:
            log.info("adapter %s: layers %s are after the scoring layer %d and never run; not loaded",
                     source.name, skipped, last)
        return last

    def remove_tenant(self, tenant: str) -> int:
        """Forget a tenant; returns the bytes of tenant blocks no chain uses any more. In-flight
        requests keep the deltas they already hold and finish normally."""
        with self._lock:
            record = self.tenants.pop(tenant, None)
            if record is None:
                raise UnknownTenant(f"tenant {tenant!r} has no adapter loaded")
            return self._release(record, keep=set())

    def replace_block(self, tenant: str, layer: int, replacement: str) -> None:
        """Point one decoder layer of a tenant's chain at an equivalent block (see reranker.equivalence)."""
        with self._lock:
            record = self.tenants.get(tenant)
            if record is None or replacement not in self.blocks:
                return
            old = record.chain.layers[layer]
            record.chain = record.chain.with_layer(layer, replacement)
            record.chain_keys = record.chain.keys()
            self.blocks[replacement].tenants.add(tenant)
            if old not in record.chain.block_ids():
                self._drop_ref(old, tenant)

    def resolve(self, tenant: str) -> Resolved:
        """The tenant's chain and its per-layer deltas, reading back any evicted block. The Route holds
        its own references, so a later eviction or unload does not disturb its request."""
        with self._lock:
            record = self.tenants.get(tenant)
            if record is None:
                raise UnknownTenant(f"tenant {tenant!r} has no adapter loaded")
            now = time.monotonic()
            blocks = [self.blocks[block_id] for block_id in record.chain.block_ids()]
            missing = [b for b in blocks if not b.resident]
            for block in blocks:
                block.last_used = now
            for block in missing:
                self._reload(block)
            if missing:  # only a read-back can push resident bytes over the budget
                self._enforce_budget(pinned=set(record.chain.block_ids()))
            layers = tuple(None if b.is_base else dict(b.deltas or {}) for b in blocks[1:])
            return Resolved(record.chain, Route(layers=layers, chain_keys=record.chain_keys))

    def route(self, tenant: str) -> Route:
        return self.resolve(tenant).route

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

    def tenant_usage(self, tenant: str) -> TenantUsage:
        with self._lock:
            record = self.tenants.get(tenant)
            if record is None:
                raise UnknownTenant(f"tenant {tenant!r} has no adapter loaded")
            return self._tenant_usage(record)

    def layer_blocks(self, layer: int) -> list[Block]:
        """Resident tenant blocks at a decoder layer (candidates for equivalence)."""
        with self._lock:
            return [b for b in self.blocks.values()
                    if not b.is_base and b.index == layer and b.deltas is not None]

    def known_block_ids(self) -> set[str]:
        with self._lock:
            return set(self.blocks)

    def _tenant_usage(self, record: Tenant) -> TenantUsage:
        blocks = [self.blocks[i] for i in dict.fromkeys(record.chain.block_ids())]
        own = [b for b in blocks if not b.is_base and b.tenants == {record.name}]
        shared_tenant = [b for b in blocks if not b.is_base and b.tenants != {record.name}]
        return TenantUsage(
            tenant=record.name, adapter=record.adapter, own_blocks=len(own),
            shared_blocks=len(blocks) - len(own), own_bytes=sum(b.nbytes for b in own if b.resident),
            shared_bytes=self.base_bytes + sum(b.nbytes for b in shared_tenant if b.resident),
            resident=all(b.resident for b in blocks), load_ms=record.load_ms)

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
            fresh = self._read_layer_block(block.source, block.index)
        except OSError as exc:
            raise AdapterNotFound(f"adapter {block.source.name} is gone from disk ({exc}); load it again") from None
        if fresh.id != block.id:
            raise AdapterInvalid(f"adapter {block.source.name} changed on disk since it was loaded "
                                 f"(layer {block.index}); load it again")
        block.deltas = fresh.deltas
        self.reloads += 1

    def _release(self, record: Tenant, keep: set[str]) -> int:
        freed = 0
        for block_id in set(record.chain.block_ids()) - keep:
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

    def _read_layer_block(self, source: LoraFile, layer: int) -> Block:
        """One decoder layer's LoRA tensors -> a tenant block (base id + deltas, content-addressed)."""
        base_id = self.base_chain.layers[layer]
        deltas = read_layer_deltas(source, layer, self.decoder.layers[layer])
        h = _hasher(f"lora:{base_id}")
        for module, delta in sorted(deltas.items()):
            _feed(h, module + ".A", delta.a)
            _feed(h, module + ".B", delta.b)
        return Block(h.hexdigest(), BlockKind.LAYER, layer, sum(d.nbytes for d in deltas.values()), base=base_id,
                     source=source, deltas=deltas)


def _hasher(tag: str) -> Any:
    h = hashlib.blake2b(digest_size=16)
    h.update(tag.encode())
    return h


def _feed(h: Any, name: str, tensor: torch.Tensor) -> None:
    t = tensor.detach().contiguous().cpu()
    h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
    if t.numel():
        h.update(t.view(-1).view(torch.uint8).numpy())


def unique_bytes(params: Iterable[torch.Tensor]) -> int:
    """Bytes of distinct storages (tied weights, such as a shared embedding and LM head, count once)."""
    seen, total = set(), 0
    for p in params:
        ptr = p.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += p.untyped_storage().nbytes()
    return total
