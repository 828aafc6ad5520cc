"""The imagesearch.v1.ImageSearchService gRPC servicer: validate, delegate,
and turn the domain's answers into messages (the only module that does).

Checks live in validation.py, the ingest pipeline in ingest.py, Milvus
behind the awaited `store.Store`, and the embedder behind
embedder_client.py.
"""
from __future__ import annotations

import asyncio
import functools
import logging
from typing import AsyncIterator

import grpc

from imagesearch.status import abort_with
from imagesearch.v1 import embedder_pb2, search_pb2, search_pb2_grpc
from search_service import validation
from search_service.domain import MAX_JSON_BYTES, MAX_URI_LENGTH, ModelIdentity, Stored
from search_service.embedder_client import EmbedderPool
from search_service.errors import (CollectionNotFound, DependencyUnavailable, InvalidArgument,
                                   OutOfRange, ServiceError)
from search_service.ingest import InFlight, IngestPipeline, IngestSettings, SharedCalls
from search_service.store import Store

log = logging.getLogger(__name__)

_PROBE_TIMEOUT_S = 2.0  # an embedder slower than this to answer a health check is down
# The largest hit a row can make (uri, metadata at Milvus's JSON limit, id,
# score, framing), and hits whose rows are read at once when that many
# could exceed a message.
_MAX_HIT_BYTES = MAX_URI_LENGTH + MAX_JSON_BYTES + 256
_ROWS_READ = 32


def _answers_errors(method):
    """Turn a ServiceError raised in a unary method into its gRPC status."""
    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except ServiceError as exc:
            await _abort(context, exc)
    return wrapper


async def _abort(context: grpc.aio.ServicerContext, exc: ServiceError) -> None:
    """End the call with the status of `exc` and its reason (ErrorInfo); a
    mistake in a named field also comes as a google.rpc.BadRequest detail."""
    field = exc.field if isinstance(exc, InvalidArgument) else ""
    await abort_with(context, exc.code, str(exc), exc.reason, [(field, str(exc))] if field else [])


def _model(identity: ModelIdentity) -> embedder_pb2.ModelIdentity:
    return embedder_pb2.ModelIdentity(name=identity.name, dim=identity.dim,
                                      fingerprint=identity.fingerprint)


def _ingest_response(stored: Stored) -> search_pb2.IngestResponse:
    return search_pb2.IngestResponse(consistency_token=stored.token, results=[
        search_pb2.IngestResult(index=o.index, id=o.id, uri=o.uri, status=int(o.status),
                                error=o.error) for o in stored.outcomes])


def _hits(hits: list[dict]) -> list[tuple[search_pb2.Hit, int]]:
    """Each hit's message, and what it adds to a response (its tag and length too)."""
    made = [search_pb2.Hit(**hit) for hit in hits]
    return [(hit, hit.ByteSize() + 8) for hit in made]


