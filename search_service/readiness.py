"""The search service's dependencies, the embedder and Milvus: checked every
few seconds, reported under the "dependencies" health name and the
`search_dependency_up` gauge, and each change logged with the reason. They
never make the process itself NOT_SERVING: calls that need a missing one
fail fast with UNAVAILABLE naming it, and the others keep working."""
from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator, Awaitable, Callable

from prometheus_client import Gauge

log = logging.getLogger(__name__)

INTERVAL_S = 2.0
DEPENDENCIES = ("embedder", "milvus")
# With --workers, the lowest over the live workers: 0 when any of them cannot reach it.
UP = Gauge("search_dependency_up", "1 while the dependency answers, else 0", ["dependency"],
           multiprocess_mode="livemin")


async def watch_dependencies(problems: Callable[[], Awaitable[dict[str, str]]],
                             interval_s: float = INTERVAL_S) -> AsyncIterator[bool]:
    """Yield whether there are no problems, now and then every `interval_s`.
    Logged when the set of failing dependencies changes, not on every check."""
    failing: set[str] | None = None
    while True:
        found = await problems()
        for name in DEPENDENCIES:
            UP.labels(name).set(name not in found)
        if set(found) != failing:
            if found:
                log.warning("dependency down (still serving what does not need it): %s",
                            "; ".join(found.values()))
            elif failing:
                log.info("dependencies: the embedder and Milvus answer again")
            failing = set(found)
        yield not found
        await asyncio.sleep(interval_s)
