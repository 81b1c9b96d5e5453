"""The several-hosts backend, `etcd://HOST:PORT[/PREFIX]`: one key per tenant (PREFIX + tenant, default prefix
/blockrank/tenants/), its value the binding as JSON. Spoken through etcd's gRPC gateway (HTTP/JSON, path /v3/,
etcd 3.4 and later) with etcd3gw, so no second gRPC or protobuf stack sits beside the project's pinned ones.

Keeping current: a full range read (the state at revision R), then a watch from R + 1 (no change can fall between
the two), applied on this store's watch thread. Any connection error, a watch etcd cancels (compaction) or one
quiet for IDLE_S (a dead peer that never closed the connection) ends the watch; the thread then reconnects with
bounded, jittered backoff and resyncs with a full read, so an etcd restart or changes made while disconnected are
picked up. Each key's revision is remembered, so an event older than what is applied (this process's own write,
applied at once for read-your-writes, and then seen again on the watch) changes nothing.

etcd3gw's own watcher swallows the end of its stream (its iterator then blocks forever), so the watch stream is
read here, on the client's HTTP session; etcd3gw supplies the requests, the URLs and the error mapping.
"""

from __future__ import annotations

import base64
import json
import logging
import random
import socket
import threading
import time
from collections.abc import Mapping
from typing import Any

from etcd3gw.client import Etcd3Client
from etcd3gw.exceptions import Etcd3Exception

from reranker.registry.model import (
    Binding,
    RegistryInvalid,
    RegistryUnavailable,
    decode_binding,
    encode_binding,
)
from reranker.registry.store import CachedStore

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "/blockrank/tenants/"
API_PATH = "/v3/"  # etcd >= 3.4 (Debian's etcd-server 3.4, the Milvus compose profile's 3.5)
REQUEST_TIMEOUT_S = 5.0  # connect and read, every request: a write to an unreachable etcd fails within this
IDLE_S = 30.0  # a watch with nothing on it this long is re-established (and the state re-read)
BACKOFF_S = (0.1, 2.0)  # the first and the largest pause between reconnection attempts
CONNECT_TIMEOUT_S = 10.0  # how long opening the store tries to reach etcd
_ERRORS = (Etcd3Exception, OSError, ValueError, KeyError, TypeError)  # requests' errors are OSErrors


def _b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def _describe(exc: BaseException) -> str:
    detail = exc.detail_text if isinstance(exc, Etcd3Exception) else None
    return f"{type(exc).__name__}: {detail or exc}"


