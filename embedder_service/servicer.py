"""The imagesearch.v1.Embedder gRPC servicer.

The event loop only validates and answers; image decoding runs on a thread
pool (Pillow releases the GIL); texts and pixels go through one dynamic
batcher each, and the model runs on one dedicated thread so that forward
passes never interleave.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
from prometheus_client import Gauge

from embedder_service.batcher import Batcher, Expired, QueueFull
from embedder_service.config import EmbedderConfig
from embedder_service.model import ClipEncoder
from embedder_service.workers import CHUNK, make_pool, prepare
from imagesearch.v1 import embedder_pb2, embedder_pb2_grpc

DECODING = Gauge("embedder_decoding_items",
                 "Image items admitted and being decoded; they count against --max-queue")

_MAX_LISTED = 10  # bad items named in one error message


def _bad_items_message(kind: str, bad: list[tuple[int, str]]) -> str:
    listed = "; ".join(f"{kind}[{i}]: {why}" for i, why in bad[:_MAX_LISTED])
    more = f"; and {len(bad) - _MAX_LISTED} more" if len(bad) > _MAX_LISTED else ""
    return f"{len(bad)} bad item(s): {listed}{more}"


class EmbedderServicer(embedder_pb2_grpc.EmbedderServicer):
    def __init__(self, encoder: ClipEncoder, config: EmbedderConfig) -> None:
        self._encoder = encoder
        self._config = config
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="model")
        limits = dict(max_batch=config.batch_size, max_wait_s=config.batch_wait_ms / 1000,
                      max_queue=config.max_queue)
        self.texts = Batcher("text", lambda payloads: encoder.encode_texts(
            [text for texts in payloads for text in texts]), self._model_thread, **limits)
        self.images = Batcher("image", lambda payloads: encoder.encode_images(
            np.concatenate(payloads)), self._model_thread, **limits)
        self._decoding = 0  # image items admitted and being decoded
        DECODING.set_function(lambda: self._decoding)
        mode = config.preprocess_mode
        if mode == "auto":
            mode = "process" if encoder.device.type == "cuda" else "thread"
        self._preprocess_pool = make_pool(mode, config.preprocess_workers,
                                          encoder.preprocessor, config.max_image_pixels)
        info = encoder.info
        self._info = embedder_pb2.ModelInfo(
            name=info.name, dim=info.dim, device=info.device, dtype=info.dtype,
            fingerprint=info.fingerprint, max_text_tokens=info.max_text_tokens,
            max_batch_items=config.max_batch_items)

    async def _check_count(self, kind: str, count: int, context: grpc.aio.ServicerContext) -> None:
        if count == 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"no {kind} in the request")
        if count > self._config.max_batch_items:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"{count} {kind} in one request; the limit is "
                                f"{self._config.max_batch_items}: split the request")

    async def _encode(self, batcher: Batcher, payload, count: int,
                      context: grpc.aio.ServicerContext) -> np.ndarray:
        # A call that expired or was cancelled before its batch runs costs no model time.
        remaining = context.time_remaining()
        if context.cancelled() or (remaining is not None and remaining <= 0):
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed before encoding")
        try:
            return await batcher.submit(payload, count, remaining)
        except QueueFull as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except Expired as exc:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc))
        except Exception as exc:  # noqa: BLE001 - the model failed (e.g. out of memory)
            await context.abort(grpc.StatusCode.INTERNAL,
                                f"encoding failed: {type(exc).__name__}: {exc}")

    @staticmethod
    def _response(vectors: np.ndarray, errors: dict[int, str] | None = None) -> embedder_pb2.EncodeResponse:
        errors = errors or {}
        rows = iter(vectors.astype("<f4", copy=False))
        total = len(vectors) + len(errors)
        items = [embedder_pb2.Embedding(error=errors[i]) if i in errors
                 else embedder_pb2.Embedding(vector=next(rows).tobytes()) for i in range(total)]
        return embedder_pb2.EncodeResponse(embeddings=items, dim=vectors.shape[1])

    async def EncodeText(self, request, context):
        texts = list(request.texts)
        await self._check_count("texts", len(texts), context)
        bad = [(i, "empty or only whitespace") for i, t in enumerate(texts) if not t.strip()]
        if bad:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _bad_items_message("texts", bad))
        vectors = await self._encode(self.texts, texts, len(texts), context)
        return self._response(vectors)

    async def EncodeImage(self, request, context):
        images = list(request.images)
        await self._check_count("images", len(images), context)
        try:  # refuse before decoding anything; images being decoded count as queued
            self.images.admit(len(images) + self._decoding)
        except QueueFull as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        loop = asyncio.get_running_loop()
        self._decoding += len(images)
        try:
            chunks = await asyncio.gather(*(loop.run_in_executor(self._preprocess_pool, prepare,
                                                                 images[i:i + CHUNK])
                                            for i in range(0, len(images), CHUNK)))
        finally:
            self._decoding -= len(images)
        prepared = [p for chunk in chunks for p in chunk]
        errors = {i: p for i, p in enumerate(prepared) if isinstance(p, str)}
        if errors and not request.allow_partial:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                _bad_items_message("images", sorted(errors.items())))
        good = [p for p in prepared if not isinstance(p, str)]
        if not good:
            return embedder_pb2.EncodeResponse(
                embeddings=[embedder_pb2.Embedding(error=errors[i]) for i in range(len(images))],
                dim=self._info.dim)
        vectors = await self._encode(self.images, np.stack(good), len(good), context)
        return self._response(vectors, errors)

    async def GetModelInfo(self, request, context):
        return self._info

    async def warm_up(self) -> None:
        """Both encoders at batch 1 and at the full batch size, so the first
        real calls of either shape meet no lazy initialisation."""
        loop = asyncio.get_running_loop()
        height, width = self._encoder.preprocessor.crop_size
        for n in sorted({1, self._config.batch_size}):
            crops = np.zeros((n, height, width, 3), dtype=np.uint8)
            await loop.run_in_executor(self._model_thread, self._encoder.encode_texts, ["warm up"] * n)
            await loop.run_in_executor(self._model_thread, self._encoder.encode_images, crops)
