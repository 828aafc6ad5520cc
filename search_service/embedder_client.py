"""The search service's client of the embedder: deadlines and error mapping.

Every call carries a timeout no longer than what is left of the caller's own
deadline, so an embedder call never outlives the request it serves.
"""
from __future__ import annotations

import grpc
import numpy as np

from imagesearch.serving import channel_options
from imagesearch.v1 import embedder_pb2, embedder_pb2_grpc
from search_service.errors import (DeadlineExceeded, DependencyUnavailable, InvalidArgument,
                                   Overloaded, ServiceError)
from search_service.store import ModelIdentity

_MARGIN_S = 0.02  # left to the caller's side to write its answer
# Calls fail fast (UNAVAILABLE) while the embedder is down; these keep the
# channel's reconnect backoff short, so it recovers within a second of the
# embedder coming back instead of gRPC's default of up to two minutes.
_RECONNECT = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
              ("grpc.max_reconnect_backoff_ms", 1000)]


class EmbedderClient:
    def __init__(self, target: str, timeout_s: float, max_message_bytes: int) -> None:
        self._target = target
        self._timeout_s = timeout_s
        self._channel = grpc.aio.insecure_channel(
            target, options=channel_options(max_message_bytes) + _RECONNECT)
        self._stub = embedder_pb2_grpc.EmbedderStub(self._channel)
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

    async def model(self, context: grpc.aio.ServicerContext | None = None) -> ModelIdentity:
        """The embedder's model; asked once, and again after the embedder was unreachable."""
        if self._model is None:
            try:
                info = await self._stub.GetModelInfo(embedder_pb2.GetModelInfoRequest(),
                                                     timeout=self._timeout(context))
            except grpc.aio.AioRpcError as exc:
                raise self._error(exc) from exc
            self._model = ModelIdentity(name=info.name, fingerprint=info.fingerprint, dim=info.dim)
        return self._model

    async def encode_text(self, text: str, context: grpc.aio.ServicerContext) -> np.ndarray:
        try:
            response = await self._stub.EncodeText(embedder_pb2.EncodeTextRequest(texts=[text]),
                                                   timeout=self._timeout(context))
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from exc
        return np.frombuffer(response.embeddings[0].vector, dtype="<f4")

    async def encode_images(self, images: list[bytes],
                            context: grpc.aio.ServicerContext) -> list[np.ndarray | str]:
        """One vector, or the reason the image could not be encoded, per image."""
        try:
            response = await self._stub.EncodeImage(
                embedder_pb2.EncodeImageRequest(images=images, allow_partial=True),
                timeout=self._timeout(context))
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from exc
        return [item.error or np.frombuffer(item.vector, dtype="<f4") for item in response.embeddings]

    async def close(self) -> None:
        await self._channel.close()