class ImageSearchServicer(search_pb2_grpc.ImageSearchServiceServicer):
    def __init__(self, store: Store, embedder: EmbedderPool, default_collection: str,
                 ingest: IngestSettings, max_message_bytes: int) -> None:
        self._store = store
        self._embedder = embedder
        self._default_collection = default_collection
        self._ingest = ingest
        self._max_message_bytes = max_message_bytes
        self._in_flight = InFlight()
        self._shared = SharedCalls(store)

    async def check_default_collection(self, retry_s: float = 5.0) -> None:
        """At start-up, create the default collection for the embedder's model
        (so a fresh system searches empty), or say at once if it belongs to
        another model; while Milvus or the embedder cannot answer, try again."""
        while True:
            try:
                model = await self._embedder.model_info()
                built = await self._store.create(self._default_collection, model)
                if not built.same(model):
                    log.error("default collection %r holds vectors of model %s, but the embedder "
                              "serves model %s: searches and ingests into it will fail with "
                              "FAILED_PRECONDITION until embedders of its model run",
                              self._default_collection, built, model)
                return
            except DependencyUnavailable as exc:
                log.warning("default collection %r not checked yet (again in %.0f s): %s",
                            self._default_collection, retry_s, exc)
            except ServiceError as exc:
                log.error("default collection %r: %s", self._default_collection, exc)
                return
            await asyncio.sleep(retry_s)

    async def dependency_problems(self) -> dict[str, str]:
        """Why a dependency cannot serve now, by name ("embedder", "milvus");
        empty when both answer."""
        problems = {}
        for name, check in (("embedder", self._embedder.check(_PROBE_TIMEOUT_S)),
                            ("milvus", self._store.ping())):
            try:
                await check
            except ServiceError as exc:
                problems[name] = str(exc)
        return problems

    async def _search(self, request, encode, answer):
        """A search: validate, find the collection's model, get the query's
        vector from an embedder of that model (`encode(model)`), ask Milvus;
        `answer` is the response type."""
        query = validation.Query(request)
        collection = validation.collection(request.collection, self._default_collection)
        try:
            model = await self._store.open(collection)
        except CollectionNotFound:
            if collection != self._default_collection:
                raise
            # Nothing ingested yet (the start-up check creates it once the
            # embedder answers): empty, but only if the embedder answers too.
            await encode(None)
            return answer()
        vector = (await encode(model)).tolist()
        # Bounded before it is paid: when the hits asked for could exceed one
        # message at the largest row Milvus stores, Milvus returns ids and
        # scores only, and their rows are read _ROWS_READ at a time until
        # they fit, or OutOfRange says how many would.
        budget = self._max_message_bytes - 1024
        whole = query.limit * _MAX_HIT_BYTES <= budget
        hits = await self._store.search(collection, vector, query.limit, query.offset,
                                        query.expr, query.after, fields=whole)
        next_offset = query.offset + query.top_k if len(hits) > query.top_k else 0
        hits = hits[:query.top_k]
        if query.min_score is not None:  # hits come best first
            hits = [hit for hit in hits if hit["score"] >= query.min_score]
        response, size = answer(next_offset=next_offset), 0
        parts = [hits] if whole else [hits[i:i + _ROWS_READ] for i in range(0, len(hits), _ROWS_READ)]
        for part in parts:
            if not whole:
                rows = await self._store.rows(collection, [hit["id"] for hit in part], query.after)
                part = [{**hit, **rows[hit["id"]]} for hit in part if hit["id"] in rows]
            # Messages are built and sized off the event loop: thousands of
            # metadata entries take long enough to stall every other call.
            for hit, hit_size in await asyncio.to_thread(_hits, part):
                size += hit_size
                if size > budget:
                    raise OutOfRange(
                        f"the {len(hits)} hits are over the {self._max_message_bytes}-byte "
                        "response limit: ask for fewer (a lower top_k), at most "
                        f"{len(response.hits)}, or page with offset")
                response.hits.append(hit)
        return response

    @_answers_errors
    async def SearchByText(self, request, context):
        if not request.query.strip():
            raise InvalidArgument("query is empty: give the text to search for", "query")
        return await self._search(request, lambda model: self._embedder.encode_text(
            request.query, model, context), search_pb2.SearchByTextResponse)

    @_answers_errors
    async def SearchByImage(self, request, context):
        if not request.image:
            raise InvalidArgument("image is empty: send the bytes of an image file", "image")

        async def encode(model: ModelIdentity | None):
            [vector], _ = await self._embedder.encode_images([request.image], model, context)
            if isinstance(vector, str):
                raise InvalidArgument(f"image: {vector}", "image")
            return vector
        return await self._search(request, encode, search_pb2.SearchByImageResponse)

    @_answers_errors
    async def Delete(self, request, context):
        ids = validation.delete_ids(list(request.ids))
        collection = validation.collection(request.collection, self._default_collection)
        await self._store.open(collection)
        deleted = await self._store.delete(collection, ids)
        token = await self._store.token()  # a fresh one: after the delete
        return search_pb2.DeleteResponse(deleted=len(deleted), consistency_token=token,
                                         missing=[i for i in dict.fromkeys(ids) if i not in deleted])

    @_answers_errors
    async def GetStats(self, request, context):
        collection = validation.collection(request.collection, self._default_collection)
        after = validation.read_after(request.consistency_token)
        model = await self._store.open(collection)
        count = await self._store.count(collection, after)
        return search_pb2.GetStatsResponse(collection=collection, count=count, model=_model(model))

    async def Ingest(self, request_iterator, context) -> AsyncIterator[search_pb2.IngestResponse]:
        requests = aiter(request_iterator)
        try:
            try:
                first = await anext(requests, None)
            except Exception as exc:  # noqa: BLE001 - an undecodable message
                raise InvalidArgument(f"request stream message 0: {exc}") from exc
            if first is None:
                return  # an empty stream stores nothing
            collection = validation.collection(first.collection, self._default_collection)
            batches = IngestPipeline(collection, self._store, self._shared, self._embedder,
                                     self._in_flight, self._ingest, context).run(first, requests)
            del first  # the pipeline lets it go once its items are read
            async for stored in batches:
                yield _ingest_response(stored)
        except ServiceError as exc:
            await _abort(context, exc)
