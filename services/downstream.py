"""Channels from the gateway to its retriever, with replicas: several `HOST:PORT` targets (comma-separated)
or a gRPC name that resolves to several addresses (`dns:///retriever:50051`, as compose's `--scale` gives) share
one channel that spreads calls round-robin over every address that is up (gRPC client-side load balancing),
and retries a call that found its replica UNAVAILABLE on another one, within the call's deadline. Only
idempotent read RPCs are retried (the gateway calls Retrieve; nothing it calls writes). The reranker's replicas
are reached one channel each, tenant by tenant (services.affinity).
"""

from __future__ import annotations

import ipaddress
import json

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.admission import RETRY_PUSHBACK_KEY
from services.errors import ServiceError
from services.server import GRPC_OPTIONS
from services.tls import ClientTls, aio_channel

# Per-call retry on another replica: UNAVAILABLE only (the replica is down or restarting), a few attempts with a
# short backoff; gRPC keeps them within the caller's deadline.
RETRY_POLICY = {"maxAttempts": 4, "initialBackoff": "0.05s", "maxBackoff": "0.5s", "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"]}


def channel_target(targets: str) -> str:
    """`host:port` as is; `a:1,b:2` as one `ipv4:`/`ipv6:` target of all of them (numeric addresses, or
    `localhost`); anything with a scheme (`dns:///name:port`, `ipv4:...`) as is."""
    targets = targets.strip()
    if ":///" in targets or targets.startswith(("ipv4:", "ipv6:", "unix:")):
        return targets
    parts = [t.strip() for t in targets.split(",") if t.strip()]
    if len(parts) == 1:
        return parts[0]
    hosts = [p.rsplit(":", 1)[0].strip("[]") for p in parts]
    addresses = ["127.0.0.1" if h == "localhost" else h for h in hosts]
    try:
        families = {ipaddress.ip_address(a).version for a in addresses}
    except ValueError:
        raise ValueError(f"replica lists take numeric addresses (or a dns:/// name), got {targets!r}") from None
    if len(families) > 1:
        raise ValueError(f"replica lists take one address family, got {targets!r}")
    scheme = "ipv4" if families == {4} else "ipv6"
    ports = [p.rsplit(":", 1)[1] for p in parts]
    joined = ",".join(f"{a}:{port}" if scheme == "ipv4" else f"[{a}]:{port}"
                      for a, port in zip(addresses, ports, strict=True))
    return f"{scheme}:{joined}"


def replica_channel(targets: str, service: str, tls: ClientTls | None = None) -> grpc.aio.Channel:
    """One channel over every replica of `service` (its full name, e.g. retrieval.v1.RerankerService), over
    TLS (mutual when `tls` has a client certificate) when `tls` is enabled."""
    config = {"loadBalancingConfig": [{"round_robin": {}}],
              "methodConfig": [{"name": [{"service": service}], "retryPolicy": RETRY_POLICY}]}
    options = [*GRPC_OPTIONS, ("grpc.service_config", json.dumps(config)), ("grpc.enable_retries", 1)]
    return aio_channel(channel_target(targets), tls, options)


async def serving(channel: grpc.aio.Channel, timeout: float = 2.0, service: str = "") -> bool:
    """Whether a replica behind the channel answers SERVING to the standard health check (of `service`: its full
    name; empty: the whole server)."""
    try:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                                timeout=timeout)
    except grpc.aio.AioRpcError:
        return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def downstream_error(service: str, err: grpc.aio.AioRpcError) -> ServiceError:
    """Keep the downstream status code, but say which downstream produced it; a retry hint (RESOURCE_EXHAUSTED)
    travels on to the caller."""
    error = ServiceError(err.code(), f"{service}: {err.details()}")
    error.trailers = tuple((str(k), str(v)) for k, v in err.trailing_metadata() or () if k == RETRY_PUSHBACK_KEY)
    return error
