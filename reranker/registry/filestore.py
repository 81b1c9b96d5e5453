"""The embedded backend, `file:PATH`: the whole registry as one JSON document that every process sharing the path
reads (the keys file's rules: re-read when its (mtime_ns, size, inode) stamp changes; a bad edit is logged and the
last good state kept).

Writes are read-modify-write under an exclusive flock on a sidecar `PATH.lock`, so writers in any number of
processes lose nothing; the new document replaces the old atomically (common.files.write_atomically: temporary
file, fsync, rename, directory fsync), so a reader or a crash sees the old document or the new, never a torn one.
A write while the file on disk is not valid is refused (RegistryInvalid): a hand edit is never overwritten; one
that cannot be made (a stuck writer holding the lock past LOCK_WAIT_S, a read-only or full disk) is
RegistryUnavailable.
A background thread checks the stamp every 0.5 s, so subscribers hear of another process's change within a
second even when nothing asks. A missing file is an empty registry; the first write creates it (and its parents).
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from common.files import write_atomically
from reranker.registry.model import (
    Binding,
    RegistryInvalid,
    RegistryUnavailable,
    decode_document,
    encode_document,
)
from reranker.registry.store import CachedStore

log = logging.getLogger(__name__)

POLL_S = 0.5
LOCK_WAIT_S = 10.0
Stamp = tuple[int, int, int] | None  # (mtime_ns, size, inode); None: no file


class FileStore(CachedStore):
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).absolute()
        super().__init__(f"file:{self.path}")
        self._lock_path = self.path.with_name(self.path.name + ".lock")
        self._writers = threading.Lock()  # one writer per process at a time (flock orders the processes)
        with self._state:
            self._stamp, bindings, problem = self._read()
            if problem is not None:  # as a keys file: a server does not start on a broken registry
                raise RegistryInvalid(f"tenants file {self.path} is not valid: {problem}")
            self._install(bindings)
        log.info("tenant store %s: %d tenants", self.url, len(bindings))
        self._start()

    # ---- reading ---------------------------------------------------------------------------------------------
    def _read(self) -> tuple[Stamp, dict[str, Binding], str | None]:
        """(stamp, bindings, None) or (stamp, {}, why the file is not valid). Stamp and content come from one open
        file, so they agree even while other processes replace it."""
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                text = f.read()
        except FileNotFoundError:
            return None, {}, None
        except OSError as exc:  # the stamp as far as it can be had, so the same trouble is reported once
            return self._stamp_now(), {}, f"unreadable ({exc})"
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        try:
            return stamp, decode_document(text), None
        except RegistryInvalid as exc:
            return stamp, {}, str(exc)

    def _stamp_now(self) -> Stamp:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _watch(self) -> None:
        while not self._stopping.wait(POLL_S):
            try:
                self._poll()
            except Exception:  # never let the thread die: the snapshot would silently go stale
                log.exception("tenant store %s: checking the file failed", self.url)

    def _poll(self) -> None:
        with self._state:
            if self._stamp_now() == self._stamp:
                return
            stamp, bindings, problem = self._read()
            if stamp == self._stamp:
                return
            self._stamp = stamp
            if problem is not None:  # logged once per change of the file; the last good state stays
                log.error("tenants file %s is not valid, the last good state (%d tenants) stays: %s",
                          self.path, len(self._view), problem)
                return
            self._install(bindings)
        log.info("tenant store %s: reloaded, %d tenants", self.url, len(bindings))

    # ---- writing ---------------------------------------------------------------------------------------------
    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """This process's writers one at a time, then the flock (waited for at most LOCK_WAIT_S: a writer holds it
        for milliseconds, so longer means one is stuck, and a request must not hang on it)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._writers, open(self._lock_path, "a") as lock:
            deadline = time.monotonic() + LOCK_WAIT_S
            while True:
                try:
                    fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise RegistryUnavailable(f"{self._lock_path} held by another writer for over "
                                                  f"{LOCK_WAIT_S:.0f} s") from None
                    time.sleep(0.002)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def _write(self, tenant: str, binding: Binding | None) -> bool:
        try:
            return self._write_locked(tenant, binding)
        except OSError as exc:  # a read-only or full disk, a directory we may not write
            raise RegistryUnavailable(f"tenant store {self.url} cannot be written: {exc}") from None

    def _write_locked(self, tenant: str, binding: Binding | None) -> bool:
        with self._exclusive():
            _, current, problem = self._read()
            if problem is not None:
                raise RegistryInvalid(f"tenants file {self.path} is not valid ({problem}); fix it by hand first: "
                                      f"it is not overwritten (the last good state is still served)")
            existed = tenant in current
            if current.get(tenant) != binding and (binding is not None or existed):
                if binding is None:
                    del current[tenant]
                else:
                    current[tenant] = binding
                write_atomically(self.path, encode_document(current))
            with self._state:  # read-your-writes: this process sees its own change at once
                stamp, now, problem = self._read()
                if problem is None:  # else a hand edit since the write: the poller reports it
                    self._stamp = stamp
                    self._install(now)
        return existed
