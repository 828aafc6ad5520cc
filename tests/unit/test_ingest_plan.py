"""The ingest plan and the in-process registry of writes, without gRPC."""
from __future__ import annotations

import asyncio
import threading

import pytest

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


def test_a_failed_write_frees_the_ids_of_the_batch_waiting_behind_it():
    """Batch 1's write fails while batch 2 (already embedded, its ids
    claimed) waits for it: the stream ends with the write's error, and no id
    stays claimed, or another stream sending the same image would wait on it
    for ever. Milvus and the embedder are stand-ins here: a write failing at
    exactly that moment cannot be timed on a real Milvus."""
    import numpy as np

    from imagesearch.v1 import search_pb2
    from search_service.domain import ModelIdentity
    from search_service.errors import DependencyUnavailable
    from search_service.ingest import IngestPipeline, IngestSettings, SharedCalls, image_id
    from search_service.store import Store

    model = ModelIdentity("m", "f", 4)
    second_embedded = threading.Event()

    class Milvus:
        def open(self, name):
            return model

        def existing_ids(self, name, ids):
            return set()

        def write(self, name, rows):
            second_embedded.wait(5)  # batch 2 is embedded, its ids claimed, meanwhile
            raise DependencyUnavailable("Milvus is down")

        def timestamp(self):
            return 0

    class Embedder:
        async def encode_images(self, images, expect, context):
            if images == [b"b"]:
                second_embedded.set()
            return [np.ones(4, np.float32)] * len(images), model

    async def run():
        registry = InFlight()
        store = Store(Milvus())
        pipeline = IngestPipeline("c", store, SharedCalls(store), Embedder(), registry,
                                  IngestSettings(1, 1 << 20, 60), None)
        messages = [search_pb2.IngestRequest(items=[search_pb2.IngestItem(image=b"a")]),
                    search_pb2.IngestRequest(items=[search_pb2.IngestItem(image=b"b")])]

        async def rest():
            yield messages[1]
        with pytest.raises(DependencyUnavailable):
            async for _ in pipeline.run(messages[0], rest()):
                pass
        return registry.busy("c", [image_id(b"a"), image_id(b"b")])
    assert asyncio.run(run()) == {}


def test_a_token_is_the_writes_own_stamp_only_for_writes_of_new_images_alone():
    """A batch of new images only answers with its write's own Milvus
    timestamp. One whose images were found stored (rows of other writers,
    which a Milvus proxy may have stamped from a batch of timestamps taken
    earlier), one that follows another stream's write, and one that wrote
    nothing take a fresh one after it. Milvus is a stand-in: a proxy's stale
    timestamp batch cannot be caused on the one standalone server here."""
    from search_service import consistency
    from search_service.ingest import SharedCalls, batch_token
    from search_service.store import Row, Store

    class Milvus:
        def __init__(self):
            self.stamps = iter(range(100, 200))

        def write(self, name, rows):
            return next(self.stamps) if rows else 0

        def timestamp(self):
            return next(self.stamps)

    async def token(rows, found=False, follows_others=False):
        store = Store(Milvus())
        stamp = await SharedCalls(store).write("c", rows)
        return consistency.decode(await batch_token(store, stamp, found, follows_others))

    row = Row("a" * 64, [1.0], "", {})
    assert asyncio.run(token([row])) == 100  # one call: the write's
    assert asyncio.run(token([row], found=True)) == 101  # the write's (100), then a fresh one
    assert asyncio.run(token([row], follows_others=True)) == 101
    assert asyncio.run(token([])) == 100  # no write: a fresh one
