"""Ingest: a stream of images in, acknowledgements out, batch by batch.

- `Item`: one image of the stream, with its position in it.
- `plan`: pure: of a batch, which images to embed, which failed checks, and
  which follow another copy (earlier in the batch, or being written by
  another stream of this process).
- `InFlight`: the images being written by any stream of this process. A
  second stream of the same image waits for that write and answers
  ALREADY_PRESENT, so each new image gets exactly one INSERTED per process.
- `SharedCalls`: the Milvus reads and writes of every stream of this
  process, coalesced (concurrent streams' batches go out as one call).
- `batch_token`: which consistency token a batch answers with.
- `IngestPipeline`: reads ahead (bounded in items and bytes), embeds batch
  n+1 while batch n is written, and yields each batch's outcomes (domain
  `Stored`, which the servicer turns into messages) as soon as its write
  returns, in stream order.
"""
from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
from dataclasses import dataclass, field
from typing import AsyncIterator

from prometheus_client import Counter

from search_service import validation
from search_service.coalesce import Coalescer
from search_service.domain import ModelIdentity, Outcome, Status, Stored
from search_service.embedder_client import EmbedderPool
from search_service.errors import (CollectionNotFound, DeadlineExceeded, InvalidArgument,
                                   ModelMismatch, ServiceError)
from search_service.store import Row, Store

log = logging.getLogger(__name__)
INGESTED = Counter("search_images_ingested_total",
                   "Ingest results, by status (inserted, already_present, failed)", ["status"])
_END = object()  # end of the request stream
# Responses made and not yet taken by the transport, at most, per stream:
# once this many wait (a caller that does not read its results, and gRPC's
# flow control holds them), the stream takes no more work, so its reader
# stops reading requests when the read-ahead is full.
RESULTS_AHEAD = 2


def _why(exc: BaseException) -> str:
    """Why the ids of a batch that ended with `exc` were not stored, for streams waiting on them."""
    return str(exc) if isinstance(exc, ServiceError) else "the ingest stream storing it ended"


def _as_service_error(exc: Exception) -> ServiceError:
    """`exc` as the status the caller gets: a bug (not a ServiceError) is INTERNAL, and logged."""
    if isinstance(exc, ServiceError):
        return exc
    log.error("ingest failed", exc_info=exc)
    return ServiceError(f"ingest failed: {type(exc).__name__}: {exc}")


def image_id(data: bytes) -> str:
    """Content address of an image: re-ingesting the same bytes finds the same row."""
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Item:
    index: int  # position in the stream, across messages
    image: bytes
    uri: str
    metadata: dict[str, str]


@dataclass
class Plan:
    embed: dict[str, Item]  # id -> the first copy of each image this batch stores
    failed: dict[int, str]  # index -> why, for items that fail their checks
    follow: list[tuple[Item, str]] = field(default_factory=list)  # (item, id whose fate it shares)


def plan(items: list[Item], ids: list[str], errors: dict[int, str], busy: set[str]) -> Plan:
    """What to do with a batch: `ids` are the items' image ids, `errors` the
    items that failed their checks, `busy` the ids another batch is writing."""
    result = Plan(embed={}, failed=dict(errors))
    for item, id_ in zip(items, ids):
        if item.index in errors:
            continue
        if id_ in busy or id_ in result.embed:
            result.follow.append((item, id_))
        else:
            result.embed[id_] = item
    return result


class InFlight:
    """Ids being written, per collection, each with the future of its write:
    it ends with "" when the image is stored, or with why it is not."""

    def __init__(self) -> None:
        self._writes: dict[tuple[str, str], asyncio.Future] = {}

    def busy(self, collection: str, ids: list[str]) -> dict[str, asyncio.Future]:
        return {id_: self._writes[(collection, id_)] for id_ in ids
                if (collection, id_) in self._writes}

    def claim(self, collection: str, ids: list[str]) -> dict[str, asyncio.Future]:
        loop = asyncio.get_running_loop()
        claims = {id_: loop.create_future() for id_ in ids}
        self._writes.update({(collection, id_): future for id_, future in claims.items()})
        return claims

    def settle(self, collection: str, outcomes: dict[str, str]) -> None:
        for id_, error in outcomes.items():
            future = self._writes.pop((collection, id_), None)
            if future is not None and not future.done():
                future.set_result(error)


