"""Image decoding and preprocessing off the event loop, in threads or processes.

Pillow releases the GIL while it decodes and resizes, but not for the rest;
with many cores a process pool scales further (bench/ measures both). The
workers hold their own Preprocessor, built once from the checkpoint's
settings, and get image bytes in chunks so that the cost of crossing into a
process is paid per chunk, not per image.
"""
from __future__ import annotations

import asyncio
import functools
import multiprocessing
import time
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any

import numpy as np

from embedder_service.preprocess import ImageDecodeError, Preprocessor, decode_image

CHUNK = 4  # images per task, at most
CHUNK_COST = 8_000_000  # decode cost per task, at most (in baseline-JPEG pixels; one dearer image goes alone)

# Set by the initializer in each worker *process* only (a process has one
# job); thread pools bind their settings to the pool object instead.
_in_process: tuple[Preprocessor, int] | None = None


def _setup_process(config: dict[str, Any], max_pixels: int) -> None:
    global _in_process
    _in_process = (Preprocessor.from_config(config), max_pixels)


def _prepare_in_process(images: list[bytes], deadline: float | None) -> list[np.ndarray | str]:
    return prepare(*_in_process, images, deadline)


def tasks(costs: list[int]) -> list[list[int]]:
    """Indices of consecutive images grouped into pool tasks: up to CHUNK
    images and CHUNK_COST of decode cost each, so that a task is short and a
    request whose caller has gone stops within one task."""
    out: list[list[int]] = []
    total = 0
    for i, cost in enumerate(costs):
        if not out or len(out[-1]) == CHUNK or total + cost > CHUNK_COST:
            out.append([])
            total = 0
        out[-1].append(i)
        total += cost
    return out


def prepare(preprocessor: Preprocessor, max_pixels: int, images: list[bytes],
            deadline: float | None = None) -> list[np.ndarray | str]:
    """The uint8 crop of each image (normalised later, on the model's device:
    a quarter of the bytes to copy), or the reason it cannot be used. Images
    not started by `deadline` (time.time()) are skipped: nobody waits for them."""
    out: list[np.ndarray | str] = []
    for data in images:
        if deadline is not None and time.time() > deadline:
            out.append("the deadline passed before it was decoded")
            continue
        try:
            image = decode_image(data, max_pixels)
            resized = preprocessor.resized_pixels(image.width, image.height)
            if resized > max_pixels:
                raise ImageDecodeError(f"image is {image.width}x{image.height}: its aspect ratio "
                                       f"is too extreme to resize ({resized} pixels)")
            out.append(preprocessor.crop(image))
        except ImageDecodeError as exc:
            out.append(str(exc))
        except Exception as exc:  # noqa: BLE001 - one bad image must not fail its neighbours
            out.append(f"cannot preprocess image: {type(exc).__name__}: {exc}")
    return out


class PreprocessPool:
    """Workers that run `prepare` with one preprocessor and pixel limit.
    Processes are spawned, never forked: the parent may hold a CUDA
    context, which a fork must not inherit."""

    def __init__(self, kind: str, workers: int, preprocessor: Preprocessor,
                 max_pixels: int) -> None:
        self.workers = workers
        if kind == "process":
            self._executor: Executor = ProcessPoolExecutor(
                workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=_setup_process, initargs=(preprocessor.to_config(), max_pixels))
            self._run = _prepare_in_process
        else:
            self._executor = ThreadPoolExecutor(workers, thread_name_prefix="preprocess")
            self._run = functools.partial(prepare, preprocessor, max_pixels)

    async def prepare(self, images: list[bytes],
                      deadline: float | None = None) -> list[np.ndarray | str]:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._run,
                                                                images, deadline)
