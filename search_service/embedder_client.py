"""The search service's client of the embedder: deadlines and error mapping.

Every call carries a timeout no longer than what is left of the caller's own
deadline, so an embedder call never outlives the request it serves, and the
caller's request id, so both services' logs tell one story.

The target may name several embedders: a DNS name with many addresses
(`dns:///embedder-headless:50051`, a Kubernetes headless Service) or a list
(`ipv4:10.0.0.1:50051,10.0.0.2:50051`). Calls go round-robin over all of
them, and a call that finds its embedder gone is retried on another.

Replicas need not agree, and change under rolling updates, so nothing one of
them said is trusted for the next call:
- every response names its model, and a response from another model than
  the caller expects is never used: the call is retried (round-robin takes
  it to another replica) and, if no replica serves that model, fails with
  FAILED_PRECONDITION naming both;
- requests are sized to the limits an embedder reported (`GetModelInfo`),
  learned again whenever one refuses a request as too large.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import Histogram

from imagesearch import tracing
from imagesearch.observability import outgoing_metadata
from imagesearch.channels import channel_options
from imagesearch.v1 import embedder_pb2, embedder_pb2_grpc
from search_service.errors import (DeadlineExceeded, EmbedderUnavailable, ModelMismatch,
                                   Overloaded, ServiceError)
from search_service.domain import ModelIdentity
from search_service.wire import field_one_header

log = logging.getLogger(__name__)
CALLS = Histogram("search_embedder_call_seconds",
                  "The search service's calls to the embedder, by method and status code",
                  ["method", "code"],
                  buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))

_SERVICE = embedder_pb2.DESCRIPTOR.services_by_name["EmbedderService"].full_name
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
# under the call) or a CANCELLED that the replica sent (one shutting down
# fails calls it had received but not started) is retried, on another
# replica where there is one. A call our own caller cancelled is never
# retried: gRPC retries only answers from the server.
# Client-side health checking: round-robin sends calls only to replicas whose
# grpc.health.v1 status is SERVING, so one still warming up, or whose model
# keeps failing, gets none.
_SERVICE_CONFIG = json.dumps({
    "loadBalancingConfig": [{"round_robin": {}}],
    "healthCheckConfig": {"serviceName": ""},
    "methodConfig": [{
        "name": [{"service": _SERVICE}],
        "retryPolicy": {"maxAttempts": 3, "initialBackoff": "0.05s", "maxBackoff": "0.5s",
                        "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"]}}]})
_BALANCING = [("grpc.service_config", _SERVICE_CONFIG), ("grpc.enable_retries", 1)]
# Tries of a call whose answers come from another model than expected:
# round-robin sends each to the next replica.
_MODEL_ATTEMPTS = 4
_ITEM_OVERHEAD = 6  # protobuf bytes around each image in a request: tag and length
_REQUEST_OVERHEAD = 64  # the rest of a request: allow_partial, gRPC framing


@dataclass(frozen=True)
class Limits:
    """What one embedder request may hold."""
    max_items: int
    max_bytes: int


class _TooLarge(Exception):
    """An embedder refused a request we built as too large for it."""


def _identity(model: embedder_pb2.ModelIdentity) -> ModelIdentity:
    return ModelIdentity(name=model.name, fingerprint=model.fingerprint, dim=model.dim)


def _vectors(response) -> list[np.ndarray | str]:
    return [item.error or np.frombuffer(item.vector, dtype="<f4") for item in response.embeddings]


_ALLOW_PARTIAL = embedder_pb2.EncodeImageRequest(allow_partial=True).SerializeToString()


def _image_request(images: list[bytes]) -> bytes:
    """EncodeImageRequest(images=images, allow_partial=True) in wire form,
    each image copied once. protobuf's own serializer took 58 us per 37 KB
    image on the event loop (bench/ingest_cpu.py); this is one join. Field 1
    (`images`) is length-delimited: tag 0x0A, the length, the bytes."""
    parts = [_ALLOW_PARTIAL]
    for image in images:
        parts += (field_one_header(len(image)), image)
    return b"".join(parts)


class EmbedderPool:
    """The embedder replicas behind one address (round-robin over the SERVING
    ones), as the search service calls them: deadlines, limits, errors."""

    def __init__(self, target: str, timeout_s: float, max_message_bytes: int,
                 credentials: grpc.ChannelCredentials | None = None) -> None:
        """`credentials`: TLS (see imagesearch.security); None for plaintext."""
        self._target = target
        self._timeout_s = timeout_s
        self._max_message_bytes = max_message_bytes
        options = channel_options(max_message_bytes) + _RECONNECT + _BALANCING
        interceptors = tracing.client_interceptors()
        self._channel = grpc.aio.secure_channel(target, credentials, options,
                                                interceptors=interceptors) if credentials \
            else grpc.aio.insecure_channel(target, options, interceptors=interceptors)
        self._stub = embedder_pb2_grpc.EmbedderServiceStub(self._channel)
        # EncodeImage with a request already in wire form (`_image_request`).
        self._raw = {"EncodeImage": self._channel.unary_unary(
            f"/{_SERVICE}/EncodeImage", request_serializer=None,
            response_deserializer=embedder_pb2.EncodeImageResponse.FromString)}
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._limits: Limits | None = None

    def _timeout(self, context: grpc.aio.ServicerContext | None) -> float:
        remaining = context.time_remaining() if context is not None else None
        if remaining is None:
            return self._timeout_s
        if remaining <= _MARGIN_S:
            raise DeadlineExceeded("the caller's deadline passed before the embedder was called")
        return min(self._timeout_s, remaining - _MARGIN_S)

    def _error(self, exc: grpc.aio.AioRpcError) -> Exception:
        code, details = exc.code(), exc.details() or ""
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
            # CANCELLED here came from the embedder (a replica going away):
            # a caller's own cancel ends the call before any answer is read.
            return EmbedderUnavailable(f"embedder at {self._target} is unavailable: "
                                         f"{code.name}: {details}")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return DeadlineExceeded(f"embedder at {self._target} did not answer in time")
        # This service validated the caller's input and sized the request itself, so
        # a refusal is about a limit of the embedder, never the caller's mistake.
        if code == grpc.StatusCode.INVALID_ARGUMENT or (
                code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than" in details):
            return _TooLarge(details)
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return Overloaded(f"embedder at {self._target}: {details}")
        return ServiceError(f"embedder at {self._target} failed: {code.name}: {details}")

    async def _call(self, method: str, request, context: grpc.aio.ServicerContext | None):
        timeout = self._timeout(context)
        started, code = time.perf_counter(), "OK"
        try:
            call = self._raw[method] if isinstance(request, bytes) else \
                getattr(self._stub, method)
            return await call(request, timeout=timeout, metadata=outgoing_metadata())
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and timeout == self._timeout_s:
                # Our own limit ran out, not the caller's deadline: the
                # embedder is too slow or unreachable, and a retry may help.
                raise EmbedderUnavailable(f"embedder at {self._target} did not answer "
                                            f"within {self._timeout_s:g} s") from exc
            raise self._error(exc) from exc
        finally:
            CALLS.labels(method, code).observe(time.perf_counter() - started)

    async def _encode(self, method: str, request, count: int, expect: ModelIdentity | None,
                      context):
        """A response with `count` vectors from the `expect`ed model (any model
        when None), and that model."""
        for _ in range(_MODEL_ATTEMPTS):
            response = await self._call(method, request, context)
            model = _identity(response.model)
            if expect is None or expect.same(model):
                self._check_shape(response, count, model)
                return response, model
            log.warning("embedder at %s answered with model %s, not %s: trying another replica",
                        self._target, model, expect)
        raise ModelMismatch(f"the embedder at {self._target} serves model {model}, but this "
                            f"collection holds vectors of model {expect}: run embedders with the "
                            "collection's model, or use another collection")

    def _check_shape(self, response, count: int, model: ModelIdentity) -> None:
        """One embedding per item, each of the model's dimension: anything else
        is never written (an INTERNAL error, not a vector)."""
        sizes = {len(item.vector) for item in response.embeddings if not item.error}
        if len(response.embeddings) != count or sizes - {4 * model.dim}:
            raise ServiceError(f"embedder at {self._target} answered {len(response.embeddings)} "
                               f"embeddings of {sorted(sizes)} bytes for {count} items of a "
                               f"{model.dim}-d model")

    async def model_info(self, context: grpc.aio.ServicerContext | None = None) -> ModelIdentity:
        """One embedder's model; learns its limits too."""
        info = await self._call("GetModelInfo", embedder_pb2.GetModelInfoRequest(), context)
        limits = Limits(max_items=info.limits.max_batch_items,
                        max_bytes=min(info.limits.max_request_bytes, self._max_message_bytes))
        if limits != self._limits:
            log.info("embedder limits: %d items and %d bytes per request", limits.max_items,
                     limits.max_bytes)
            self._limits = limits
        return _identity(info.model)

    async def _current_limits(self, context) -> Limits:
        if self._limits is None:
            await self.model_info(context)
        return self._limits

    async def encode_text(self, text: str, expect: ModelIdentity | None,
                          context: grpc.aio.ServicerContext) -> np.ndarray:
        try:
            response, _ = await self._encode("EncodeText", embedder_pb2.EncodeTextRequest(texts=[text]),
                                             1, expect, context)
        except _TooLarge as exc:
            raise ServiceError(f"embedder at {self._target} refused a one-text request: {exc}") from exc
        return np.frombuffer(response.embeddings[0].vector, dtype="<f4")

    async def encode_images(self, images: list[bytes], expect: ModelIdentity | None,
                            context: grpc.aio.ServicerContext
                            ) -> tuple[list[np.ndarray | str], ModelIdentity | None]:
        """One vector, or the reason it could not be made, per image, all from
        one model: `expect`, or when None the model of the first answer. Also
        that model (None when no image was sent). Requests are cut to the
        embedder's limits; a refusal as too large teaches new limits once."""
        for attempt in range(2):
            limits = await self._current_limits(context)
            try:
                return await self._encode_within(images, limits, expect, context)
            except _TooLarge as exc:
                if attempt:
                    raise ServiceError(f"embedder at {self._target} refused a request sized to "
                                       f"its limits ({limits}): {exc}") from exc
                log.info("embedder at %s refused a request as too large (%s): asking its limits "
                         "again", self._target, exc)
                self._limits = None
        raise AssertionError("unreachable")

    async def _encode_within(self, images: list[bytes], limits: Limits,
                             expect: ModelIdentity | None, context):
        results: list[np.ndarray | str] = [""] * len(images)
        requests: list[list[int]] = [[]]
        size = _REQUEST_OVERHEAD
        for i, image in enumerate(images):
            cost = len(image) + _ITEM_OVERHEAD
            if cost + _REQUEST_OVERHEAD > limits.max_bytes:
                results[i] = (f"image is {len(image)} bytes; the embedder takes at most "
                              f"{limits.max_bytes - _REQUEST_OVERHEAD - _ITEM_OVERHEAD}")
                continue
            if requests[-1] and (len(requests[-1]) == limits.max_items
                                 or size + cost > limits.max_bytes):
                requests.append([])
                size = _REQUEST_OVERHEAD
            requests[-1].append(i)
            size += cost
        requests = [r for r in requests if r]

        async def send(index: list[int]) -> ModelIdentity:
            request = _image_request([images[i] for i in index])
            response, model = await self._encode("EncodeImage", request, len(index), expect,
                                                 context)
            for i, vector in zip(index, _vectors(response)):
                results[i] = vector
            return model

        if requests and expect is None:  # the first answer says which model all must be from
            expect = await send(requests.pop(0))
        await asyncio.gather(*(send(index) for index in requests))
        return results, expect

    async def check(self, timeout_s: float) -> None:
        """Raise EmbedderUnavailable unless an embedder says it is SERVING."""
        try:
            response = await self._health.Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise EmbedderUnavailable(f"embedder at {self._target} is unavailable: "
                                        f"{exc.code().name}: {exc.details()}") from exc
        if response.status != health_pb2.HealthCheckResponse.SERVING:
            raise EmbedderUnavailable(f"embedder at {self._target} is not serving")

    async def close(self) -> None:
        await self._channel.close()
