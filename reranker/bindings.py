"""One replica's tenants kept in line with the shared tenant registry (reranker.registry): the registry holds
which adapter each tenant is bound to; this replica holds the blocks of the tenants it has served (a cache).

- A request for a registered tenant whose blocks are not here loads them first (lazy loading), so a restarted
  or newly added replica serves every registered tenant without an admin call. Concurrent first requests of
  one tenant wait for one load.
- A binding that changes or goes (another replica's LoadAdapter or UnloadAdapter, a hand edit) drops this
  replica's blocks of that tenant when the registry says so; the next request loads the new binding.
- An adapter that cannot be loaded (missing, corrupt, another base model) fails that tenant's requests with
  TenantUnavailable naming the adapter, retried at most every `retry_after_s`; other tenants are unaffected.
- `bind` (LoadAdapter) validates by loading, then records; a failed record unloads again, so a crash or an
  unreachable registry never leaves a binding half made.

Without a store (no --tenants-store), tenants are this process's loads alone, as in a single replica.
Locking: `_guard` protects the dictionaries; a tenant's own lock serialises its loads and unloads. The
registry's callbacks arrive on its notifier thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

from reranker.errors import AdapterInvalid, AdapterNotFound, TenantUnavailable, UnknownTenant
from reranker.registry import Binding, TenantLimits, TenantStore
from reranker.tenants import DEFAULT_TENANT, TenantHandle, TenantRegistry
from reranker.zoo import TenantUsage

log = logging.getLogger(__name__)
NO_LIMITS = TenantLimits()


@dataclass(frozen=True)
class _Failure:
    binding: Binding
    message: str
    until: float  # monotonic time after which a request tries to load it again


class RegisteredTenants:
    def __init__(self, tenants: TenantRegistry, store: TenantStore | None, retry_after_s: float = 5.0) -> None:
        self.tenants = tenants
        self.store = store
        self.retry_after_s = retry_after_s
        self.cold_loads = 0  # loads made by a request (not by LoadAdapter)
        self._loaded: dict[str, Binding] = {}  # the binding each resident tenant was loaded from
        self._failures: dict[str, _Failure] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        if store is not None:
            store.subscribe(self._on_change)

    # ---- the request path ----------------------------------------------------
    def handle(self, tenant: str) -> TenantHandle:
        """The tenant's handle, loading its registered adapter first when its blocks are not here (or were
        loaded from an older binding). UnknownTenant when it has neither blocks nor a binding."""
        if self.store is None or tenant == DEFAULT_TENANT:
            return self.tenants.handle(tenant)
        binding = self.store.get(tenant)
        if binding is None:
            if tenant in self._loaded:  # unbound since it was loaded: the registry's word is final
                self._drop(tenant)
            raise UnknownTenant(f"tenant {tenant!r} has no reranker registered")
        if self._loaded.get(tenant) != binding:
            self._load(binding, cold=True)
        return self.tenants.handle(tenant)

    def limits(self, tenant: str) -> TenantLimits:
        binding = self.store.get(tenant) if self.store is not None else None
        return binding.limits if binding is not None else NO_LIMITS

    # ---- admin -----------------------------------------------------------------
    def bind(self, binding: Binding) -> TenantUsage:
        """Validate the adapter by loading it here, then record the binding (replacing the tenant's old one)."""
        usage = self._load(binding, cold=False)
        if self.store is not None:
            try:
                self.store.put(binding)
            except Exception:
                self._drop(binding.tenant)  # not recorded: serve nothing this replica could not have lazily
                raise
        return usage

    def unbind(self, tenant: str) -> tuple[int, bool]:
        """Remove the tenant's binding and its blocks here: (bytes freed here, whether it was bound)."""
        if tenant == DEFAULT_TENANT:
            raise AdapterInvalid("the default tenant cannot be unloaded")
        was_bound = self.store.delete(tenant) if self.store is not None else False
        freed, was_loaded = self._drop(tenant)
        return freed, was_bound or was_loaded

    def bindings(self) -> Mapping[str, Binding]:
        return self.store.snapshot() if self.store is not None else {}

    # ---- loading and dropping ------------------------------------------------------
    def _lock_of(self, tenant: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(tenant, threading.Lock())

    def _load(self, binding: Binding, cold: bool) -> TenantUsage:
        tenant = binding.tenant
        with self._lock_of(tenant):
            if cold and self._loaded.get(tenant) == binding:
                return self.tenants.usage(tenant)  # another request loaded it meanwhile
            failure = self._failures.get(tenant)
            if cold and failure is not None and failure.binding == binding and time.monotonic() < failure.until:
                raise TenantUnavailable(failure.message)
            try:
                usage = self.tenants.load(tenant, binding.adapter, binding.layer, binding.fusion_weight)
            except (AdapterNotFound, AdapterInvalid, OSError, ValueError) as exc:
                if not cold:
                    raise  # LoadAdapter answers with the adapter's own error
                message = f"tenant {tenant!r}: its adapter {binding.adapter!r} cannot be loaded here: {exc}"
                with self._guard:
                    self._failures[tenant] = _Failure(binding, message, time.monotonic() + self.retry_after_s)
                log.error("%s", message)
                raise TenantUnavailable(message) from None
            with self._guard:
                self._loaded[tenant] = binding
                self._failures.pop(tenant, None)
                self.cold_loads += cold
        if cold:
            log.info("tenant %r loaded on first request (adapter %r, %.0f ms)", tenant, binding.adapter, usage.load_ms)
        return usage

    def _drop(self, tenant: str) -> tuple[int, bool]:
        with self._lock_of(tenant):
            with self._guard:
                self._loaded.pop(tenant, None)
                self._failures.pop(tenant, None)
            try:
                return self.tenants.unload(tenant), True
            except UnknownTenant:
                return 0, False

    def _on_change(self, snapshot: Mapping[str, Binding]) -> None:
        """Tenants whose binding went or changed lose their blocks here; a changed one loads again on demand."""
        with self._guard:
            stale = [t for t, loaded in self._loaded.items() if snapshot.get(t) != loaded]
            self._failures = {t: f for t, f in self._failures.items() if snapshot.get(t) == f.binding}
        for tenant in stale:
            freed, _ = self._drop(tenant)
            log.info("tenant %r: binding changed or removed in the registry; its blocks dropped (%d bytes)",
                     tenant, freed)
