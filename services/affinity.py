"""Tenant-affine routing over the reranker's replicas: each tenant's reranks go to a stable few replicas, so each
replica holds the adapters of only its share of the tenants.

The reranker target names the replicas: `a:1,b:2` (addresses or host names), `dns:///reranker:50052` (compose
`--scale reranker=3`), or one `HOST:PORT`. Host names are resolved again every `refresh_s` seconds (off the event
loop), each address gets its own channel, and channels open and close as addresses come and go; a failed
resolution keeps the last answer. A background watch of each replica's standard health (of the RerankerService)
says whether it serves; a call that finds a replica UNAVAILABLE also sets it aside for SUSPECT_S.

A tenant's order over the replicas is rendezvous (highest-random-weight) hashing of (tenant, address) with blake2b:
the same in every gateway and across restarts, and adding a replica to n moves only the ~1/(n+1) of the tenants
that now weigh it highest. The first `spread` replicas of that order not known to be down are the tenant's set; a
call goes to the one of them with the fewest calls in flight (ties in turn) and, when that answers UNAVAILABLE
or RESOURCE_EXHAUSTED, to the next replica in the tenant's order, within the caller's deadline. Replicas known
to be down are tried last. The default reranker (tenant "") is routed the same way, with "" as its key.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Set
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import Counter, Gauge

from services.downstream import downstream_error, serving
from services.errors import ServiceError
from services.gen.retrieval.v1 import adapter_pb2_grpc, reranker_pb2, reranker_pb2_grpc
from services.server import GRPC_OPTIONS, Context, time_budget, within_deadline
from services.tls import ClientTls, aio_channel

log = logging.getLogger(__name__)
T = TypeVar("T")
RERANKER_SERVICE = reranker_pb2.DESCRIPTOR.services_by_name["RerankerService"].full_name
REFRESH_S = 5.0  # names in the target are resolved again this often
SUSPECT_S = 1.0  # a replica that answered UNAVAILABLE goes to the back of every order for this long
WATCH_RETRY_S = (0.2, 2.0)  # a broken health watch is opened again after this pause, doubling up to the second
CLOSE_GRACE_S = 30.0  # calls in flight on a replica that left the target get this long before its channel closes
FAILOVER_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
# A replica that comes back is reconnected within a couple of seconds, not gRPC's default two minutes.
REPLICA_OPTIONS = [*GRPC_OPTIONS, ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 200),
                   ("grpc.max_reconnect_backoff_ms", 2000)]

ROUTES = Counter("gateway_reranker_routes_total", "Calls to the reranker's replicas by method and by which replica "
                 "answered: affine (the tenant's chosen one), failover (a later one in its order), failed (none).",
                 ["method", "outcome"])
REPLICAS = Gauge("gateway_reranker_replicas", "Reranker replicas the gateway routes to, by health "
                 "(up, down, unknown: not probed yet).", ["state"])

Resolver = Callable[[str, int], Awaitable[list[str]]]  # (host, port) -> addresses, "IP:PORT" / "[IPv6]:PORT"
Invoke = Callable[["Replica", float | None], Awaitable[T]]  # one call on one replica, with the timeout left


# ---- the order ----------------------------------------------------------------------------------------------
def weight(key: str, address: str) -> bytes:
    """The rendezvous weight of (tenant, replica): stable across processes (not Python's salted hash)."""
    return hashlib.blake2b(f"{key}\x00{address}".encode(), digest_size=8).digest()


def rendezvous_order(key: str, addresses: Iterable[str]) -> list[str]:
    """The replicas from the tenant's most to its least preferred."""
    return sorted(addresses, key=lambda a: (weight(key, a), a), reverse=True)


def route(key: str, addresses: Iterable[str], down: Set[str] = frozenset(), spread: int = 1,
          in_flight: Mapping[str, int] | None = None, turn: int = 0) -> list[str]:
    """The replicas a call for tenant `key` tries, in order: the one of the tenant's set (the first `spread` not
    down, in rendezvous order) with the fewest calls in flight (ties: the `turn`-th), then the rest of the tenant's
    order not down, then those down."""
    order = rendezvous_order(key, addresses)
    up = [a for a in order if a not in down]
    chosen = up[:spread]
    if chosen:
        load = in_flight or {}
        least = min(load.get(a, 0) for a in chosen)
        ties = [a for a in chosen if load.get(a, 0) == least]
        first = ties[turn % len(ties)]
        up.remove(first)
        up.insert(0, first)
    return up + [a for a in order if a in down]


# ---- the target ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """One entry of the reranker target: an IP address (used as is) or a host name (resolved again and again)."""

    host: str
    port: int
    literal: bool

    @property
    def address(self) -> str:
        return format_address(self.host, self.port) if self.port else self.host


def format_address(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def parse_targets(text: str) -> list[Target]:
    """`a:1,b:2`, `dns:///name:port` (`dns://AUTHORITY/name:port`: the system's resolver all the same),
    `ipv4:a:1,b:2` / `ipv6:...`, one `host:port`, or `unix:PATH`. `localhost` is 127.0.0.1."""
    text = text.strip()
    if text.startswith("unix:"):
        return [Target(text, 0, literal=True)]
    if text.startswith("dns:"):
        text = text[len("dns:"):].rsplit("/", 1)[-1]
    elif text.startswith(("ipv4:", "ipv6:")):
        text = text[len("ipv4:"):]
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise ValueError("the reranker target names no replica")
    return [_target(p) for p in parts]


def _target(part: str) -> Target:
    host, sep, port = part.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"reranker replicas are HOST:PORT (or dns:///NAME:PORT), got {part!r}")
    if host == "localhost":
        host = "127.0.0.1"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return Target(host, int(port), literal=False)
    return Target(host, int(port), literal=True)


async def resolve(host: str, port: int) -> list[str]:
    """The host's addresses (IPv4 when it has any, else IPv6: one server is not counted twice), on the loop's
    resolver thread."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    ips = [str(i[4][0]) for i in infos if i[0] == socket.AF_INET] or \
          [str(i[4][0]) for i in infos if i[0] == socket.AF_INET6]
    return sorted({format_address(ip, port) for ip in ips})


# ---- one replica --------------------------------------------------------------------------------------------
class Replica:
    """A channel to one reranker address, its stubs, and what the gateway knows of its health."""

    def __init__(self, address: str, tls: ClientTls | None, name: str = "", service: str = RERANKER_SERVICE,
                 on_change: Callable[[], None] = lambda: None) -> None:
        self.address, self.on_change = address, on_change
        options: list[tuple[str, Any]] = list(REPLICA_OPTIONS)
        if tls is not None and tls.enabled and name and not tls.server_name:
            options.append(("grpc.ssl_target_name_override", name))  # its certificate names the host, not the IP
        self.channel = aio_channel(address, tls, options)
        self.reranker: reranker_pb2_grpc.RerankerServiceAsyncStub = reranker_pb2_grpc.RerankerServiceStub(self.channel)
        self.adapters: adapter_pb2_grpc.AdapterServiceAsyncStub = adapter_pb2_grpc.AdapterServiceStub(self.channel)
        self.healthy: bool | None = None  # from the health watch; None: not known yet
        self.suspect_until = 0.0
        self.in_flight = 0
        self.closed = False
        self._watch = asyncio.get_running_loop().create_task(self._watch_health(service))

    @property
    def down(self) -> bool:
        return self.healthy is False or time.monotonic() < self.suspect_until

    def suspect(self) -> None:
        self.suspect_until = time.monotonic() + SUSPECT_S

    def _set(self, healthy: bool) -> None:
        changed, self.healthy = healthy != self.healthy, healthy
        if changed:
            log.info("reranker replica %s %s", self.address, "SERVING" if healthy else "down")
            self.on_change()
        if healthy:
            self.suspect_until = 0.0

    async def _watch_health(self, service: str) -> None:
        """Follow the replica's health (Watch streams every change); a broken stream means down until it is back."""
        stub = health_pb2_grpc.HealthStub(self.channel)
        pause = WATCH_RETRY_S[0]
        while True:
            try:
                async for reply in stub.Watch(health_pb2.HealthCheckRequest(service=service)):
                    self._set(reply.status == health_pb2.HealthCheckResponse.SERVING)
                    pause = WATCH_RETRY_S[0]
                self._set(False)
            except grpc.aio.AioRpcError as err:
                if err.code() == grpc.StatusCode.UNIMPLEMENTED:  # a health service without Watch: poll it
                    self._set(await serving(self.channel, service=service))
                else:
                    self._set(False)
            await asyncio.sleep(pause)
            pause = min(pause * 2, WATCH_RETRY_S[1])

    async def close(self, grace: float | None = None) -> None:
        self.closed = True
        self._watch.cancel()
        await self.channel.close(grace)


# ---- the pool -----------------------------------------------------------------------------------------------
class ReplicaPool:
    """The reranker's replicas, kept in step with the target; made and used on the running event loop."""

    def __init__(self, target: str, tls: ClientTls | None = None, spread: int = 1, refresh_s: float = REFRESH_S,
                 resolver: Resolver | None = None, service: str = RERANKER_SERVICE) -> None:
        if spread < 1:
            raise ValueError(f"--tenant-spread must be at least 1, got {spread}")
        self.target, self.targets = target, parse_targets(target)
        self.tls, self.spread, self.refresh_s, self.service = tls, spread, refresh_s, service
        self.resolver = resolver or resolve
        self.replicas: dict[str, Replica] = {}
        self._leaving: set[Replica] = set()  # left the target; closing once their calls finish
        self._resolved: dict[Target, list[str]] = {}
        self._first = asyncio.Event()  # set after the first resolution
        self._turn = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self) -> ReplicaPool:
        if all(t.literal for t in self.targets):
            self._apply({t.address: "" for t in self.targets})
        else:
            self._spawn(self._refresh_loop())
        return self

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        replicas, self.replicas = [*self.replicas.values(), *self._leaving], {}
        await asyncio.gather(*(r.close() for r in replicas), return_exceptions=True)

    async def refresh(self) -> None:
        """Resolve the target's names again: channels open to new addresses and close for those gone."""
        wanted: dict[str, str] = {}  # address -> the host name it came from ("" for a literal address)
        for target in self.targets:
            if target.literal:
                wanted[target.address] = ""
                continue
            try:
                self._resolved[target] = await self.resolver(target.host, target.port)
            except (OSError, ValueError) as exc:  # the name does not resolve just now: keep what it was
                log.warning("cannot resolve reranker replicas %s: %s", target.host, exc)
            wanted.update({a: target.host for a in self._resolved.get(target, [])})
        self._apply(wanted)

    def _apply(self, wanted: Mapping[str, str]) -> None:
        for address in sorted(wanted.keys() - self.replicas.keys()):
            self.replicas[address] = Replica(address, self.tls, wanted[address], self.service, self._count)
            log.info("reranker replica %s added", address)
        for address in sorted(self.replicas.keys() - wanted.keys()):
            log.info("reranker replica %s left the target", address)
            replica = self.replicas.pop(address)
            self._leaving.add(replica)
            self._spawn(self._close(replica))
        self._first.set()
        self._count()

    def _count(self) -> None:
        states = [("unknown" if r.healthy is None else "up" if r.healthy else "down") for r in self.replicas.values()]
        for state in ("up", "down", "unknown"):
            REPLICAS.labels(state).set(states.count(state))

    async def _close(self, replica: Replica) -> None:
        try:
            await replica.close(CLOSE_GRACE_S)
        finally:
            self._leaving.discard(replica)

    async def _refresh_loop(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:  # noqa: BLE001 - the loop must outlive any one bad resolution
                log.exception("refreshing the reranker replicas failed")
            self._first.set()
            await asyncio.sleep(self.refresh_s)

    def _spawn(self, work: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _known(self, context: Context | None) -> list[Replica]:
        if not self._first.is_set():
            await within_deadline(context, self._first.wait(), "resolving the reranker's replicas")
        return list(self.replicas.values())

    async def order(self, key: str, context: Context | None = None, spread: int | None = None) -> list[Replica]:
        """The replicas a call for tenant `key` tries, in order (see `route`)."""
        replicas = {r.address: r for r in await self._known(context)}
        addresses = route(key, replicas, {a for a, r in replicas.items() if r.down}, spread or self.spread,
                          {a: r.in_flight for a, r in replicas.items()}, self._turn)
        self._turn += 1
        return [replicas[a] for a in addresses]

    async def call(self, key: str, invoke: Invoke[T], context: Context | None, method: str,
                   spread: int | None = None) -> T:
        """`invoke` on the tenant's replica, then on the next in its order while they answer UNAVAILABLE or
        RESOURCE_EXHAUSTED, each with the time the caller has left; any other error is the answer."""
        last: grpc.aio.AioRpcError | None = None
        for attempt, replica in enumerate(await self.order(key, context, spread)):
            timeout = time_budget(context)
            replica.in_flight += 1
            try:
                result = await invoke(replica, timeout)
            except grpc.aio.AioRpcError as err:
                if err.code() not in FAILOVER_CODES and not replica.closed:
                    raise downstream_error("reranker", err) from None
                if err.code() == grpc.StatusCode.UNAVAILABLE:
                    replica.suspect()
                if last is None or last.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    last = err  # "full, retry later" tells the caller more than "down"
                continue
            except grpc.aio.UsageError:  # its channel closed under us: it has just left the target
                continue
            finally:
                replica.in_flight -= 1
            ROUTES.labels(method, "affine" if attempt == 0 else "failover").inc()
            return result
        ROUTES.labels(method, "failed").inc()
        if last is None:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, f"reranker: no replica of {self.target} is known")
        raise downstream_error("reranker", last) from None

    async def each(self, invoke: Invoke[T], timeout: float | None, context: Context | None = None
                   ) -> list[tuple[Replica, T | grpc.aio.AioRpcError]]:
        """`invoke` on every replica at once (in address order), each answer or error beside its replica."""
        replicas = sorted(await self._known(context), key=lambda r: r.address)

        async def one(replica: Replica) -> T | grpc.aio.AioRpcError:
            try:
                return await invoke(replica, timeout)
            except grpc.aio.AioRpcError as err:
                return err

        answers = await asyncio.gather(*(one(r) for r in replicas))
        return list(zip(replicas, answers, strict=True))

    async def serving(self) -> bool:
        """At least one replica serves: known from its health watch, else asked now."""
        replicas = list(self.replicas.values())
        if any(r.healthy for r in replicas):
            return True
        return any(await asyncio.gather(*(serving(r.channel, service=self.service) for r in replicas)))
