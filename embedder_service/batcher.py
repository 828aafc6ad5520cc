"""Dynamic batching: concurrent requests share one forward pass.

Requests wait in a bounded queue. The worker takes the oldest, lets the batch
fill for at most `max_wait_s` (or until `max_batch` items are queued), drops
requests that were cancelled or whose deadline passed (they cost no model
time), runs the rest as one batch on the model thread, and hands each request
exactly its own rows back. While a batch runs, the next one queues up, so
under load batches fill without waiting at all.
"""
from __future__ import annotations

import asyncio
import logging
import weakref
from collections import deque
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Callable, Generic, Sequence, TypeVar

import numpy as np
from prometheus_client import REGISTRY, Histogram
from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger(__name__)

BATCH_SIZE = Histogram("embedder_batch_size", "Items per forward pass, by batcher (text, image)",
                       ["batcher"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))
_SECONDS = (.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10)
QUEUE_WAIT = Histogram("embedder_queue_wait_seconds",
                       "Time a request waited for its forward pass, by batcher", ["batcher"],
                       buckets=_SECONDS)
COMPUTE = Histogram("embedder_compute_seconds", "Time of one forward pass, by batcher",
                    ["batcher"], buckets=_SECONDS)

T = TypeVar("T")


class _Occupancy:
    """embedder_queue_items and embedder_reserved_items, read from every live
    batcher at scrape time (summed by name), not from the last one created."""

    def __init__(self) -> None:
        self.batchers: weakref.WeakSet[Batcher] = weakref.WeakSet()

    def collect(self):
        queued = GaugeMetricFamily("embedder_queue_items", "Items waiting for the model, by batcher",
                                   labels=["batcher"])
        reserved = GaugeMetricFamily(
            "embedder_reserved_items", "Items admitted but not yet queued (images being "
            "decoded), by batcher; they count against --max-queue", labels=["batcher"])
        totals: dict[str, list[int]] = {}
        for batcher in list(self.batchers):
            total = totals.setdefault(batcher.name, [0, 0])
            total[0] += batcher.queued_items
            total[1] += batcher.reserved_items
        for name, (waiting, held) in sorted(totals.items()):
            queued.add_metric([name], waiting)
            reserved.add_metric([name], held)
        yield queued
        yield reserved


_OCCUPANCY = _Occupancy()
REGISTRY.register(_OCCUPANCY)


class QueueFull(Exception):
    """Admitting the request would exceed the queue bound."""


class Expired(Exception):
    """The request's deadline passed before its batch ran."""


class Reservation:
    """Room for some items in a batcher's queue, taken at admission (before
    any decoding) and held until they are queued, so a request admitted once
    is never refused later for room that others took meanwhile. Leaving the
    `with` block gives back whatever was not queued (items that failed)."""

    def __init__(self, batcher: "Batcher", count: int) -> None:
        self._batcher, self._left = batcher, count

    def take(self, count: int) -> None:
        if count > self._left:
            raise ValueError(f"{count} items queued on a reservation of {self._left}")
        self._left -= count
        self._batcher._reserved -= count

    def __enter__(self) -> "Reservation":
        return self

    def __exit__(self, *exc) -> None:
        self.take(self._left)


@dataclass
class _Request(Generic[T]):
    payload: T
    count: int
    deadline: float | None  # loop time
    future: asyncio.Future = field(repr=False)
    queued: float = 0.0  # loop time it was queued


