"""The collections, awaited: the search service's one door to Milvus.

`Store` is an async facade over `milvus.MilvusStore` (pymilvus, blocking) in
the style of pymilvus's AsyncMilvusClient: it owns the threads its calls run
on, so callers write `await store.search(...)` and never hand a callable
down. It also makes the consistency tokens: a write's own Milvus timestamp,
or a fresh one, encoded in one place (`token`). Milvus Lite (`lite.py`) is
the file backend; the server is reached by URI.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from search_service import consistency
from search_service.domain import ModelIdentity
from search_service.store.milvus import HnswParams, MilvusStore, Row, is_lite

__all__ = ["HnswParams", "MilvusStore", "Row", "Store", "is_lite"]

THREADS = 8  # concurrent Milvus calls; a slow one does not hold up the rest


class Store:
    """`milvus`: a MilvusStore, or anything with its blocking methods."""

    def __init__(self, milvus: MilvusStore, threads: int = THREADS) -> None:
        self.milvus = milvus
        self._threads = ThreadPoolExecutor(threads, thread_name_prefix="milvus")

    @property
    def lite(self) -> bool:
        return bool(getattr(self.milvus, "lite", False))

    async def _run(self, method, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(
            self._threads, lambda: method(*args, **kwargs))

    async def open(self, name: str) -> ModelIdentity:
        """The model `name` was built with, once loaded; CollectionNotFound if it does not exist."""
        return await self._run(self.milvus.open, name)

    async def create(self, name: str, model: ModelIdentity) -> ModelIdentity:
        """Open `name`, creating it for `model` first if it does not exist;
        the model it was built with (another process may have been first)."""
        return await self._run(self.milvus.create, name, model)

    async def existing_ids(self, name: str, ids: list[str]) -> set[str]:
        """Which of `ids` are stored (a Strong read)."""
        return await self._run(self.milvus.existing_ids, name, ids)

    async def write(self, name: str, rows: list[Row]) -> int:
        """Upsert `rows`; the Milvus timestamp of the write, or 0 for none (Lite, no rows)."""
        return await self._run(self.milvus.write, name, rows)

    async def token(self, stamp: int = 0) -> bytes:
        """The consistency token of a read that must see a write stamped
        `stamp`, or, without one, everything acknowledged so far (a fresh
        timestamp). Empty on Milvus Lite, whose reads see every write."""
        if self.lite:
            return b""
        return consistency.encode(stamp or await self._run(self.milvus.timestamp))

    async def search(self, name: str, vector: Sequence[float], limit: int, offset: int = 0,
                     expr: str = "", after: int = 0, fields: bool = True) -> list[dict]:
        """Hits best first: id and score, and uri and metadata unless not `fields`."""
        return await self._run(self.milvus.search, name, vector, limit, offset, expr, after,
                               fields)

    async def rows(self, name: str, ids: list[str], after: int = 0) -> dict[str, dict]:
        """{id: {"uri", "metadata"}} of those of `ids` that are stored."""
        return await self._run(self.milvus.rows, name, ids, after)

    async def delete(self, name: str, ids: list[str]) -> set[str]:
        """Remove those of `ids` that are present; return them."""
        return await self._run(self.milvus.delete, name, ids)

    async def count(self, name: str, after: int = 0) -> int:
        return await self._run(self.milvus.count, name, after)

    async def ping(self) -> None:
        """DependencyUnavailable unless Milvus answers."""
        await self._run(self.milvus.ping)

    def close(self) -> None:
        """Let calls in flight finish, start no more, then close the client:
        Milvus Lite runs inside this process and must not stop under a call."""
        self._threads.shutdown(wait=True, cancel_futures=True)
        self.milvus.close()
