"""The imagesearch.v1.ImageSearch gRPC servicer.

Requests are validated here; vectors come from the embedder client and rows
from the store. Milvus calls are blocking, so they run on a small pool of
threads and never stall the event loop.
"""
from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import AsyncIterator

from prometheus_client import Counter

from imagesearch.v1 import search_pb2, search_pb2_grpc
from search_service import filters
from search_service.embedder_client import EmbedderClient
from search_service.errors import DependencyUnavailable, InvalidArgument, ServiceError
from search_service.store import MAX_RESULT_WINDOW, MAX_URI_LENGTH, MilvusStore, Row

log = logging.getLogger(__name__)

MAX_TOP_K = 1024
MAX_DELETE_IDS = 16384
MAX_METADATA_BYTES = 65536  # Milvus's limit for one JSON value
_COLLECTION_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}")
_IMAGE_ID = re.compile(r"[0-9a-f]{64}")
_END = object()  # end of the ingest request stream
_PROBE_TIMEOUT_S = 2.0  # an embedder slower than this to answer a health check is down
_MILVUS_THREADS = 8  # concurrent Milvus calls; a slow one does not hold up the rest

Result = search_pb2.IngestResult
INGESTED = Counter("search_images_ingested_total",
                   "Ingest results, by status (inserted, already_present, failed)", ["status"])


def image_id(data: bytes) -> str:
    """Content address of an image: re-ingesting the same bytes finds the same row."""
    return hashlib.sha256(data).hexdigest()


def _answers_errors(method):
    """Turn a ServiceError raised in a unary method into its gRPC status."""
    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except ServiceError as exc:
            await context.abort(exc.code, str(exc))
    return wrapper


def _top_k(value: int) -> int:
    if not 1 <= value <= MAX_TOP_K:
        raise InvalidArgument(f"top_k must be between 1 and {MAX_TOP_K}, got {value}")
    return value


class _Query:
    """The validated search options of a SearchByText or SearchByImage request."""

    def __init__(self, request) -> None:
        self.top_k = _top_k(request.top_k)
        self.offset = request.offset
        if self.offset < 0:
            raise InvalidArgument(f"offset must be 0 or more, got {self.offset}")
        if self.top_k + self.offset > MAX_RESULT_WINDOW:
            raise InvalidArgument(f"top_k + offset must be at most {MAX_RESULT_WINDOW}, got "
                                  f"{self.top_k + self.offset}")
        self.min_score = request.min_score if request.HasField("min_score") else None
        if self.min_score is not None and not -1.0 <= self.min_score <= 1.0:  # NaN fails too
            raise InvalidArgument(f"min_score must be between -1 and 1, got {self.min_score}")
        self.expr = filters.build(request.filter)


@dataclass
class _Embedded:
    """A batch between embedding and its Milvus write."""
    rows: list[Row]
    results: list[Result]


class _ReadAhead:
    """The ingest read-ahead: at most `max_items` requests and `max_bytes` of
    image bytes (a larger single item still fits alone). One reader puts,
    one consumer takes."""

    def __init__(self, max_items: int, max_bytes: int) -> None:
        self._queue: asyncio.Queue = asyncio.Queue(max_items)
        self._bytes, self._max_bytes = 0, max_bytes
        self._taken = asyncio.Event()

    async def put(self, item, size: int = 0) -> None:
        while self._bytes and self._bytes + size > self._max_bytes:
            self._taken.clear()
            await self._taken.wait()
        self._bytes += size
        await self._queue.put((item, size))

    def _release(self, entry):
        item, size = entry
        self._bytes -= size
        self._taken.set()
        return item

    async def get(self):
        return self._release(await self._queue.get())

    def get_nowait(self):
        return self._release(self._queue.get_nowait())

    def empty(self) -> bool:
        return self._queue.empty()


