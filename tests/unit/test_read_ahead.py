"""The ingest read-ahead holds at most its item count and byte budget."""
from __future__ import annotations

import asyncio

from search_service.ingest import _ReadAhead
from tests.services import turns


def test_bytes_bound_the_read_ahead_and_one_big_item_still_fits():
    async def scenario():
        queue = _ReadAhead(max_items=100, max_bytes=10)
        await queue.put("a", 6)
        blocked = asyncio.create_task(queue.put("b", 6))  # 12 > 10: waits
        await turns()
        assert not blocked.done()
        assert await queue.get() == "a"
        await asyncio.wait_for(blocked, 1)  # room again
        assert queue.get_nowait() == "b" and queue.empty()
        await asyncio.wait_for(queue.put("huge", 50), 1)  # alone, over the budget: admitted
        assert await queue.get() == "huge"

    asyncio.run(scenario())


def test_item_count_bounds_the_read_ahead():
    async def scenario():
        queue = _ReadAhead(max_items=2, max_bytes=10**9)
        await queue.put(1)
        await queue.put(2)
        third = asyncio.create_task(queue.put(3))
        await turns()
        assert not third.done()
        assert await queue.get() == 1
        await asyncio.wait_for(third, 1)

    asyncio.run(scenario())
