"""grpc.health.v1 for the services: Check and Watch, NOT_SERVING for good once shutdown starts, and then every
Watch stream ends.

grpcio's own aio servicer keeps a Watch stream open forever. A watched server (every reranker replica is watched
by each gateway in front of it, services.affinity) then never runs out of in-flight calls, and its SIGTERM
always waits the whole grace period (20 s on a reranker) even when idle. Here a watcher is sent NOT_SERVING and
its stream ends, so shutdown waits only for the real calls in flight; a watcher treats the ended stream as the
replica being down."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ServingStatus = Any  # health_pb2.HealthCheckResponse.ServingStatus (an int enum the stubs type loosely)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class HealthServicer(health_pb2_grpc.HealthServicer):
    """The health of the server ("") and of each service it hosts. Made and used on the server's event loop."""

    def __init__(self) -> None:
        self._status: dict[str, ServingStatus] = {"": SERVING}
        self._changed = asyncio.Condition()
        self._shutting_down = False

    async def Check(self, request: health_pb2.HealthCheckRequest,
                    context: grpc.aio.ServicerContext[Any, Any]) -> health_pb2.HealthCheckResponse:
        status = self._status.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no health status for service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: health_pb2.HealthCheckRequest,
                    context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """The current status, then each change; after the NOT_SERVING of a shutdown the stream ends (OK)."""
        sent: ServingStatus | None = None
        while True:
            status, ending = await self._next(request.service, sent)
            if status != sent:
                await context.write(health_pb2.HealthCheckResponse(status=status))
                sent = status
            if ending:
                return

    async def set(self, service: str, status: ServingStatus) -> None:
        """Set one service's status; ignored once shutdown has started (NOT_SERVING stays)."""
        if not self._shutting_down:
            await self._publish({service: status})

    async def enter_graceful_shutdown(self) -> None:
        """Every status NOT_SERVING for good; the watchers are told, and their streams end."""
        if not self._shutting_down:
            await self._publish(dict.fromkeys(self._status, NOT_SERVING), shutting_down=True)

    async def _next(self, service: str, sent: ServingStatus | None) -> tuple[ServingStatus, bool]:
        """Once `service`'s status differs from the one sent, or shutdown has started: (its status, shutting down)."""

        def moved() -> bool:
            return self._shutting_down or self._current(service) != sent

        async with self._changed:
            await self._changed.wait_for(moved)
            return self._current(service), self._shutting_down

    def _current(self, service: str) -> ServingStatus:
        return self._status.get(service, SERVICE_UNKNOWN)

    async def _publish(self, statuses: dict[str, ServingStatus], shutting_down: bool = False) -> None:
        async with self._changed:
            self._status.update(statuses)
            self._shutting_down = self._shutting_down or shutting_down
            self._changed.notify_all()
