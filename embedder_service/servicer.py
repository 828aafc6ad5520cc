"""The imagesearch.v1.EmbedderService gRPC servicer.

The event loop only validates and answers. Images are decoded off it: JPEGs
the GPU decoder takes (device_images.py) on two decode threads with their
own CUDA streams, everything else in the preprocess pool (threads or
processes). Texts and pixels go through one dynamic batcher each, and each
batcher has a model thread of its own: a text query never waits behind
image batches (which may take seconds on a CPU), and passes of one kind
never interleave. Requests larger than a model batch are cut into batches,
so image requests share their thread fairly too.
"""
from __future__ import annotations

import asyncio
import io
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
from PIL import Image

from embedder_service.batcher import Batcher, Expired, QueueFull, Reservation
from embedder_service.config import EmbedderConfig
from embedder_service.device_images import DeviceDecodeUnavailable, DeviceJpegDecoder
from embedder_service.model import ClipEncoder
from embedder_service.model_health import ModelHealth
from embedder_service.preprocess import declared_cost
from embedder_service.workers import PreprocessPool, tasks
from imagesearch.status import abort_bad_request
from imagesearch.v1 import embedder_pb2, embedder_pb2_grpc

log = logging.getLogger(__name__)

_MAX_LISTED = 10  # bad items named in one error message
_DECODE_THREADS = 2  # GPU decode calls in flight: one decodes while the other resizes


def _bad_items_message(kind: str, bad: list[tuple[int, str]]) -> str:
    listed = "; ".join(f"{kind}[{i}]: {why}" for i, why in bad[:_MAX_LISTED])
    more = f"; and {len(bad) - _MAX_LISTED} more" if len(bad) > _MAX_LISTED else ""
    return f"{len(bad)} bad item(s): {listed}{more}"


def _row_chunks(parts: list, size: int) -> list[list]:
    """The rows of `parts` (arrays or tensors, in order) as consecutive runs
    of at most `size` rows, each a list of slices of the parts."""
    chunks, current, room = [], [], size
    for part in parts:
        start = 0
        while start < len(part):
            take = min(room, len(part) - start)
            current.append(part[start:start + take])
            start, room = start + take, room - take
            if room == 0:
                chunks.append(current)
                current, room = [], size
    if current:
        chunks.append(current)
    return chunks


