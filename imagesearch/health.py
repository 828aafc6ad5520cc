"""Ask a server's standard grpc.health.v1 service; wait until it is SERVING."""
from __future__ import annotations

import time
from typing import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def status(address: str, timeout_s: float = 2.0, service: str = "",
           credentials: grpc.ChannelCredentials | None = None) -> str:
    """SERVING, NOT_SERVING, ... or UNREACHABLE. `credentials` for a TLS port."""
    channel = grpc.secure_channel(address, credentials) if credentials else \
        grpc.insecure_channel(address)
    with channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError:
            return "UNREACHABLE"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def wait_serving(address: str, timeout_s: float, alive: Callable[[], bool] = lambda: True,
                 service: str = "", credentials: grpc.ChannelCredentials | None = None) -> None:
    """Block until `service` is SERVING; raise TimeoutError, or RuntimeError
    once `alive()` is false."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"the process serving {address} exited")
        if status(address, timeout_s=1.0, service=service, credentials=credentials) == "SERVING":
            return
        time.sleep(0.2)
    raise TimeoutError(f"{address} not SERVING after {timeout_s:.0f} s")
