"""Dynamic batching semantics: coalescing, order, per-request rows, queue
bound, expired and cancelled requests, failures. The model here is a plain
function that echoes its inputs as vectors, so every row is checkable."""
from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from embedder_service.batcher import Batcher, Expired, QueueFull
from tests.services import until


class EchoModel:
    """Rows are the inputs themselves; records every batch it ran."""

    def __init__(self, delay_s: float = 0.0, gate: threading.Event | None = None) -> None:
        self.batches: list[list[int]] = []
        self.delay_s = delay_s
        self.gate = gate
        self.entered = threading.Event()  # a batch has reached the model

    def __call__(self, payloads):
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(10)
        flat = [x for payload in payloads for x in payload]
        if any(x < 0 for x in flat):
            raise ValueError("negative input")
        self.batches.append(flat)
        threading.Event().wait(self.delay_s)
        return np.array(flat, dtype=np.float32).reshape(-1, 1)


def make(model, **limits) -> Batcher:
    limits = {"max_batch": 8, "max_wait_s": 0.05, "max_queue": 100, **limits}
    return Batcher("test", model, ThreadPoolExecutor(1), **limits)


def run(coro):
    return asyncio.run(coro)


async def blocked(model: EchoModel, max_queue: int) -> tuple[Batcher, asyncio.Task]:
    """A batcher of one-item batches whose worker has taken a first request
    and is held in the model (by `model`'s gate): later requests queue."""
    batcher = make(model, max_batch=1, max_wait_s=0, max_queue=max_queue)
    first = asyncio.create_task(batcher.submit([1], 1, None))
    await until(lambda: model.entered.is_set())
    return batcher, first


def test_concurrent_requests_share_batches_and_get_their_own_rows():
    model = EchoModel()

    async def main():
        batcher = make(model)
        payloads = [[10 * i + j for j in range(i % 3 + 1)] for i in range(6)]
        results = await asyncio.gather(*(batcher.submit(p, len(p), None) for p in payloads))
        return payloads, results, batcher

    payloads, results, batcher = run(main())
    for payload, rows in zip(payloads, results):
        assert rows[:, 0].tolist() == payload
    assert len(model.batches) < len(payloads)  # coalesced
    assert all(len(b) <= 8 for b in model.batches)
    assert sorted(x for b in model.batches for x in b) == sorted(x for p in payloads for x in p)
    assert batcher.items == sum(map(len, payloads)) and batcher.batches == len(model.batches)


def test_order_is_arrival_order():
    model = EchoModel()

    async def main():
        batcher = make(model, max_batch=3)
        return await asyncio.gather(*(batcher.submit([i], 1, None) for i in range(7)))

    run(main())
    assert model.batches == [[0, 1, 2], [3, 4, 5], [6]]


def test_a_request_larger_than_a_batch_runs_whole():
    model = EchoModel()
    rows = run(make(model, max_batch=2).submit(list(range(5)), 5, None))
    assert rows[:, 0].tolist() == list(range(5)) and model.batches == [list(range(5))]


def test_queue_full_is_refused_at_once():
    gate = threading.Event()
    model = EchoModel(gate=gate)

    async def main():
        batcher, first = await blocked(model, max_queue=3)
        queued = [asyncio.create_task(batcher.submit([i], 1, None)) for i in (2, 3, 4)]
        await until(lambda: batcher.queued_items == 3)
        with pytest.raises(QueueFull, match="limit 3"):
            await batcher.submit([5], 1, None)
        gate.set()
        return await asyncio.gather(first, *queued)

    assert [r[0, 0] for r in run(main())] == [1, 2, 3, 4]


def test_expired_and_cancelled_requests_cost_no_model_time():
    gate = threading.Event()
    model = EchoModel(gate=gate)

    async def main():
        batcher = make(model, max_batch=1, max_wait_s=0)
        busy = asyncio.create_task(batcher.submit([1], 1, None))
        await until(lambda: model.entered.is_set())
        expiring = asyncio.create_task(batcher.submit([2], 1, timeout_s=0.01))
        cancelled = asyncio.create_task(batcher.submit([3], 1, None))
        kept = asyncio.create_task(batcher.submit([4], 1, None))
        await until(lambda: batcher.queued_items == 3)
        await asyncio.sleep(0.05)  # the 10 ms deadline passes: time itself is under test
        cancelled.cancel()
        gate.set()
        with pytest.raises(Expired):
            await expiring
        return await busy, await kept

    busy, kept = run(main())
    assert (busy[0, 0], kept[0, 0]) == (1, 4)
    assert model.batches == [[1], [4]]


def test_a_failed_batch_fails_its_requests_and_the_batcher_goes_on():
    model = EchoModel()

    async def main():
        batcher = make(model, max_batch=2, max_wait_s=0.05)
        bad = await asyncio.gather(batcher.submit([1], 1, None), batcher.submit([-1], 1, None),
                                   return_exceptions=True)
        good = await batcher.submit([7], 1, None)
        return bad, good

    bad, good = run(main())
    assert all(isinstance(e, ValueError) for e in bad)
    assert good[0, 0] == 7


def test_a_cancelled_caller_frees_its_queue_place_at_once():
    gate = threading.Event()
    model = EchoModel(gate=gate)

    async def main():
        batcher, busy = await blocked(model, max_queue=2)
        waiting = asyncio.create_task(batcher.submit([2, 3], 2, None))
        await until(lambda: batcher.queued_items == 2)
        waiting.cancel()
        await until(lambda: waiting.done())
        assert batcher.queued_items == 0
        again = asyncio.create_task(batcher.submit([4, 5], 2, None))  # fits again
        gate.set()
        return await busy, await again

    busy, again = run(main())
    assert again[:, 0].tolist() == [4, 5] and model.batches == [[1], [4, 5]]


def test_a_reservation_holds_room_until_its_items_are_queued():
    """Admission happens once, before decoding: the room it took is held
    against later requests, queuing from it is never refused, and leaving
    the block returns what was not queued."""
    model = EchoModel()

    async def main():
        batcher = make(model, max_queue=4)
        with batcher.reserve(3) as held:
            assert batcher.reserved_items == 3
            with pytest.raises(QueueFull, match="3 more admitted"):
                await batcher.submit([9, 9], 2, None)  # 3 held + 2 > 4
            rows = await batcher.submit([1, 2], 2, None, held)  # from the reservation
            assert rows[:, 0].tolist() == [1, 2] and batcher.reserved_items == 1
        assert batcher.reserved_items == 0  # the third item failed to decode, say
        with pytest.raises(QueueFull):
            batcher.reserve(5)
        return await batcher.submit([7, 7, 7, 7], 4, None)

    assert run(main())[:, 0].tolist() == [7, 7, 7, 7]