class EtcdStore(CachedStore):
    def __init__(self, host: str, port: int, prefix: str = DEFAULT_PREFIX,
                 connect_timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        super().__init__(f"etcd://{f'[{host}]' if ':' in host else host}:{port}{prefix}")
        raw = prefix.encode()
        self._range = {"key": _b64(raw), "range_end": _b64(raw[:-1] + bytes([raw[-1] + 1]))}
        self._prefix = prefix
        self._reader = Etcd3Client(host=host, port=port, timeout=REQUEST_TIMEOUT_S, api_path=API_PATH)
        self._writer = Etcd3Client(host=host, port=port, timeout=REQUEST_TIMEOUT_S, api_path=API_PATH)
        self._writes = threading.Lock()  # the writer's HTTP session is used by one thread at a time
        self._revisions: dict[str, int] = {}  # tenant -> revision of what is applied (a put or a delete)
        self._reported: dict[str, int] = {}  # tenant -> revision of the invalid record last logged
        self._response: Any = None  # the open watch stream, for close() to interrupt
        self._stream_lock = threading.Lock()
        self._failing, self._pause = False, BACKOFF_S[0]  # the watch thread's reconnection state
        self._revision = self._first_sync(connect_timeout_s)
        log.info("tenant store %s: %d tenants at revision %d", self.url, len(self._view), self._revision)
        self._start()

    # ---- reading: full reads and the watch --------------------------------------------------------------------
    def _first_sync(self, timeout_s: float) -> int:
        deadline, pause = time.monotonic() + timeout_s, BACKOFF_S[0]
        while True:
            try:
                return self._sync()
            except _ERRORS as exc:
                if time.monotonic() + pause > deadline:
                    raise RegistryUnavailable(f"tenant store {self.url} cannot be reached: {_describe(exc)}") from None
                time.sleep(pause)
                pause = min(pause * 2, BACKOFF_S[1])

    def _sync(self) -> int:
        """Read every binding; install them; the revision they are at."""
        result = self._reader.post(self._reader.get_url("/kv/range"), json=self._range)
        revision = int(result["header"]["revision"])
        with self._state:
            previous, newer = self._view, {t: r for t, r in self._revisions.items() if r > revision}
            bindings: dict[str, Binding] = {}
            self._revisions = {}
            for kv in result.get("kvs", []):
                self._apply_kv(bindings, kv, previous, deleted=False)
            for tenant, rev in newer.items():  # this process's writes after the read stay
                self._revisions[tenant] = rev
                if tenant in previous:
                    bindings[tenant] = previous[tenant]
                else:
                    bindings.pop(tenant, None)
            self._install(bindings)
        return revision

    def _apply_kv(self, bindings: dict[str, Binding], kv: dict[str, Any], previous: Mapping[str, Binding],
                  deleted: bool) -> None:
        """One key's state at its mod_revision into `bindings` (called with `_state` held)."""
        key = base64.b64decode(kv["key"]).decode("utf-8", "replace")
        tenant, revision = key.removeprefix(self._prefix), int(kv["mod_revision"])
        if not key.startswith(self._prefix) or revision <= self._revisions.get(tenant, 0):
            return
        self._revisions[tenant] = revision
        if deleted:
            bindings.pop(tenant, None)
            return
        try:
            bindings[tenant] = decode_binding(base64.b64decode(kv.get("value", "")), tenant)
        except RegistryInvalid as exc:  # a bad record written around us: the last good binding stays
            if self._reported.get(tenant) != revision:
                self._reported[tenant] = revision
                log.error("tenant store %s: key %r at revision %d is not a valid binding, %s: %s", self.url, key,
                          revision, "the last good one stays" if tenant in previous else "ignored", exc)
            if tenant in previous:
                bindings[tenant] = previous[tenant]

    def _watch(self) -> None:
        revision: int | None = self._revision
        while not self._stopping.is_set():
            try:
                if revision is None:
                    revision = self._sync()
                self._stream(revision)
            except _ERRORS as exc:
                if self._stopping.is_set():
                    break
                self._lost(exc)
            except Exception:  # never let the thread die: the snapshot would silently go stale
                log.exception("tenant store %s: watch failed", self.url)
                self._stopping.wait(BACKOFF_S[1])
            revision = None  # every end of a watch: read everything again
        self._reader.session.close()

    def _lost(self, exc: BaseException) -> None:
        """Pause before the next attempt: doubling from BACKOFF_S[0] to BACKOFF_S[1] (jittered) until a watch is
        established again (reported once per outage)."""
        if not self._failing:
            log.warning("tenant store %s: lost etcd (%s); reconnecting", self.url, _describe(exc))
        self._failing = True
        self._stopping.wait(self._pause * random.uniform(0.5, 1.0))
        self._pause = min(self._pause * 2, BACKOFF_S[1])

    def _stream(self, revision: int) -> None:
        """Apply the watch's events from `revision` + 1. Returns when the watch was quiet for IDLE_S (or the store
        closes): start over, nothing is wrong. Raises when it fails or etcd ends it."""
        request: dict[str, Any] = {"create_request": {**self._range, "start_revision": revision + 1}}
        response = self._reader.session.post(self._reader.get_url("/watch"), json=request, stream=True,
                                             timeout=(REQUEST_TIMEOUT_S, IDLE_S))
        with self._stream_lock:
            self._response = response
        last = time.monotonic()
        try:
            if self._stopping.is_set():  # closed before the stream could be interrupted
                return
            if response.status_code != 200:
                raise ConnectionError(f"watch: HTTP {response.status_code} {response.text[:200]}")
            for line in response.iter_lines():
                last = time.monotonic()
                if line.strip():
                    self._on_message(json.loads(line))
        except _ERRORS:
            if self._stopping.is_set():
                return
            if time.monotonic() - last >= IDLE_S * 0.9:
                log.debug("tenant store %s: watch quiet for %.0f s, renewing", self.url, IDLE_S)
                return
            raise
        finally:
            with self._stream_lock:
                self._response = None
            response.close()
        if not self._stopping.is_set():
            raise ConnectionError("etcd ended the watch")

    def _on_message(self, message: dict[str, Any]) -> None:
        if "error" in message:
            raise ConnectionError(f"watch error: {message['error']}")
        result = message.get("result", {})
        if result.get("canceled"):
            raise ConnectionError(f"watch canceled by etcd: {result.get('cancel_reason') or result}")
        if result.get("created"):  # watching again: the outage, if any, is over
            if self._failing:
                log.warning("tenant store %s: reconnected, %d tenants", self.url, len(self._view))
            self._failing, self._pause = False, BACKOFF_S[0]
        events = result.get("events", [])
        if events:
            with self._state:
                bindings = dict(self._view)
                for event in events:
                    self._apply_kv(bindings, event["kv"], bindings, deleted=event.get("type") == "DELETE")
                self._install(bindings)

    def _interrupt(self) -> None:
        """Wake the watch thread from a blocking read: shut the stream's socket down under it."""
        with self._stream_lock:
            response = self._response
        if response is not None:
            try:
                response.raw.connection.sock.shutdown(socket.SHUT_RDWR)
            except (AttributeError, OSError):  # already closed; else the read times out within IDLE_S
                pass

    # ---- writing ---------------------------------------------------------------------------------------------
    def _write(self, tenant: str, binding: Binding | None) -> bool:
        key = _b64(self._prefix + tenant)
        try:
            with self._writes:
                if binding is None:
                    result = self._writer.post(self._writer.get_url("/kv/deleterange"), json={"key": key})
                    existed = int(result.get("deleted", 0)) > 0
                else:
                    body = {"key": key, "value": _b64(encode_binding(binding)), "prev_kv": True}
                    result = self._writer.post(self._writer.get_url("/kv/put"), json=body)
                    existed = "prev_kv" in result
                revision = int(result["header"]["revision"])
        except _ERRORS as exc:
            raise RegistryUnavailable(f"tenant store {self.url}: {_describe(exc)}") from None
        if binding is not None or existed:  # read-your-writes: this process sees its own change at once
            with self._state:
                bindings = dict(self._view)
                if revision > self._revisions.get(tenant, 0):
                    self._revisions[tenant] = revision
                    if binding is None:
                        bindings.pop(tenant, None)
                    else:
                        bindings[tenant] = binding
                self._install(bindings)
        return existed

    def close(self) -> None:
        super().close()
        with self._writes:
            self._writer.session.close()