class ImageSearchServicer(search_pb2_grpc.ImageSearchServicer):
    def __init__(self, store: MilvusStore, embedder: EmbedderClient, default_collection: str,
                 ingest_batch: int, max_message_bytes: int) -> None:
        self._store = store
        self._embedder = embedder
        self._default_collection = default_collection
        self._batch_size = ingest_batch
        self._max_batch_bytes = max_message_bytes // 2
        self._milvus_thread = ThreadPoolExecutor(_MILVUS_THREADS, thread_name_prefix="milvus")

    async def _milvus(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._milvus_thread, fn, *args)

    async def check_default_collection(self, retry_s: float = 5.0) -> None:
        """At start-up, say at once if the default collection belongs to another
        model; while Milvus or the embedder cannot answer, try again."""
        while True:
            try:
                await self._open(self._default_collection, None)
                return
            except DependencyUnavailable as exc:
                log.warning("default collection %r not checked yet (again in %.0f s): %s",
                            self._default_collection, retry_s, exc)
            except ServiceError as exc:
                log.error("default collection %r: %s", self._default_collection, exc)
                return
            await asyncio.sleep(retry_s)

    def close(self) -> None:
        """Let in-flight Milvus calls finish, and start no more: Milvus Lite
        runs inside this process and must not stop under a call."""
        self._milvus_thread.shutdown(wait=True, cancel_futures=True)

    async def dependency_problems(self) -> dict[str, str]:
        """Why the service cannot serve now, by dependency ("embedder",
        "milvus"); empty when both answer."""
        problems = {}
        for name, check in (("embedder", self._embedder.check(_PROBE_TIMEOUT_S)),
                            ("milvus", self._milvus(self._store.ping))):
            try:
                await check
            except ServiceError as exc:
                problems[name] = str(exc)
        return problems

    def _collection(self, name: str) -> str:
        name = name or self._default_collection
        if not _COLLECTION_NAME.fullmatch(name):
            raise InvalidArgument(f"collection name {name!r} is invalid: use letters, digits and "
                                  "underscores, starting with a letter or underscore, at most 255")
        return name

    async def _open(self, name: str, context, *, with_model: bool = True, create: bool = False) -> str:
        """Validate the name; check the collection exists and matches the embedder's model.
        The default collection is created on first use, so a fresh system searches empty."""
        name = self._collection(name)
        model = await self._embedder.model(context) if with_model else None
        await self._milvus(self._store.open, name, model, create or name == self._default_collection)
        return name

    async def _search(self, vector, query: _Query, collection: str) -> search_pb2.SearchResponse:
        hits = await self._milvus(self._store.search, collection, vector.tolist(), query.top_k,
                                  query.offset, query.expr)
        if query.min_score is not None:  # hits come best first
            hits = [hit for hit in hits if hit["score"] >= query.min_score]
        return search_pb2.SearchResponse(hits=[search_pb2.Hit(**hit) for hit in hits])

    @_answers_errors
    async def SearchByText(self, request, context):
        if not request.query.strip():
            raise InvalidArgument("query is empty: give the text to search for")
        query = _Query(request)
        collection = await self._open(request.collection, context)
        vector = await self._embedder.encode_text(request.query, context)
        return await self._search(vector, query, collection)

    @_answers_errors
    async def SearchByImage(self, request, context):
        if not request.image:
            raise InvalidArgument("image is empty: send the bytes of an image file")
        query = _Query(request)
        collection = await self._open(request.collection, context)
        [vector] = await self._embedder.encode_images([request.image], context)
        if isinstance(vector, str):
            raise InvalidArgument(f"image: {vector}")
        return await self._search(vector, query, collection)

    @_answers_errors
    async def Delete(self, request, context):
        ids = list(request.ids)
        if not ids:
            raise InvalidArgument("no ids to delete")
        if len(ids) > MAX_DELETE_IDS:
            raise InvalidArgument(f"{len(ids)} ids in one request; the limit is {MAX_DELETE_IDS}")
        for i, id_ in enumerate(ids):
            if not _IMAGE_ID.fullmatch(id_):
                raise InvalidArgument(f"ids[{i}] = {id_[:80]!r} is not an image id "
                                      "(64 lowercase hex characters, as Ingest returns)")
        collection = await self._open(request.collection, context, with_model=False)
        deleted = await self._milvus(self._store.delete, collection, ids)
        return search_pb2.DeleteResponse(deleted=len(deleted),
                                         missing=[i for i in dict.fromkeys(ids) if i not in deleted])

    @_answers_errors
    async def GetStats(self, request, context):
        collection = await self._open(request.collection, context, with_model=False)
        built = await self._milvus(self._store.describe, collection)
        count = await self._milvus(self._store.count, collection)
        return search_pb2.Stats(collection=collection, count=count, dim=built.dim,
                                model=built.name, model_fingerprint=built.fingerprint)

    async def Ingest(self, request_iterator, context) -> AsyncIterator[Result]:
        """Read the stream ahead into a bounded queue (memory stays bounded: the
        client is throttled by gRPC flow control) and store it batch by batch,
        embedding batch n+1 while batch n is written to Milvus. Results are
        sent only once their batch is written, in stream order."""
        queue = _ReadAhead(2 * self._batch_size, 2 * self._max_batch_bytes)

        async def read() -> None:
            index = 0
            try:
                async for request in request_iterator:
                    await queue.put((index, request), len(request.image))
                    index += 1
            except Exception as exc:  # noqa: BLE001 - e.g. an undecodable message
                await queue.put(InvalidArgument(f"request stream item {index}: {exc}"))
                return
            await queue.put(_END)

        reader = asyncio.create_task(read())
        writing: asyncio.Task | None = None  # the previous batch's write
        written_ids: set[str] = set()  # ids that batch writes: present for the next one
        try:
            collection = None
            while True:
                batch, done = await self._next_batch(queue)
                if batch and collection is None:
                    collection = await self._open(batch[0][1].collection, context, create=True)
                embedded = await self._embed_batch(collection, batch, written_ids, context)
                if writing is not None:
                    for result in await writing:
                        yield result
                writing = asyncio.create_task(self._write_batch(collection, embedded))
                written_ids = {row.id for row in embedded.rows}
                if done:
                    break
            for result in await writing:
                yield result
            writing = None
            await reader
        except ServiceError as exc:
            if writing is not None:  # what the write in flight stored is acknowledged first
                try:
                    for result in await writing:
                        yield result
                except ServiceError as write_error:  # unless it failed too: report that
                    exc = write_error
                writing = None
            await context.abort(exc.code, str(exc))
        finally:
            reader.cancel()
            if writing is not None:
                # The client left: nothing of this write was acknowledged, and
                # how it ends is nobody's concern (retrieved, so not logged).
                writing.add_done_callback(lambda task: task.cancelled() or task.exception())

    async def _next_batch(self, queue: "_ReadAhead") -> tuple[list, bool]:
        """Wait for one item, then take whatever else is already queued, up to
        the batch size and half the message limit in image bytes (so one
        embedder request never crosses it)."""
        batch, size = [], 0
        item = await queue.get()
        while item is not _END:
            if isinstance(item, ServiceError):  # the stream itself broke
                raise item
            batch.append(item)
            size += len(item[1].image)
            if len(batch) == self._batch_size or size >= self._max_batch_bytes or queue.empty():
                return batch, False
            item = queue.get_nowait()
        return batch, True

    async def _embed_batch(self, collection: str, batch, written: set[str],
                           context) -> _Embedded:
        """Check a batch, skip what is stored (or being written by the previous
        batch, `written`), and embed the rest: the rows to write and every
        item's result once they are."""
        results: dict[int, Result] = {}
        todo: dict[str, tuple[int, search_pb2.IngestRequest]] = {}  # id -> first item with it
        repeats: list[tuple[int, str, str]] = []  # later items with the same bytes: index, id, uri
        # Hashing releases the GIL: off the event loop, it runs beside it.
        ids = await asyncio.get_running_loop().run_in_executor(
            None, lambda: [image_id(request.image) if request.image else "" for _, request in batch])
        for (index, request), id_ in zip(batch, ids):
            error = self._item_error(request, collection)
            if error:
                results[index] = Result(index=index, id=id_, uri=request.uri,
                                        status=Result.FAILED, error=error)
            elif id_ in todo:
                repeats.append((index, id_, request.uri))
            else:
                todo[id_] = (index, request)
        present = written & todo.keys()
        present |= await self._milvus(self._store.existing_ids, collection,
                                      [id_ for id_ in todo if id_ not in present])
        new = [(id_, index, request) for id_, (index, request) in todo.items() if id_ not in present]
        vectors = await self._embedder.encode_images([r.image for _, _, r in new], context) if new else []
        rows = []
        for (id_, index, request), vector in zip(new, vectors):
            if isinstance(vector, str):
                results[index] = Result(index=index, id=id_, uri=request.uri,
                                        status=Result.FAILED, error=vector)
            else:
                rows.append(Row(id=id_, vector=vector.tolist(), uri=request.uri,
                                metadata=dict(request.metadata)))
                results[index] = Result(index=index, id=id_, uri=request.uri, status=Result.INSERTED)
        for id_ in present:
            index, request = todo[id_]
            results[index] = Result(index=index, id=id_, uri=request.uri,
                                    status=Result.ALREADY_PRESENT)
        for index, id_, uri in repeats:  # a repeat shares the fate of the first copy
            first = results[todo[id_][0]]
            status = Result.FAILED if first.status == Result.FAILED else Result.ALREADY_PRESENT
            results[index] = Result(index=index, id=id_, uri=uri, status=status, error=first.error)
        return _Embedded(rows, [results[index] for index, _ in batch])

    async def _write_batch(self, collection: str, embedded: _Embedded) -> list[Result]:
        await self._milvus(self._store.write, collection, embedded.rows)
        for result in embedded.results:
            INGESTED.labels(Result.Status.Name(result.status).lower()).inc()
        return embedded.results

    def _item_error(self, request: search_pb2.IngestRequest, collection: str) -> str:
        if not request.image:
            return "empty image bytes"
        if request.collection and request.collection != collection:
            return (f"names collection {request.collection!r}, but this stream writes to "
                    f"{collection!r}: use one stream per collection")
        if len(request.uri.encode()) > MAX_URI_LENGTH:
            return f"uri is longer than {MAX_URI_LENGTH} bytes"
        if len(json.dumps(dict(request.metadata))) > MAX_METADATA_BYTES:
            return f"metadata is larger than {MAX_METADATA_BYTES} bytes as JSON"
        return ""
