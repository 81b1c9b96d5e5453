"""The tenant registry: which tenants have a reranker, their scoring settings, the handles requests
hold, adapter load/unload, and the equivalence checks scheduled after each load.

The default tenant ("") is the server's start-up reranker (an adapter or the base model); every other
tenant is a LoRA adapter loaded by name from the adapters root. Ranking itself lives in
reranker.engine; the blocks themselves in reranker.zoo.

Locking: `TenantRegistry._lock` keeps a tenant's settings and its zoo chain consistent (load, unload
and handle resolution are atomic with respect to each other); it is taken before the zoo's own lock,
never after. The equivalence worker runs checks on its own thread (reranker.equivalence documents the
locks a check takes).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from reranker.adapters import ADAPTERS_ROOT, list_adapter_names, resolve_adapter_name
from reranker.blockrank import ScoringSpec
from reranker.equivalence import Decision, EquivalenceChecker
from reranker.errors import AdapterInvalid, UnknownTenant
from reranker.prompt import DEFAULT_BLOCK_TOKENS, PromptBuilder, PromptBuilders
from reranker.routing import Route
from reranker.zoo import BlockZoo, TenantUsage, ZooUsage

log = logging.getLogger(__name__)
DEFAULT_TENANT = ""


class EquivalenceMode(StrEnum):
    BACKGROUND = "background"  # checked on the equivalence worker after a load
    SYNC = "sync"  # checked before LoadAdapter returns (tests, reproducible sizing)
    OFF = "off"


@dataclass(frozen=True)
class TenantSettings:
    spec: ScoringSpec
    fusion_weight: float | None  # None: the model's scores are served alone
    model_name: str


@dataclass(frozen=True)
class TenantHandle:
    """Everything one request of a tenant needs, resolved once when it arrives: its chain (holding
    its own references, so unloading the tenant meanwhile cannot break it), scoring and fusion."""

    tenant: str
    route: Route
    settings: TenantSettings
    builder: PromptBuilder


@dataclass(frozen=True)
class ScoringOverrides:
    """The service's own settings for the default tenant (flags), over its adapter's."""

    layer: int = -1
    heads: tuple[int, ...] = ()
    block_tokens: int = 0
    fusion_weight: float = -1.0  # below 0: the adapter's (or the base model's) own


@dataclass(frozen=True)
class Listing:
    """A consistent view of every tenant, for ListAdapters."""

    usage: ZooUsage
    settings: dict[str, TenantSettings]
    decisions: list[Decision]
    available: list[str]


def settings_from_meta(meta: dict[str, Any], name: str, num_layers: int) -> TenantSettings:
    """blockrank.json (or a base model's scoring file) -> settings; missing keys take the defaults."""
    spec = ScoringSpec(layer=int(meta.get("layer", num_layers // 2)), heads=tuple(meta.get("heads", ())),
                       block_tokens=int(meta.get("block_tokens", DEFAULT_BLOCK_TOKENS)))
    weight = meta.get("fusion_weight")
    return TenantSettings(spec, None if weight is None else float(weight), name)


class TenantRegistry:
    def __init__(self, zoo: BlockZoo, builders: PromptBuilders, checker: EquivalenceChecker,
                 mode: EquivalenceMode, adapters_root: Path | None = None) -> None:
        self.zoo = zoo
        self.builders = builders
        self.checker = checker
        self.mode = EquivalenceMode(mode)
        self.adapters_root = adapters_root or ADAPTERS_ROOT
        self._settings: dict[str, TenantSettings] = {}
        self._lock = threading.RLock()
        self._worker = EquivalenceWorker(self._check)

    # ---- lifecycle -----------------------------------------------------------
    def start(self) -> None:
        """Start the background equivalence worker (checks scheduled before start run then)."""
        self._worker.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the equivalence worker: the running check finishes, queued ones are dropped."""
        self._worker.stop(timeout_s)

    # ---- the default tenant --------------------------------------------------
    def set_default(self, adapter: Path | None, base: TenantSettings, overrides: ScoringOverrides) -> None:
        """The start-up reranker: `adapter` as a tenant chain (or the base model), with the service's
        overrides applied over the adapter's (or the base model's) own settings."""
        with self._lock:
            own = base
            if adapter is not None:
                layer = overrides.layer if overrides.layer >= 0 else None
                record = self.zoo.add_tenant(DEFAULT_TENANT, adapter, layer)
                own = settings_from_meta(record.source.meta, f"{self.zoo.base_name}+{adapter.name}",
                                         self.zoo.num_layers)
            spec = ScoringSpec(layer=overrides.layer if overrides.layer >= 0 else own.spec.layer,
                               heads=overrides.heads or own.spec.heads,
                               block_tokens=overrides.block_tokens or own.spec.block_tokens)
            weight = overrides.fusion_weight if overrides.fusion_weight >= 0 else own.fusion_weight
            self._settings[DEFAULT_TENANT] = TenantSettings(spec, weight, own.model_name)
        if adapter is not None:
            self._schedule_check(DEFAULT_TENANT)

    # ---- tenants -------------------------------------------------------------
    def handle(self, tenant: str = DEFAULT_TENANT) -> TenantHandle:
        """Resolve a tenant's chain for one request (reads back evicted blocks); UnknownTenant if absent."""
        with self._lock:
            settings = self.settings(tenant)
            route = self.zoo.route(tenant) if tenant in self.zoo.tenants else self.zoo.base_route
        return TenantHandle(tenant, route, settings, self.builders.get(settings.spec.block_tokens))

    def settings(self, tenant: str) -> TenantSettings:
        """A tenant's scoring spec, fusion weight and model name, without touching its blocks."""
        settings = self._settings.get(tenant)
        if settings is None:
            raise UnknownTenant(f"tenant {tenant!r} has no reranker loaded")
        return settings

    def load(self, tenant: str, adapter: str, layer: int | None = None,
             fusion_weight: float | None = None) -> TenantUsage:
        """Serve adapter `adapter` (a name under the adapters root) for `tenant`; replaces its old one. `layer` and
        `fusion_weight` override the adapter's own scoring layer and fusion weight (None: the adapter's)."""
        if not tenant or tenant == DEFAULT_TENANT:
            raise AdapterInvalid("tenant must be a non-empty name (the default tenant is set at start-up)")
        directory = resolve_adapter_name(self.adapters_root, adapter)
        with self._lock:
            record = self.zoo.add_tenant(tenant, directory, layer, adapter=adapter)
            own = settings_from_meta(record.source.meta, f"{self.zoo.base_name}+{adapter}", self.zoo.num_layers)
            spec = own.spec if layer is None else replace(own.spec, layer=layer)
            weight = own.fusion_weight if fusion_weight is None else fusion_weight
            self._settings[tenant] = TenantSettings(spec, weight, own.model_name)
        self._schedule_check(tenant)
        return self.zoo.tenant_usage(tenant)

    def unload(self, tenant: str) -> int:
        """Stop serving a tenant; returns the bytes freed. Requests holding its handle still finish."""
        if tenant == DEFAULT_TENANT:
            raise AdapterInvalid("the default tenant cannot be unloaded")
        with self._lock:
            freed = self.zoo.remove_tenant(tenant)
            self._settings.pop(tenant, None)
        return freed

    def usage(self, tenant: str) -> TenantUsage:
        return self.zoo.tenant_usage(tenant)

    def loaded(self) -> list[str]:
        """Tenants with an adapter chain (the default tenant too, when it has an adapter)."""
        with self._lock:
            return sorted(self.zoo.tenants)

    def listing(self) -> Listing:
        with self._lock:
            return Listing(self.zoo.usage(), dict(self._settings), list(self.checker.decisions),
                           list_adapter_names(self.adapters_root))

    # ---- equivalence ---------------------------------------------------------
    def _schedule_check(self, tenant: str) -> None:
        if self.mode is EquivalenceMode.SYNC:
            self._check(tenant)
        elif self.mode is EquivalenceMode.BACKGROUND:
            self._worker.submit(tenant)

    def _check(self, tenant: str) -> None:
        try:
            self.checker.check_tenant(tenant, self.settings(tenant).spec)
        except UnknownTenant:
            pass  # unloaded before its check ran
        except Exception:  # noqa: BLE001 - a failed check only means no substitution
            log.exception("equivalence check of tenant %r failed", tenant)


class EquivalenceWorker:
    """One thread that runs scheduled equivalence checks in order; stop() ends it."""

    _STOP = object()

    def __init__(self, check: Callable[[str], None]) -> None:
        self._check = check
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="equivalence", daemon=True)
            self._thread.start()

    def submit(self, tenant: str) -> None:
        self._queue.put(tenant)

    def stop(self, timeout_s: float) -> None:
        if self._thread is None:
            return
        while True:  # drop queued checks: nobody waits for them
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._queue.put(self._STOP)
        self._thread.join(timeout_s)
        self._thread = None

    def _run(self) -> None:
        while (item := self._queue.get()) is not self._STOP:
            self._check(item)