class SharedCalls:
    """The existence reads and the writes of all ingest streams of this process."""

    MAX_IDS = 4096  # in one coalesced read, and rows in one coalesced write

    def __init__(self, store: Store) -> None:
        self._store = store
        self._reads = Coalescer(self._read, self.MAX_IDS)
        self._writes = Coalescer(self._write, self.MAX_IDS)

    async def existing(self, collection: str, ids: list[str]) -> set[str]:
        """Which of `ids` are stored (a Strong read)."""
        return await self._reads(collection, ids, len(ids))

    async def write(self, collection: str, rows: list[Row]) -> int:
        """Write `rows`; the Milvus timestamp of the write that carried them (0: none)."""
        return await self._writes(collection, rows, len(rows))

    async def _read(self, collection: str, id_lists: list[list[str]]) -> list[set[str]]:
        ids = list(dict.fromkeys(id_ for ids in id_lists for id_ in ids))
        found = await self._store.existing_ids(collection, ids)
        return [found.intersection(ids) for ids in id_lists]

    async def _write(self, collection: str, row_lists: list[list[Row]]) -> list[int]:
        stamp = await self._store.write(collection, [row for rows in row_lists for row in rows])
        return [stamp] * len(row_lists)


async def batch_token(store: Store, stamp: int, found: bool, follows_others: bool) -> bytes:
    """The consistency token of an ingest batch whose write was stamped
    `stamp`: that timestamp covers the rows the write carried. A fresh one,
    taken now, is needed instead when
    - there is none (no rows written, or Milvus sent none);
    - the batch found images stored: other writers' rows, which a Milvus
      proxy may have stamped from a batch of timestamps taken earlier;
    - the batch follows another stream's write of the same image, which may
      have ended after this one (the caller has awaited those writes)."""
    return await store.token(0 if found or follows_others else stamp)


class _ReadAhead:
    """Items read but not yet taken: at most `max_items` and `max_bytes` of
    image bytes, except that what arrives when it is empty always fits. One
    reader puts each message's items at once, one consumer takes batches.
    Entries are Items, then possibly one end: _END or the error that ended
    the stream."""

    def __init__(self, max_items: int, max_bytes: int) -> None:
        self._entries: collections.deque = collections.deque()
        self._bytes, self._max_items, self._max_bytes = 0, max_items, max_bytes
        self._put, self._taken = asyncio.Event(), asyncio.Event()

    async def put(self, entries: list, size: int = 0) -> None:
        """Add `entries` (`size` bytes of images) once they fit."""
        while self._entries and (len(self._entries) + len(entries) > self._max_items
                                 or self._bytes + size > self._max_bytes):
            self._taken.clear()
            await self._taken.wait()
        self._entries.extend(entries)
        self._bytes += size
        self._put.set()

    async def take(self, max_items: int, max_bytes: int) -> list:
        """One entry or more: the first to come, then what else is there, up to
        `max_items` and until `max_bytes` is reached; an end comes last."""
        while not self._entries:
            self._put.clear()
            await self._put.wait()
        taken, size = [], 0
        while self._entries:
            entry = self._entries.popleft()
            taken.append(entry)
            if not isinstance(entry, Item):
                break
            size += len(entry.image)
            if len(taken) == max_items or size >= max_bytes:
                break
        self._bytes -= size
        self._taken.set()
        return taken


@dataclass
class _Batch:
    """A batch between embedding and its acknowledgement."""
    items: list[Item]
    rows: list[Row]
    results: dict[int, Outcome]
    claims: dict[str, str]  # id -> "" or why it failed, for the ids this batch stores
    follow: list[tuple[Item, str, asyncio.Future]]
    follows_others: bool  # some follow another stream's write, which may end after this one's
    found: bool  # some were found stored by the existence read


@dataclass(frozen=True)
class IngestSettings:
    batch_size: int  # images embedded and written together, at most
    max_batch_bytes: int  # image bytes in one batch (one larger image goes alone)
    idle_s: float  # a stream quiet for longer ends with DEADLINE_EXCEEDED


