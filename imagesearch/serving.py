"""What both gRPC servers share: health, reflection, metrics, limits, shutdown.

`serve` starts an asyncio gRPC server with
- grpc.health.v1: the service "liveness" is SERVING from the moment the port
  opens until the process ends (a liveness probe); the overall status ""
  and each API service go SERVING once `ready` has run, then follow `watch`
  if one is given (a readiness probe: whether this process can serve);
  "dependencies" follows `dependencies` if given (what the process needs
  from elsewhere: reported, never a reason to leave the load balancer,
  or one failing dependency would empty every replica at once);
- with `--health-port`, the same health statuses on a second, plaintext
  server that has nothing else: probes that cannot speak TLS (Kubernetes'
  gRPC probes) reach it while the service port is TLS-only;
- server reflection, unless switched off;
- the RpcInterceptor (request ids, per-RPC metrics) and a Prometheus
  endpoint on its own port;
and on SIGTERM or SIGINT turns health NOT_SERVING (health Watch streams
say so and end: they would hold the stop), refuses new calls and lets
in-flight calls finish within the grace period before returning (the
process then exits 0).
"""
from __future__ import annotations

import asyncio
import logging
import signal
from typing import AsyncIterator, Awaitable, Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from imagesearch import tracing
from imagesearch.channels import channel_options
from imagesearch.health_servicer import HealthServicer
from imagesearch.flags import ServerConfig, exit_startup
from imagesearch.observability import RpcInterceptor, start_metrics
from imagesearch.security import (SecurityConfigError, TokenAuthInterceptor, Tokens,
                                  server_credentials)

log = logging.getLogger(__name__)

OVERALL = ""  # the health service name that means "the whole server": readiness
LIVENESS = "liveness"
DEPENDENCIES = "dependencies"
# Connections are closed (with GOAWAY, after in-flight calls) at this age, so
# clients re-resolve DNS and spread onto replicas added since they connected.
_MAX_CONNECTION_AGE_MS = 300_000


async def serve(config: ServerConfig, *, name: str, register: Callable[[grpc.aio.Server], None],
                service_names: list[str], ready: Callable[[], Awaitable[None]] | None = None,
                watch: Callable[[], AsyncIterator[bool]] | None = None,
                dependencies: Callable[[], AsyncIterator[bool]] | None = None,
                tokens: Tokens | None = None, share_port: bool = False) -> None:
    """Run a server until SIGTERM/SIGINT.

    `register` adds the servicers; `ready` (optional) runs after the port is
    bound and before health says SERVING, e.g. a warm-up encode; `watch`
    (optional) yields whether the server can serve now, e.g. whether its
    model works, and readiness follows it; `dependencies` (optional) yields
    whether they all answer, and the "dependencies" health name follows it.
    With `tokens`, every call but health checks needs one of them
    (TokenAuthInterceptor); with `config.tls_cert`, the port serves TLS only.
    `share_port` (the search service's --workers) binds with SO_REUSEPORT, so
    processes of one deployment share the port; otherwise a port another
    process holds is a start-up error, never a silent split of its calls.
    """
    start_metrics(config.metrics_port, config.host, name)
    reuse = [("grpc.so_reuseport", int(share_port))]
    server = grpc.aio.server(
        interceptors=[*tracing.server_interceptors(), RpcInterceptor(),
                      *([TokenAuthInterceptor(tokens)] if tokens else [])],
        options=channel_options(config.max_message_mb << 20) + [
            ("grpc.max_connection_age_ms", _MAX_CONNECTION_AGE_MS),
            ("grpc.max_connection_age_grace_ms", int(config.grace_s * 1000)),
            ("grpc.max_concurrent_streams", config.max_streams),
            # Let clients probe idle connections with keepalive pings (ours do, every 10 s).
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000)] + reuse)
    register(server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    if config.reflection:
        reflection.enable_server_reflection(
            [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME], server)

    def setter(names: list[str]) -> Callable[[bool], Awaitable[None]]:
        async def set_health(serving: bool) -> None:
            state = health_pb2.HealthCheckResponse.SERVING if serving else \
                health_pb2.HealthCheckResponse.NOT_SERVING
            for service in names:
                await health.set(service, state)
        return set_health

    set_ready = setter([OVERALL, *service_names])
    await set_ready(False)
    if dependencies is not None:
        await health.set(DEPENDENCIES, health_pb2.HealthCheckResponse.NOT_SERVING)
    if config.tls_cert:
        try:
            credentials = server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca)
        except SecurityConfigError as exc:  # checked at start (check_server_flags); changed since
            exit_startup(f"{name}: {exc}")
        port = _bind(lambda: server.add_secure_port(config.address, credentials))
    else:
        port = _bind(lambda: server.add_insecure_port(config.address))
    if port == 0:
        exit_startup(f"{name}: cannot listen on {config.address} (port in use or bad address): "
                     "pick another --port")
    health_server = await _start_health_only(config, name, health, reuse)
    await server.start()
    await health.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    if ready is not None:
        await ready()
    log.info("%s listening on %s:%d (%s%s)", name, config.host, port,
             "mutual TLS" if config.tls_client_ca else "TLS" if config.tls_cert else "plaintext",
             ", token required" if tokens else "")
    watchers = []
    if watch is None:
        await set_ready(True)
    else:
        watchers.append(asyncio.create_task(_follow(watch, set_ready)))
    if dependencies is not None:
        watchers.append(asyncio.create_task(_follow(dependencies, setter([DEPENDENCIES]))))

    await stop.wait()
    for watcher in watchers:
        watcher.cancel()
    log.info("%s shutting down: finishing in-flight calls for up to %.1f s", name, config.grace_s)
    await health.enter_graceful_shutdown()
    await server.stop(config.grace_s)
    if health_server is not None:
        await health_server.stop(None)
    log.info("%s stopped", name)


async def _start_health_only(config: ServerConfig, name: str, health: HealthServicer,
                             options: list[tuple[str, int]]) -> grpc.aio.Server | None:
    """The plaintext health-only server of `--health-port`, sharing `health`,
    so both ports always answer the same; None when the flag is 0."""
    if not config.health_port:
        return None
    server = grpc.aio.server(options=options)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    if _bind(lambda: server.add_insecure_port(f"{config.host}:{config.health_port}")) == 0:
        exit_startup(f"{name}: cannot listen on {config.host}:{config.health_port} (port in use "
                     "or bad address): pick another --health-port")
    await server.start()
    log.info("%s health checks in plaintext on %s:%d", name, config.host, config.health_port)
    return server


def _bind(add: Callable[[], int]) -> int:
    """The port `add` bound, or 0 when it could not: grpcio raises
    RuntimeError where older releases returned 0 (a port in use)."""
    try:
        return add()
    except RuntimeError:
        return 0


async def _follow(watch: Callable[[], AsyncIterator[bool]],
                  set_ready: Callable[[bool], Awaitable[None]]) -> None:
    async for serving in watch():
        await set_ready(serving)
