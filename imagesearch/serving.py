"""What both gRPC servers share: health, limits, signal handling, shutdown.

`serve` starts an asyncio gRPC server, reports SERVING through the standard
grpc.health.v1 service once `ready` has run, and on SIGTERM or SIGINT turns
health NOT_SERVING, refuses new calls and lets in-flight calls finish within
the grace period before returning (the process then exits 0).
"""
from __future__ import annotations

import asyncio
import logging
import signal
from typing import Awaitable, Callable

import grpc
from grpc_health.v1 import _async as health_async
from grpc_health.v1 import health_pb2, health_pb2_grpc

log = logging.getLogger(__name__)

OVERALL = ""  # the health service name that means "the whole server"


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """gRPC options shared by servers and clients: message size caps both ways."""
    return [("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes)]


async def serve(*, name: str, address: str, max_message_bytes: int, grace_s: float,
                register: Callable[[grpc.aio.Server], None], service_names: list[str],
                ready: Callable[[], Awaitable[None]] | None = None) -> None:
    """Run a server until SIGTERM/SIGINT.

    `register` adds the servicers; `ready` (optional) runs after the port is
    bound and before health says SERVING, e.g. a warm-up encode.
    """
    server = grpc.aio.server(options=channel_options(max_message_bytes))
    register(server)
    health = health_async.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    for service in [OVERALL, *service_names]:
        await health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    if server.add_insecure_port(address) == 0:
        raise SystemExit(f"{name}: cannot listen on {address} (port in use or bad address)")
    await server.start()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    if ready is not None:
        await ready()
    for service in [OVERALL, *service_names]:
        await health.set(service, health_pb2.HealthCheckResponse.SERVING)
    log.info("%s listening on %s", name, address)

    await stop.wait()
    log.info("%s shutting down: finishing in-flight calls for up to %.1f s", name, grace_s)
    await health.enter_graceful_shutdown()
    await server.stop(grace_s)
    log.info("%s stopped", name)


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss").setLevel(logging.WARNING)  # Milvus Lite's loader chatter
