"""The ingest read-ahead holds at most its item count and byte budget, takes
a message's items at once, and hands them out in batches."""
from __future__ import annotations

import asyncio

from search_service.ingest import _END, Item, _ReadAhead
from tests.services import turns


def items(*sizes: int, start: int = 0) -> list[Item]:
    return [Item(start + i, b"x" * size, "", {}) for i, size in enumerate(sizes)]


def indexes(entries) -> list:
    return [entry.index if isinstance(entry, Item) else entry for entry in entries]


def test_bytes_bound_the_read_ahead_and_one_big_message_still_fits():
    async def scenario():
        queue = _ReadAhead(max_items=100, max_bytes=10)
        await queue.put(items(6), 6)
        blocked = asyncio.create_task(queue.put(items(6, start=1), 6))  # 12 > 10: waits
        await turns()
        assert not blocked.done()
        assert indexes(await queue.take(100, 100)) == [0]
        await asyncio.wait_for(blocked, 1)  # room again
        assert indexes(await queue.take(100, 100)) == [1]
        await asyncio.wait_for(queue.put(items(30, 20, start=2), 50), 1)  # alone, over: admitted
        assert indexes(await queue.take(100, 100)) == [2, 3]

    asyncio.run(scenario())


def test_item_count_bounds_the_read_ahead():
    async def scenario():
        queue = _ReadAhead(max_items=2, max_bytes=10**9)
        await queue.put(items(1, 1), 2)
        third = asyncio.create_task(queue.put(items(1, start=2), 1))
        await turns()
        assert not third.done()
        assert indexes(await queue.take(1, 100)) == [0]
        await asyncio.wait_for(third, 1)

    asyncio.run(scenario())


def test_take_stops_at_the_batch_limits_and_after_the_end():
    async def scenario():
        queue = _ReadAhead(max_items=100, max_bytes=10**9)
        waiting = asyncio.create_task(queue.take(3, 100))
        await turns()
        assert not waiting.done()  # nothing to take yet: it waits
        await queue.put(items(10, 10, 10, 60, 50, 5, 5), 150)
        await queue.put([_END])
        assert indexes(await waiting) == [0, 1, 2]  # three items at most
        assert indexes(await queue.take(3, 100)) == [3, 4]  # until 100 bytes are reached
        assert indexes(await queue.take(3, 100)) == [5, 6, _END]  # the end comes last

    asyncio.run(scenario())
