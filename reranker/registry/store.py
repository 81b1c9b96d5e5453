"""The store interface, and what both backends share: the cached snapshot (an immutable mapping swapped whole),
the subscribers and the thread that tells them, the background loop's thread, and close().

A backend supplies only its I/O: `_write` (durable, then installs what it wrote) and `_watch` (the loop that keeps
the snapshot current, run on a daemon thread until `_stopping` is set).

Threads and locks: `snapshot`/`get` take no lock (they read one reference). `_state` guards installing a new
snapshot (and a backend's own bookkeeping beside it); callbacks are called on the notifier thread, never with a
lock held, one at a time, always with the newest snapshot (changes in quick succession may be folded into one
call). A callback may call any method of the store, close included (close does not wait for the thread it runs
on); a slow callback delays only the later calls, never a reader or a writer. All methods are thread-safe.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from types import MappingProxyType

from reranker.registry.model import Binding, RegistryInvalid, RegistryUnavailable, check_tenant

log = logging.getLogger(__name__)

Callback = Callable[[Mapping[str, Binding]], None]
JOIN_S = 5.0


class TenantStore(ABC):
    """The durable, shared source of truth for tenant -> adapter bindings that every replica and the gateway read."""

    url: str  # for logs (never a secret)

    @abstractmethod
    def snapshot(self) -> Mapping[str, Binding]:
        """The cached current bindings (read-only); never blocks on I/O; current within ~1 s of any change by any
        process (and at once after this store's own put/delete)."""

    @abstractmethod
    def get(self, tenant: str) -> Binding | None:
        """From the snapshot."""

    @abstractmethod
    def put(self, binding: Binding) -> None:
        """Durable when it returns; idempotent; replaces the tenant's binding. RegistryInvalid (a bad record, or
        a backend that must be fixed by hand first), RegistryUnavailable (the backend cannot be reached)."""

    @abstractmethod
    def delete(self, tenant: str) -> bool:
        """Idempotent; True if the tenant was bound. Errors as for put."""

    @abstractmethod
    def subscribe(self, callback: Callback) -> None:
        """`callback(snapshot)` on a background thread after the snapshot changes."""

    @abstractmethod
    def close(self) -> None:
        """Stop the background threads; later writes raise RegistryUnavailable. Idempotent."""


class CachedStore(TenantStore):
    """Everything but the backend's I/O."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._view: Mapping[str, Binding] = MappingProxyType({})
        self._state = threading.RLock()
        self._stopping = threading.Event()
        self._subscribers: list[Callback] = []
        self._changed = threading.Condition()
        self._version = 0  # snapshots installed
        self._told = 0  # the version the subscribers were last called with
        self._threads: list[threading.Thread] = []

    def _start(self) -> None:
        """Start the backend's loop and the notifier (once the backend has its first state: subscribers hear of
        changes after that one)."""
        self._told = self._version
        for name, target in (("watch", self._watch), ("notify", self._notify_loop)):
            thread = threading.Thread(target=target, name=f"registry-{name}", daemon=True)
            self._threads.append(thread)
            thread.start()

    # ---- reads -----------------------------------------------------------------------------------------------
    def snapshot(self) -> Mapping[str, Binding]:
        return self._view

    def get(self, tenant: str) -> Binding | None:
        return self._view.get(tenant)

    # ---- writes ----------------------------------------------------------------------------------------------
    def put(self, binding: Binding) -> None:
        if not isinstance(binding, Binding):
            raise RegistryInvalid(f"put takes a Binding, got {type(binding).__name__}")
        self._open()
        self._write(binding.tenant, binding)

    def delete(self, tenant: str) -> bool:
        self._open()
        return self._write(check_tenant(tenant), None)

    def _open(self) -> None:
        if self._stopping.is_set():
            raise RegistryUnavailable(f"tenant store {self.url} is closed")

    @abstractmethod
    def _write(self, tenant: str, binding: Binding | None) -> bool:
        """Bind (or, with None, unbind) the tenant durably, then install the result; True if it was bound."""

    @abstractmethod
    def _watch(self) -> None:
        """Keep the snapshot current until `_stopping` is set (the backend's daemon thread)."""

    # ---- the snapshot and its subscribers --------------------------------------------------------------------
    def _install(self, bindings: Mapping[str, Binding]) -> None:
        """Make `bindings` the snapshot; subscribers hear of it if it differs. Called with `_state` held."""
        if dict(bindings) == dict(self._view):
            return
        self._view = MappingProxyType(dict(bindings))
        with self._changed:
            self._version += 1
            self._changed.notify_all()

    def subscribe(self, callback: Callback) -> None:
        """Subscribe first, then read snapshot(): no change can fall between the two."""
        with self._changed:
            self._subscribers.append(callback)

    def _notify_loop(self) -> None:
        while True:
            with self._changed:
                while self._version == self._told and not self._stopping.is_set():
                    self._changed.wait()
                if self._stopping.is_set():
                    return
                self._told, subscribers, view = self._version, list(self._subscribers), self._view
            for callback in subscribers:
                try:
                    callback(view)
                except Exception:  # one subscriber's bug must not silence the others
                    log.exception("tenant store %s: a subscriber failed", self.url)

    def close(self) -> None:
        self._stopping.set()
        with self._changed:
            self._changed.notify_all()
        self._interrupt()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(JOIN_S)

    def _interrupt(self) -> None:
        """Wake the backend's loop from a blocking wait (close); the default loop waits on `_stopping`."""
