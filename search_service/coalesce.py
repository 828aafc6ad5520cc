"""Calls of one kind that arrive while one is running go out together as one.

Each Milvus call costs the search service a fixed 0.4-2 ms of CPU however
many rows it carries (pymilvus's Python, gRPC), so concurrent ingest streams
that each read and write their own batch of 64 images pay it per batch.
Here, per key (a collection), one call runs at a time; requests that arrive
meanwhile wait and then go out as the next single call. A request that finds
nothing running goes out at once: a lone stream waits for nobody.
"""
from __future__ import annotations

import asyncio
from typing import Awaitable, Callable, Generic, Hashable, TypeVar

from search_service.errors import DependencyUnavailable

Request = TypeVar("Request")
Result = TypeVar("Result")


class Coalescer(Generic[Request, Result]):
    """`call(key, requests)` answers many requests with one call: a result per
    request, in order, or it raises and every one of them fails with that.
    `max_size`: the most that one call takes (in the sizes the requests
    give); a single larger request still goes alone."""

    def __init__(self, call: Callable[[Hashable, list[Request]], Awaitable[list[Result]]],
                 max_size: int) -> None:
        self._call, self._max_size = call, max_size
        self._waiting: dict[Hashable, list[tuple[Request, int, asyncio.Future]]] = {}
        self._running: dict[Hashable, asyncio.Task] = {}

    async def __call__(self, key: Hashable, request: Request, size: int = 1) -> Result:
        future = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(key, []).append((request, size, future))
        running = self._running.get(key)
        if running is None or running.done():  # done: cancelled before it ever ran
            self._running[key] = asyncio.create_task(self._drain(key))
        # A caller that is cancelled stops waiting (and its request, if not
        # sent yet, is dropped); a call it joined runs on for the others.
        return await future

    async def _drain(self, key: Hashable) -> None:
        batch: list = []
        try:
            # Requests of callers that were cancelled before they went out are dropped.
            while waiting := [entry for entry in self._waiting.pop(key, ()) if not entry[2].done()]:
                taken, total = 1, waiting[0][1]
                while taken < len(waiting) and total + waiting[taken][1] <= self._max_size:
                    total += waiting[taken][1]
                    taken += 1
                batch, self._waiting[key] = waiting[:taken], waiting[taken:]
                try:
                    results = await self._call(key, [request for request, _, _ in batch])
                    if len(results) != len(batch):
                        raise RuntimeError(f"{len(results)} results for {len(batch)} requests")
                except Exception as exc:  # noqa: BLE001 - each caller gets it as its own
                    _settle(batch, exc)
                else:
                    for (_, _, future), result in zip(batch, results):
                        if not future.done():
                            future.set_result(result)
                batch = []
        except asyncio.CancelledError:  # the service stopping: nobody may wait for ever
            _settle(batch + self._waiting.pop(key, []),
                    DependencyUnavailable("the service is stopping: retry on another replica"))
            raise
        finally:
            if self._running.get(key) is asyncio.current_task():
                del self._running[key]


def _settle(entries, exception: Exception) -> None:
    for _, _, future in entries:
        if not future.done():
            future.set_exception(exception)
