"""The grpc.health.v1 servicer both services serve.

Ours rather than grpc_health's (a private `_async` module) for one reason:
at shutdown a Watch stream says NOT_SERVING and then ends. Watchers never
end a Watch themselves, so an open one held the server's graceful stop for
the whole grace period, however idle the server was.
"""
from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

Status = health_pb2.HealthCheckResponse.ServingStatus
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthServicer(health_pb2_grpc.HealthServicer):
    """Statuses by service name ("" is the whole server, SERVING until set)."""

    def __init__(self) -> None:
        self._status: dict[str, Status] = {"": SERVING}
        self._changed = asyncio.Condition()
        self._closing = False

    async def Check(self, request: health_pb2.HealthCheckRequest, context
                    ) -> health_pb2.HealthCheckResponse:
        status = self._status.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"no health status for service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context) -> None:
        """The current status, then each change; once shutdown has begun, the
        last status (NOT_SERVING, or SERVICE_UNKNOWN for a name never set)
        and the end. A Watch begun during shutdown (the health-only port
        still answers then) stays open until its server stops, so that a
        client that re-opens ended Watches at once cannot spin on it."""
        if self._closing:
            await context.write(health_pb2.HealthCheckResponse(status=self._status.get(
                request.service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)))
            await asyncio.get_running_loop().create_future()  # cancelled when the server stops
        sent = None
        while True:
            async with self._changed:  # released while writing: a slow watcher blocks no one
                while (status := self._status.get(
                        request.service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)) == sent \
                        and not self._closing:
                    await self._changed.wait()
                closing = self._closing
            if status != sent:
                await context.write(health_pb2.HealthCheckResponse(status=status))
                sent = status
            if closing:
                return

    async def set(self, service: str, status: Status) -> None:
        """Set `service`'s status; ignored once shutdown has begun."""
        async with self._changed:
            if not self._closing:
                self._status[service] = status
                self._changed.notify_all()

    async def enter_graceful_shutdown(self) -> None:
        """Every status NOT_SERVING for good; Watch streams say so and end."""
        async with self._changed:
            self._closing = True
            self._status = dict.fromkeys(self._status, NOT_SERVING)
            self._changed.notify_all()