class EmbedderServicer(embedder_pb2_grpc.EmbedderServiceServicer):
    def __init__(self, encoder: ClipEncoder, config: EmbedderConfig) -> None:
        self._encoder = encoder
        self._config = config
        self._text_thread = ThreadPoolExecutor(1, thread_name_prefix="model-text")
        self._image_thread = ThreadPoolExecutor(1, thread_name_prefix="model-image")
        limits = dict(max_batch=config.batch_size, max_wait_s=config.batch_wait_ms / 1000,
                      max_queue=config.max_queue)
        self.health = ModelHealth(self._probe)
        self.texts = Batcher("text", lambda payloads: encoder.encode_texts(
            [text for texts in payloads for text in texts]), self._text_thread, **limits,
            on_batch=lambda ok, why: self.health.record("text", ok, why))
        self.images = Batcher("image", lambda payloads: encoder.encode_images(
            [part for parts in payloads for part in parts]), self._image_thread, **limits,
            on_batch=lambda ok, why: self.health.record("image", ok, why))
        self._decoding_cost = 0  # of admitted images not decoded yet, in baseline-JPEG pixels
        mode = config.preprocess_mode
        if mode == "auto":
            mode = "process" if encoder.device.type == "cuda" else "thread"
        self._preprocess_pool = PreprocessPool(mode, config.preprocess_workers,
                                               encoder.preprocessor, config.max_image_pixels)
        self._jpeg_decoder = self._device_decoder(config.image_decode)
        self._decode_threads = (ThreadPoolExecutor(_DECODE_THREADS, thread_name_prefix="gpu-decode")
                                if self._jpeg_decoder else None)
        info = encoder.info
        self._identity = embedder_pb2.ModelIdentity(name=info.name, fingerprint=info.fingerprint,
                                                    dim=info.dim)
        self._info = embedder_pb2.GetModelInfoResponse(
            model=self._identity, device=info.device, dtype=info.dtype,
            max_text_tokens=info.max_text_tokens,
            limits=embedder_pb2.Limits(max_batch_items=config.max_batch_items,
                                       max_request_bytes=config.max_message_mb << 20,
                                       max_image_pixels=config.max_image_pixels))

    def _device_decoder(self, choice: str) -> DeviceJpegDecoder | None:
        """The GPU JPEG decoder, or None for `cpu`. `gpu` that cannot work
        raises DeviceDecodeUnavailable (a start-up error); `auto` says why
        it falls back to the CPU."""
        if choice == "cpu":
            return None
        try:
            decoder = DeviceJpegDecoder(self._encoder.preprocessor, self._encoder.device)
        except DeviceDecodeUnavailable as exc:
            if choice == "gpu":
                raise
            log.info("images are decoded on the CPU: %s", exc)
            return None
        log.info("JPEGs are decoded and resized on %s (nvJPEG)", self._encoder.device)
        return decoder

    async def _check_count(self, kind: str, count: int, context: grpc.aio.ServicerContext) -> None:
        if count == 0:
            await abort_bad_request(context, f"no {kind} in the request", [(kind, "empty")])
        if count > self._config.max_batch_items:
            why = (f"{count} {kind} in one request; the limit is "
                   f"{self._config.max_batch_items}: split the request")
            await abort_bad_request(context, why, [(kind, why)])

    async def _encode(self, batcher: Batcher, chunks: list[tuple[object, int]],
                      context: grpc.aio.ServicerContext,
                      reservation: Reservation | None = None) -> np.ndarray:
        """The vectors of a request, submitted as `chunks` of at most one model
        batch each: the model thread runs one batch at a time, so a small
        text request waits for at most one batch of a large image request,
        never for all of it."""
        # A call that expired or was cancelled before its batch runs costs no model time.
        remaining = context.time_remaining()
        if context.cancelled() or (remaining is not None and remaining <= 0):
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed before encoding")
        tasks = [asyncio.ensure_future(batcher.submit(payload, count, remaining, reservation))
                 for payload, count in chunks]
        try:
            vectors = np.concatenate(await asyncio.gather(*tasks))
        except QueueFull as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except Expired as exc:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc))
        except Exception as exc:  # noqa: BLE001 - the model failed (e.g. out of memory)
            await context.abort(grpc.StatusCode.INTERNAL,
                                f"encoding failed: {type(exc).__name__}: {exc}")
        finally:
            for task in tasks:  # one chunk failed: the others need not run
                task.cancel()
        return vectors

    def _embeddings(self, vectors: np.ndarray, errors: dict[int, str] | None = None):
        errors = errors or {}
        rows = iter(vectors.astype("<f4", copy=False))
        total = len(vectors) + len(errors)
        return [embedder_pb2.Embedding(error=errors[i]) if i in errors
                else embedder_pb2.Embedding(vector=next(rows).tobytes()) for i in range(total)]

    async def EncodeText(self, request, context):
        texts = list(request.texts)
        await self._check_count("texts", len(texts), context)
        bad = [(i, "empty or only whitespace") for i, t in enumerate(texts) if not t.strip()]
        if bad:
            await abort_bad_request(context, _bad_items_message("texts", bad),
                                    [(f"texts[{i}]", why) for i, why in bad])
        size = self._config.batch_size
        chunks = [texts[start:start + size] for start in range(0, len(texts), size)]
        vectors = await self._encode(self.texts, [(chunk, len(chunk)) for chunk in chunks], context)
        return embedder_pb2.EncodeTextResponse(embeddings=self._embeddings(vectors),
                                               model=self._identity)

    def _admit_images(self, count: int, cost: int) -> Reservation:
        """The one admission of an image request, before any decoding: room
        in the model queue for `count` images, held through decoding until
        they are queued, and `cost` of decode work within --max-decode-mpx
        (always admitted when nothing else is decoding, so one image at its
        limit always fits). QueueFull otherwise."""
        limit = self._config.max_decode_mpx * 1_000_000
        if self._decoding_cost and self._decoding_cost + cost > limit:
            raise QueueFull(f"decoding is at its bound ({self._decoding_cost / 1e6:.0f} of "
                            f"{limit / 1e6:.0f} Mpx of decode work admitted; this request adds "
                            f"{cost / 1e6:.0f}): retry with backoff, or add replicas")
        return self.images.reserve(count)

    async def EncodeImage(self, request, context):
        images = list(request.images)
        await self._check_count("images", len(images), context)
        costs = [declared_cost(data) for data in images]  # headers only
        try:  # refuse before decoding anything
            reservation = self._admit_images(len(images), sum(costs))
        except QueueFull as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.time() + remaining
        with reservation:  # images that fail, or a call that ends, give their room back
            self._decoding_cost += sum(costs)
            try:  # work left for a call that has ended is skipped
                parts, order, errors = await self._prepare(images, costs, deadline)
            finally:
                self._decoding_cost -= sum(costs)
            if deadline is not None and time.time() > deadline:  # images were skipped, not bad
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                    "deadline passed while decoding")
            if errors and not request.allow_partial:
                bad = sorted(errors.items())
                await abort_bad_request(context, _bad_items_message("images", bad),
                                        [(f"images[{i}]", why) for i, why in bad])
            vectors = np.zeros((0, self._identity.dim), dtype=np.float32)
            if order:
                chunks = _row_chunks(parts, self._config.batch_size)
                vectors = await self._encode(self.images, [(chunk, sum(map(len, chunk)))
                                                           for chunk in chunks], context, reservation)
        return embedder_pb2.EncodeImageResponse(
            embeddings=self._embeddings(vectors[np.argsort(order)], errors), model=self._identity)

    async def _prepare(self, images: list[bytes], costs: list[int], deadline: float | None):
        """(parts, order, errors): batches of crops of the usable images, whose
        indices are `order` (the parts' rows in that order), and why the
        others are not usable. JPEGs the GPU takes are decoded there while
        the preprocess pool takes the rest; if nvJPEG refuses its batch,
        those go to the pool too, and Pillow names any bad one."""
        pixels = [self._jpeg_decoder.pixels(data, self._config.max_image_pixels)
                  if self._jpeg_decoder else 0 for data in images]
        on_device = [i for i, count in enumerate(pixels) if count]
        on_cpu = [i for i, count in enumerate(pixels) if not count]
        parts, order = [], []
        on_gpu, on_pool = await asyncio.gather(
            self._decode_on_device(images, pixels, on_device),
            self._decode_on_cpu(images, on_cpu, costs, deadline))
        if on_gpu is not None:
            parts.append(on_gpu)
            order += on_device
        elif on_device:  # refused: Pillow decodes those too
            on_pool += await self._decode_on_cpu(images, on_device, costs, deadline)
        errors = {i: p for i, p in on_pool if isinstance(p, str)}
        good = [(i, p) for i, p in on_pool if not isinstance(p, str)]
        if good:
            parts.append(np.stack([p for _, p in good]))
            order += [i for i, _ in good]
        return parts, order, errors

    async def _decode_on_device(self, images: list[bytes], pixels: list[int], index: list[int]):
        """Crops of images[index] on the device; None if nvJPEG refused them."""
        if not index:
            return None
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._decode_threads, self._jpeg_decoder.crops, [images[i] for i in index],
                [pixels[i] for i in index])
        except Exception as exc:  # noqa: BLE001 - Pillow will name the bad image
            log.info("nvJPEG refused a batch of %d images (%s); decoding them on the CPU",
                     len(index), exc)
            return None

    async def _decode_on_cpu(self, images: list[bytes], index: list[int], costs: list[int],
                             deadline: float | None) -> list[tuple[int, object]]:
        """(i, crop or the reason it failed) for images[index], in the preprocess
        pool. If the call ends first, tasks not started are cancelled (and
        started ones skip what the deadline has passed)."""
        groups = [[index[j] for j in group] for group in tasks([costs[i] for i in index])]
        chunks = await asyncio.gather(*(
            self._preprocess_pool.prepare([images[i] for i in group], deadline) for group in groups))
        return list(zip((i for group in groups for i in group), (p for chunk in chunks for p in chunk)))

    async def GetModelInfo(self, request, context):
        return self._info

    async def _probe(self) -> None:
        """One text and one image through the model, as a health check."""
        loop = asyncio.get_running_loop()
        height, width = self._encoder.preprocessor.crop_size
        await loop.run_in_executor(self._text_thread, self._encoder.encode_texts, ["probe"])
        await loop.run_in_executor(self._image_thread, self._encoder.encode_images,
                                   [np.zeros((1, height, width, 3), dtype=np.uint8)])

    async def warm_up(self) -> None:
        """Both encoders at batch 1 and at the full batch size, and every
        preprocessing worker once (a process pool starts its processes on
        first use), so the first real calls meet no lazy initialisation."""
        loop = asyncio.get_running_loop()
        height, width = self._encoder.preprocessor.crop_size
        for n in sorted({1, self._config.batch_size}):
            crops = np.zeros((n, height, width, 3), dtype=np.uint8)
            await loop.run_in_executor(self._text_thread, self._encoder.encode_texts, ["warm up"] * n)
            await loop.run_in_executor(self._image_thread, self._encoder.encode_images, [crops])
        jpeg = io.BytesIO()
        Image.new("RGB", (2 * width, 2 * height), (128, 128, 128)).save(jpeg, format="JPEG")
        await asyncio.gather(*(self._preprocess_pool.prepare([jpeg.getvalue()])
                               for _ in range(self._preprocess_pool.workers)))
