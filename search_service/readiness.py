"""Readiness: the search service is SERVING only while both its
dependencies, the embedder and Milvus, answer. Checked every few seconds;
each change is logged with the reason."""
from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator, Awaitable, Callable

log = logging.getLogger(__name__)

INTERVAL_S = 2.0


async def watch_dependencies(problems: Callable[[], Awaitable[dict[str, str]]],
                             interval_s: float = INTERVAL_S) -> AsyncIterator[bool]:
    """Yield whether there are no problems, now and then every `interval_s`.
    Logged when the set of failing dependencies changes, not on every check."""
    failing: set[str] | None = None
    while True:
        found = await problems()
        if set(found) != failing:
            if found:
                log.warning("not ready: %s", "; ".join(found.values()))
            elif failing:
                log.info("ready: the embedder and Milvus answer again")
            failing = set(found)
        yield not found
        await asyncio.sleep(interval_s)