class Batcher(Generic[T]):
    """`run(payloads)` returns the vectors of all payloads, concatenated in order."""

    def __init__(self, name: str, run: Callable[[Sequence[T]], np.ndarray], executor: Executor, *,
                 max_batch: int, max_wait_s: float, max_queue: int,
                 on_batch: Callable[[bool, str], None] = lambda ok, why: None) -> None:
        """`on_batch(ok, why)` hears how each forward pass ended."""
        self.name = name
        self._on_batch = on_batch
        self._run = run
        self._executor = executor
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self._queue: deque[_Request[T]] = deque()
        self._queued_items = 0
        self._reserved = 0  # admitted through `reserve`, not queued yet
        self._arrived = asyncio.Event()
        self._worker: asyncio.Task | None = None
        self.batches = 0  # forward passes run, for tests and benchmarks
        self.items = 0
        _OCCUPANCY.batchers.add(self)
        self._batch_sizes = BATCH_SIZE.labels(name)
        self._queue_wait, self._compute = QUEUE_WAIT.labels(name), COMPUTE.labels(name)

    @property
    def queued_items(self) -> int:
        return self._queued_items

    @property
    def reserved_items(self) -> int:
        return self._reserved

    def _admit(self, count: int) -> None:
        if self._queued_items + self._reserved + count > self.max_queue:
            raise QueueFull(f"{self.name} queue is full ({self._queued_items} items waiting, "
                            f"{self._reserved} more admitted, limit {self.max_queue}): retry "
                            "with backoff, or add replicas")

    def reserve(self, count: int) -> Reservation:
        """Room for `count` items, or QueueFull; cheap, so callers can refuse
        before doing any work for a request, and queue its items later (as
        `submit(..., reservation=)`) without being refused then."""
        self._admit(count)
        self._reserved += count
        return Reservation(self, count)

    async def submit(self, payload: T, count: int, timeout_s: float | None,
                     reservation: Reservation | None = None) -> np.ndarray:
        """The vectors of `payload` (`count` items), once its batch has run;
        `count` is taken from `reservation` if given, else admitted now."""
        if reservation is None:
            self._admit(count)
        else:
            reservation.take(count)
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._work(), name=f"batcher-{self.name}")
            self._worker.add_done_callback(self._worker_ended)
        request = _Request(payload, count, None if timeout_s is None else loop.time() + timeout_s,
                           loop.create_future(), loop.time())
        self._queue.append(request)
        self._queued_items += count
        self._arrived.set()
        try:
            return await request.future
        except asyncio.CancelledError:
            # The caller went away: free its place now, not when the worker gets to it.
            if request in self._queue:
                self._queue.remove(request)
                self._queued_items -= count
            raise

    def _worker_ended(self, worker: asyncio.Task) -> None:
        """The worker only ends by a bug or at shutdown: fail whoever still
        waits rather than leave them hanging; the next submit starts a new one."""
        error = RuntimeError(f"{self.name} batcher stopped")
        if not worker.cancelled() and worker.exception() is not None:
            log.error("%s batcher failed", self.name, exc_info=worker.exception())
            error = RuntimeError(f"{self.name} batcher failed: {worker.exception()}")
        while self._queue:
            request = self._queue.popleft()
            if not request.future.done():
                request.future.set_exception(error)
        self._queued_items = 0

    def _take(self) -> list[_Request[T]]:
        batch, items = [], 0
        while self._queue and (not batch or items + self._queue[0].count <= self.max_batch):
            request = self._queue.popleft()
            self._queued_items -= request.count
            batch.append(request)
            items += request.count
        return batch

    async def _fill(self) -> None:
        """Wait until requests are queued, then up to max_wait_s for a full batch."""
        loop = asyncio.get_running_loop()
        while not self._queue:
            self._arrived.clear()
            await self._arrived.wait()
        until = loop.time() + self.max_wait_s
        while self._queued_items < self.max_batch and (left := until - loop.time()) > 0:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except asyncio.TimeoutError:  # not the builtin before Python 3.11
                break

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._fill()
            now = loop.time()
            live = []
            for request in self._take():
                if request.future.done():
                    continue  # cancelled by its caller
                if request.deadline is not None and request.deadline <= now:
                    request.future.set_exception(Expired("deadline passed while queued"))
                    continue
                live.append(request)
            if not live:
                continue
            for request in live:
                self._queue_wait.observe(now - request.queued)
            started = loop.time()
            try:
                vectors = await loop.run_in_executor(self._executor, self._run,
                                                     [r.payload for r in live])
            except Exception as exc:  # the model failed: every request of the batch learns why
                log.exception("%s batch of %d requests failed", self.name, len(live))
                self._on_batch(False, f"{type(exc).__name__}: {exc}")
                for request in live:
                    if not request.future.done():
                        request.future.set_exception(exc)
                continue
            self._compute.observe(loop.time() - started)
            self._on_batch(True, "")
            self.batches += 1
            self._batch_sizes.observe(sum(r.count for r in live))
            start = 0
            for request in live:
                self.items += request.count
                if not request.future.done():
                    request.future.set_result(vectors[start:start + request.count])
                start += request.count
