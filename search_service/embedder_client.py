"""The search service's client of the embedder: deadlines and error mapping.

Every call carries a timeout no longer than what is left of the caller's own
deadline, so an embedder call never outlives the request it serves, and the
caller's request id, so both services' logs tell one story.

The target may name several embedders: a DNS name with many addresses
(`dns:///embedder-headless:50051`, a Kubernetes headless Service) or a list
(`ipv4:10.0.0.1:50051,10.0.0.2:50051`). Calls go round-robin over all of
them, and a call that finds its embedder gone is retried on another.
"""
from __future__ import annotations

import json

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from imagesearch import tracing
from imagesearch.observability import outgoing_metadata
from imagesearch.serving import channel_options
from imagesearch.v1 import embedder_pb2, embedder_pb2_grpc
from search_service.errors import (DeadlineExceeded, DependencyUnavailable, InvalidArgument,
                                   Overloaded, ServiceError)
from search_service.store import ModelIdentity

_SERVICE = embedder_pb2.DESCRIPTOR.services_by_name["Embedder"].full_name
_MARGIN_S = 0.02  # left to the caller's side to write its answer
# Calls fail fast (UNAVAILABLE) while the embedder is down; these keep the
# channel's reconnect backoff short, so it recovers within a second of the
# embedder coming back instead of gRPC's default of up to two minutes.
_RECONNECT = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
              ("grpc.max_reconnect_backoff_ms", 1000),
              # A connection whose peer went silent (network cut, host gone) is
              # dropped within 15 s instead of waiting on TCP for minutes.
              ("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_timeout_ms", 5_000),
              ("grpc.keepalive_permit_without_calls", 1)]
# Every embedder method is idempotent, so an UNAVAILABLE (the replica died
# under the call) is retried, on another replica where there is one.
_SERVICE_CONFIG = json.dumps({
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [{
        "name": [{"service": _SERVICE}],
        "retryPolicy": {"maxAttempts": 3, "initialBackoff": "0.05s", "maxBackoff": "0.5s",
                        "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}}]})
_BALANCING = [("grpc.service_config", _SERVICE_CONFIG), ("grpc.enable_retries", 1)]


class EmbedderClient:
    def __init__(self, target: str, timeout_s: float, max_message_bytes: int,
                 credentials: grpc.ChannelCredentials | None = None) -> None:
        """`credentials`: TLS (see imagesearch.security); None for plaintext."""
        self._target = target
        self._timeout_s = timeout_s
        options = channel_options(max_message_bytes) + _RECONNECT + _BALANCING
        self._channel = grpc.aio.secure_channel(target, credentials, options) if credentials \
            else grpc.aio.insecure_channel(target, options)
        self._stub = embedder_pb2_grpc.EmbedderStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._model: ModelIdentity | None = None

    def _timeout(self, context: grpc.aio.ServicerContext | None) -> float:
        remaining = context.time_remaining() if context is not None else None
        if remaining is None:
            return self._timeout_s
        if remaining <= _MARGIN_S:
            raise DeadlineExceeded("the caller's deadline passed before the embedder was called")
        return min(self._timeout_s, remaining - _MARGIN_S)

    def _error(self, exc: grpc.aio.AioRpcError) -> ServiceError:
        code, details = exc.code(), exc.details()
        if code == grpc.StatusCode.UNAVAILABLE:
            self._model = None  # it may come back with another model
            return DependencyUnavailable(f"embedder at {self._target} is unavailable: {details}")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return DeadlineExceeded(f"embedder at {self._target} did not answer in time")
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return InvalidArgument(details)
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return Overloaded(f"embedder at {self._target}: {details}")
        return ServiceError(f"embedder at {self._target} failed: {code.name}: {details}")

    async def _call(self, method: str, request, context: grpc.aio.ServicerContext | None):
        timeout = self._timeout(context)
        with tracing.client_span(f"{_SERVICE}/{method}"):
            try:
                return await getattr(self._stub, method)(request, timeout=timeout,
                                                         metadata=outgoing_metadata())
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and timeout == self._timeout_s:
                    # Our own limit ran out, not the caller's deadline: the
                    # embedder is too slow or unreachable, and a retry may help.
                    raise DependencyUnavailable(f"embedder at {self._target} did not answer "
                                                f"within {self._timeout_s:g} s") from exc
                raise self._error(exc) from exc

    async def model(self, context: grpc.aio.ServicerContext | None = None) -> ModelIdentity:
        """The embedder's model; asked once, and again after the embedder was unreachable."""
        if self._model is None:
            info = await self._call("GetModelInfo", embedder_pb2.GetModelInfoRequest(), context)
            self._model = ModelIdentity(name=info.name, fingerprint=info.fingerprint, dim=info.dim)
        return self._model

    async def encode_text(self, text: str, context: grpc.aio.ServicerContext) -> np.ndarray:
        response = await self._call("EncodeText", embedder_pb2.EncodeTextRequest(texts=[text]),
                                    context)
        return np.frombuffer(response.embeddings[0].vector, dtype="<f4")

    async def encode_images(self, images: list[bytes],
                            context: grpc.aio.ServicerContext) -> list[np.ndarray | str]:
        """One vector, or the reason the image could not be encoded, per image."""
        response = await self._call(
            "EncodeImage", embedder_pb2.EncodeImageRequest(images=images, allow_partial=True),
            context)
        return [item.error or np.frombuffer(item.vector, dtype="<f4") for item in response.embeddings]

    async def check(self, timeout_s: float) -> None:
        """Raise DependencyUnavailable unless an embedder says it is SERVING."""
        try:
            response = await self._health.Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise DependencyUnavailable(f"embedder at {self._target} is unavailable: "
                                        f"{exc.code().name}: {exc.details()}") from exc
        if response.status != health_pb2.HealthCheckResponse.SERVING:
            raise DependencyUnavailable(f"embedder at {self._target} is not serving")

    async def close(self) -> None:
        await self._channel.close()
