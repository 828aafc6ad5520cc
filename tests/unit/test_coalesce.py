"""The coalescer that merges concurrent Milvus calls of ingest streams (real asyncio, no stand-ins)."""
from __future__ import annotations

import asyncio

import pytest

from search_service.coalesce import Coalescer
from search_service.errors import DependencyUnavailable


async def settle() -> None:
    """Let every ready task run its next steps."""
    for _ in range(5):
        await asyncio.sleep(0)


class Recorder:
    """A call that records what each invocation carried, and can be held."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.calls: list[tuple[str, list[str]]] = []
        self.release = asyncio.Event()
        self.release.set()
        self.fail_on = fail_on

    async def __call__(self, key, requests):
        self.calls.append((key, list(requests)))
        await self.release.wait()
        if self.fail_on in requests:
            raise RuntimeError(f"refused {self.fail_on}")
        return [f"{key}:{request}" for request in requests]


def held(max_size: int = 100, fail_on: str | None = None) -> tuple[Recorder, Coalescer]:
    """A coalescer whose calls are held until `call.release` is set."""
    call = Recorder(fail_on)
    call.release.clear()
    return call, Coalescer(call, max_size=max_size)


def test_a_lone_request_goes_out_at_once_and_gets_its_own_result():
    async def run():
        call = Recorder()
        merged = Coalescer(call, max_size=100)
        return await merged("c", "a"), call.calls
    assert asyncio.run(run()) == ("c:a", [("c", ["a"])])


def test_requests_arriving_during_a_call_go_out_together_as_the_next_one():
    async def run():
        call, merged = held()
        first = asyncio.create_task(merged("c", "a"))
        await settle()  # the first call is running, held
        later = [asyncio.create_task(merged("c", r)) for r in "bcd"]
        await settle()
        call.release.set()
        return await asyncio.gather(first, *later), call.calls
    results, calls = asyncio.run(run())
    assert results == ["c:a", "c:b", "c:c", "c:d"]
    assert calls == [("c", ["a"]), ("c", ["b", "c", "d"])]


def test_a_call_takes_at_most_max_size_but_a_larger_request_still_goes_alone():
    async def run():
        call, merged = held(5)
        tasks = [asyncio.create_task(merged("c", r, size)) for r, size in
                 (("a", 1), ("b", 3), ("c", 2), ("d", 9), ("e", 1))]
        await asyncio.sleep(0)
        call.release.set()
        await asyncio.gather(*tasks)
        return call.calls
    # All five wait before the first call starts: a and b fill it (4 of 5).
    assert [requests for _, requests in asyncio.run(run())] == [["a", "b"], ["c"], ["d"], ["e"]]


def test_a_failed_call_fails_its_own_requests_only():
    async def run():
        call, merged = held(fail_on="b")
        first = asyncio.create_task(merged("c", "a"))
        await settle()
        joined = [asyncio.create_task(merged("c", r)) for r in "bc"]
        await settle()
        call.release.set()
        outcomes = await asyncio.gather(first, *joined, return_exceptions=True)
        after = await merged("c", "d")  # the coalescer keeps working
        return outcomes, after
    (first, b, c), after = asyncio.run(run())
    assert first == "c:a" and after == "c:d"
    assert isinstance(b, RuntimeError) and b is c  # both merged requests fail with it


def test_a_cancelled_caller_leaves_the_call_to_the_others():
    async def run():
        call, merged = held()
        gone = asyncio.create_task(merged("c", "a"))
        stays = asyncio.create_task(merged("c", "b"))
        await settle()
        gone.cancel()
        await settle()
        call.release.set()
        with pytest.raises(asyncio.CancelledError):
            await gone
        return await stays
    assert asyncio.run(run()) == "c:b"


def test_keys_run_side_by_side():
    async def run():
        call, merged = held()
        tasks = [asyncio.create_task(merged(key, "x")) for key in ("one", "two")]
        await settle()
        running = len(call.calls)  # both started, neither waits for the other
        call.release.set()
        return running, await asyncio.gather(*tasks)
    assert asyncio.run(run()) == (2, ["one:x", "two:x"])


def test_a_cancelled_callers_request_that_has_not_gone_out_is_dropped():
    async def run():
        call, merged = held()
        first = asyncio.create_task(merged("c", "a"))
        await settle()
        gone, stays = (asyncio.create_task(merged("c", r)) for r in "bc")
        await settle()
        gone.cancel()
        await settle()
        call.release.set()
        await asyncio.gather(first, stays)
        return call.calls
    assert asyncio.run(run()) == [("c", ["a"]), ("c", ["c"])]


def test_stopping_fails_the_running_and_the_waiting_requests():
    """The service stopping cancels the running call's task: its request and
    the one queued behind it fail UNAVAILABLE; none waits for ever, and the
    next request starts a new call."""
    async def run():
        call, merged = held()
        running = asyncio.create_task(merged("c", "a"))
        await settle()
        queued = asyncio.create_task(merged("c", "b"))
        await settle()
        [drain] = [task for task in asyncio.all_tasks()
                   if task.get_coro().__qualname__ == "Coalescer._drain"]
        drain.cancel()
        outcomes = await asyncio.gather(running, queued, return_exceptions=True)
        call.release.set()
        return outcomes, await merged("c", "d")
    outcomes, after = asyncio.run(run())
    assert all(isinstance(o, DependencyUnavailable) for o in outcomes), outcomes
    assert after == "c:d"