class IngestPipeline:
    """One Ingest stream; `context` is its gRPC call's, passed on to the embedder (deadline, cancel)."""

    def __init__(self, collection: str, store: Store, shared: SharedCalls,
                 embedder: EmbedderPool, in_flight: InFlight, settings: IngestSettings,
                 context) -> None:
        self._collection = collection
        self._store, self._shared = store, shared
        self._embedder = embedder
        self._in_flight = in_flight
        self._batch_size, self._max_batch_bytes = settings.batch_size, settings.max_batch_bytes
        self._idle_s = settings.idle_s
        self._context = context
        self._model: ModelIdentity | None = None  # the collection's, once it exists

    async def run(self, first, rest: AsyncIterator) -> AsyncIterator[Stored]:
        """The outcomes of a stream of IngestRequests whose first is `first`, batch by batch."""
        try:
            self._model = await self._store.open(self._collection)
        except CollectionNotFound:
            pass  # created for the embedder's model with the first batch
        queue = _ReadAhead(2 * self._batch_size, 2 * self._max_batch_bytes)
        out: asyncio.Queue = asyncio.Queue()  # bounded by `room`: RESULTS_AHEAD + 1 at most
        room = asyncio.Semaphore(RESULTS_AHEAD)  # a batch takes one; a response sent gives it back
        reader = asyncio.create_task(self._read(first, rest, queue))
        del first  # the reader's now, to let go once its items are read
        worker = asyncio.create_task(self._work(queue, out, room, reader))
        try:
            while (stored := await out.get()) is not _END:
                if isinstance(stored, ServiceError):
                    raise stored
                yield stored  # returns once the transport took its message (flow control)
                room.release()
        finally:
            reader.cancel()
            worker.cancel()

    async def _read(self, request, rest: AsyncIterator, queue: _ReadAhead) -> None:
        """Queue the items of `request`, then of each message of `rest`."""
        index = number = 0
        try:
            while True:
                if number and request.collection:
                    raise InvalidArgument(f"message {number} names a collection: set "
                                          "`collection` in the first message only", "collection")
                if request.items:
                    # Each read of a bytes field copies it: `image` is read
                    # once. The message is let go before waiting for room
                    # (the first one too: nothing else holds it), so a
                    # stream holds one message's images beyond its
                    # read-ahead, never its messages. (Not `ByteSize()`: upb
                    # serializes a message to size it, 46 us a 37 KB image.)
                    items = [Item(index + i, entry.image, entry.uri, dict(entry.metadata))
                             for i, entry in enumerate(request.items)]
                    request = None
                    await queue.put(items, sum(len(item.image) for item in items))
                    index, items = index + len(items), None
                try:
                    request = await asyncio.wait_for(anext(rest, None), self._idle_s)
                except asyncio.TimeoutError:  # not the builtin before Python 3.11
                    raise DeadlineExceeded(f"the stream sent nothing for {self._idle_s:g} s: it "
                                           "is closed; send the rest in a new stream") from None
                if request is None:
                    break
                number += 1
        except ServiceError as exc:
            await queue.put([exc])
            return
        except Exception as exc:  # noqa: BLE001 - e.g. an undecodable message
            await queue.put([InvalidArgument(f"request stream message {number + 1}: {exc}")])
            return
        await queue.put([_END])

    async def _work(self, queue: _ReadAhead, out: asyncio.Queue, room: asyncio.Semaphore,
                    reader: asyncio.Task) -> None:
        """Embed batch n+1 while batch n is written; each write task answers
        its batch as soon as it returns, after the batch before it. A batch
        starts only while fewer than RESULTS_AHEAD responses wait unsent."""
        writing: asyncio.Task | None = None
        try:
            done = False
            while not done:
                items, done = await self._next_batch(queue)
                if not items:
                    continue
                try:
                    await asyncio.wait_for(room.acquire(), self._idle_s)
                except asyncio.TimeoutError:  # not the builtin before Python 3.11
                    reader.cancel()  # read no more: what it holds is let go
                    raise DeadlineExceeded(
                        f"the caller read none of its results for {self._idle_s:g} s: the stream "
                        "is closed; read the responses as they come (items after the "
                        "acknowledged ones were not stored)") from None
                batch = await self._prepare(items)
                try:
                    if writing is not None:  # shielded: a write runs to its end (see finally)
                        await asyncio.shield(writing)
                except BaseException as exc:  # batch will never be written: free its ids
                    self._in_flight.settle(self._collection, dict.fromkeys(batch.claims, _why(exc)))
                    raise
                writing = asyncio.create_task(self._store_batch(batch, out))
                items = batch = None  # the write holds them now, and lets them go when done
            if writing is not None:
                await asyncio.shield(writing)
            out.put_nowait(_END)
        except Exception as exc:  # noqa: BLE001 - the caller must get a status, whatever it is
            error = _as_service_error(exc)
            if writing is not None:  # what the write in flight stored is acknowledged first
                try:
                    await asyncio.shield(writing)
                except Exception as write_error:  # noqa: BLE001 - unless it failed too: report that
                    error = _as_service_error(write_error)
            out.put_nowait(error)
        finally:
            if writing is not None and not writing.done():
                # The caller left: how the write ends is nobody's concern, but
                # it runs to its end so other streams waiting on its ids learn it.
                writing.add_done_callback(lambda task: task.cancelled() or task.exception())

    async def _next_batch(self, queue: _ReadAhead) -> tuple[list[Item], bool]:
        """Wait for one item, then take whatever else is already queued, up to
        the batch size and the batch byte bound. No waiting for more: a quiet
        stream's items are stored (and acknowledged) at once."""
        batch = await queue.take(self._batch_size, self._max_batch_bytes)
        if isinstance(batch[-1], Item):
            return batch, False
        end = batch.pop()
        if end is not _END:  # the stream itself broke
            raise end
        return batch, True

    async def _prepare(self, items: list[Item]) -> _Batch:
        """Check and plan a batch, skip what is stored, embed the rest."""
        # Hashing releases the GIL: off the event loop, it runs beside it.
        ids = await asyncio.get_running_loop().run_in_executor(
            None, lambda: [image_id(item.image) if item.image else "" for item in items])
        errors = {item.index: error for item in items
                  if (error := validation.item_error(item.image, item.uri, item.metadata))}
        busy = self._in_flight.busy(self._collection, ids)
        todo = plan(items, ids, errors, set(busy))
        results = {item.index: Outcome(item.index, id_, item.uri, Status.FAILED,
                                       todo.failed[item.index])
                   for item, id_ in zip(items, ids) if item.index in todo.failed}
        claimed = self._in_flight.claim(self._collection, list(todo.embed))
        follow = [(item, id_, busy.get(id_) or claimed[id_]) for item, id_ in todo.follow]
        claims = dict.fromkeys(claimed, "")
        try:
            present = await self._shared.existing(self._collection, list(todo.embed)) \
                if self._model else set()
            new = [(id_, item) for id_, item in todo.embed.items() if id_ not in present]
            vectors, model = await self._embedder.encode_images(
                [item.image for _, item in new], self._model, self._context) if new else ([], None)
            if self._model is None and model is not None:
                await self._create(model)
            rows = []
            for (id_, item), vector in zip(new, vectors):
                if isinstance(vector, str):
                    claims[id_] = vector
                    results[item.index] = Outcome(item.index, id_, item.uri, Status.FAILED, vector)
                else:
                    rows.append(Row(id=id_, vector=vector, uri=item.uri,
                                    metadata=item.metadata))
                    results[item.index] = Outcome(item.index, id_, item.uri, Status.INSERTED)
            for id_ in present:
                item = todo.embed[id_]
                results[item.index] = Outcome(item.index, id_, item.uri, Status.ALREADY_PRESENT)
        except BaseException as exc:  # nothing of it will be written: waiters must not hang
            self._in_flight.settle(self._collection, dict.fromkeys(claimed, _why(exc)))
            raise
        return _Batch(items, rows, results, claims, follow,
                      follows_others=any(id_ in busy for _, id_ in todo.follow),
                      found=bool(present))

    async def _create(self, model: ModelIdentity) -> None:
        """Create the collection for the model of the first vectors. Another
        process may have created it first, for another model."""
        built = await self._store.create(self._collection, model)
        if not built.same(model):
            raise ModelMismatch(f"collection {self._collection!r} was just created by another "
                                f"process for model {built}, but the embedder serves model "
                                f"{model}: run embedders of one model")
        self._model = built

    async def _store_batch(self, batch: _Batch, out: asyncio.Queue) -> None:
        try:
            stamp = await self._shared.write(self._collection, batch.rows)
        except BaseException as exc:
            self._in_flight.settle(self._collection, dict.fromkeys(batch.claims, _why(exc)))
            raise
        self._in_flight.settle(self._collection, batch.claims)
        for item, id_, write in batch.follow:  # a copy's fate is its first copy's
            error = await write
            batch.results[item.index] = Outcome(
                item.index, id_, item.uri, Status.FAILED if error else Status.ALREADY_PRESENT, error)
        token = await batch_token(self._store, stamp, batch.found, batch.follows_others)
        outcomes = [batch.results[item.index] for item in batch.items]
        for status, count in collections.Counter(o.status for o in outcomes).items():
            INGESTED.labels(status.name.lower()).inc(count)
        out.put_nowait(Stored(outcomes, token))
