"""The ingest plan and the in-process registry of writes, without gRPC."""
from __future__ import annotations

import asyncio

from search_service.ingest import InFlight, Item, plan


def _items(*images: bytes) -> list[Item]:
    return [Item(i, image, f"u{i}", {}) for i, image in enumerate(images)]


def test_first_copies_are_embedded_and_repeats_follow_them():
    items = _items(b"a", b"b", b"a", b"", b"b")
    result = plan(items, ["A", "B", "A", "", "B"], {3: "empty image bytes"}, busy=set())
    assert {id_: item.index for id_, item in result.embed.items()} == {"A": 0, "B": 1}
    assert [(item.index, id_) for item, id_ in result.follow] == [(2, "A"), (4, "B")]
    assert result.failed == {3: "empty image bytes"}


def test_images_another_batch_writes_follow_that_write():
    items = _items(b"a", b"b")
    result = plan(items, ["A", "B"], {}, busy={"A"})
    assert list(result.embed) == ["B"]
    assert [(item.index, id_) for item, id_ in result.follow] == [(0, "A")]


def test_a_claim_is_seen_as_busy_until_settled_and_waiters_learn_the_outcome():
    async def run():
        registry = InFlight()
        claims = registry.claim("c", ["A", "B"])
        busy = registry.busy("c", ["A", "B", "C"])
        assert set(busy) == {"A", "B"} and registry.busy("other", ["A"]) == {}
        registry.settle("c", {"A": "", "B": "undecodable"})
        assert registry.busy("c", ["A", "B"]) == {}
        return await claims["A"], await busy["B"]
    assert asyncio.run(run()) == ("", "undecodable")
