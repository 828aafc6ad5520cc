"""Typed Python clients for both services (no torch, no Milvus): blocking
(`SearchClient`, `EmbedderClient`) and their asyncio twins
(`AsyncSearchClient`, `AsyncEmbedderClient`).

    from imagesearch.client import SearchClient
    with SearchClient("localhost:50052") as client:
        for hit in client.search_text("a white dog", top_k=10):
            print(hit.score, hit.uri)

Every call returns typed results (dataclasses), and a failure raises an
`imagesearch.errors.ImageSearchError` subclass chosen by status code and
reason (`EmbedderUnavailable`, `ModelMismatch`, `InvalidArgument` with its
`field_violations`, ...); each is a `grpc.RpcError` too.

A SearchClient reads its own writes: it keeps the consistency token of the
newest Ingest or Delete it made and passes it with every search and stats
call, through any replica of the search service. Other writers' images show
up within Milvus's staleness bound (a few seconds), or at once for a read
given their token (`consistency_token=`).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import AsyncIterator, ClassVar, Iterable, Iterator, Mapping

import grpc
import numpy as np

from imagesearch.errors import from_rpc_error
from imagesearch.security import bearer, channel_credentials
from imagesearch.channels import channel_options
from imagesearch.v1 import embedder_pb2, embedder_pb2_grpc, search_pb2, search_pb2_grpc

DEFAULT_SEARCH_SERVER = "localhost:50052"
DEFAULT_EMBEDDER_SERVER = "localhost:50051"

_ITEMS_PER_MESSAGE = 32  # images sent in one Ingest message: one receive, not 32


@dataclass(frozen=True)
class ModelIdentity:
    """Which model made a collection's vectors: name, weights fingerprint, dimension."""
    name: str
    fingerprint: str
    dim: int

    @classmethod
    def of(cls, message) -> "ModelIdentity":
        return cls(name=message.name, fingerprint=message.fingerprint, dim=message.dim)


class IngestStatus(enum.IntEnum):
    INSERTED = 1  # newly stored
    ALREADY_PRESENT = 2  # the same bytes were stored before; nothing changed
    FAILED = 3  # not stored: `error` says why


@dataclass(frozen=True)
class IngestResult:
    """One item's outcome; INSERTED and ALREADY_PRESENT acknowledge it."""
    index: int  # position in the stream, from 0
    id: str  # SHA-256 hex of the image bytes ("" for an empty image)
    uri: str
    status: IngestStatus
    error: str = ""
    STATUS_INSERTED: ClassVar[IngestStatus] = IngestStatus.INSERTED
    STATUS_ALREADY_PRESENT: ClassVar[IngestStatus] = IngestStatus.ALREADY_PRESENT
    STATUS_FAILED: ClassVar[IngestStatus] = IngestStatus.FAILED


@dataclass(frozen=True)
class Deleted:
    deleted: int  # how many of the ids were present and are now removed
    missing: list[str]  # ids that were not in the collection
    consistency_token: bytes


@dataclass(frozen=True)
class Stats:
    collection: str
    count: int  # images stored
    model: ModelIdentity


@dataclass(frozen=True)
class Limits:
    max_batch_items: int  # items in one request
    max_request_bytes: int
    max_image_pixels: int


@dataclass(frozen=True)
class ModelInfo:
    model: ModelIdentity
    device: str
    dtype: str
    max_text_tokens: int
    limits: Limits


class Hits(list):
    """Hits, best first; `next_offset` pages on (0: no more hits)."""
    next_offset: int = 0


@dataclass(frozen=True)
class Hit:
    id: str
    score: float
    uri: str
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class IngestItem:
    image: bytes
    uri: str = ""
    metadata: dict[str, str] = field(default_factory=dict)


def search_options(where: Mapping[str, str | Iterable[str]] | None = None, uri_prefix: str = "",
                   offset: int = 0, min_score: float | None = None) -> dict:
    """Request fields for the filter and paging options of a search.

    where: metadata key -> value, or several values (any of them matches);
        all keys must match. uri_prefix: only uris that start with it.
    offset: hits to skip (paging). min_score: drop hits scoring below it.
    """
    metadata = {key: search_pb2.AnyOf(values=[values] if isinstance(values, str) else list(values))
                for key, values in (where or {}).items()}
    fields: dict = {"filter": search_pb2.Filter(metadata=metadata, uri_prefix=uri_prefix),
                    "offset": offset}
    if min_score is not None:
        fields["min_score"] = min_score
    return fields


@dataclass(frozen=True)
class Security:
    """How a client connects: TLS trusting `tls_ca` (the system roots when
    empty) once any TLS field is set, `tls_cert`/`tls_key` for mutual TLS,
    and a bearer `token` for servers that require one."""
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    token: str = field(default="", repr=False)

    @property
    def tls(self) -> bool:
        return bool(self.tls_ca or self.tls_cert)

    def channel(self, server: str, options: list, aio: bool = False):
        """A blocking channel, or a grpc.aio one with `aio`."""
        kind = grpc.aio if aio else grpc
        if self.tls:
            return kind.secure_channel(server, channel_credentials(
                self.tls_ca, self.tls_cert, self.tls_key), options)
        return kind.insecure_channel(server, options)


def _messages(items: Iterable[IngestItem], collection: str, max_bytes: int
              ) -> Iterator[search_pb2.IngestRequest]:
    """Items grouped into messages of up to 32 images and half the message
    limit (`max_bytes`), counted as encoded (uri, metadata and framing included)."""
    request, size = search_pb2.IngestRequest(collection=collection), 0
    for item in items:
        entry = search_pb2.IngestItem(image=item.image, uri=item.uri, metadata=item.metadata)
        cost = entry.ByteSize() + 6  # the field's tag and length
        if request.items and (len(request.items) == _ITEMS_PER_MESSAGE
                              or size + cost > max_bytes // 2):
            yield request
            request, size = search_pb2.IngestRequest(), 0
        request.items.append(entry)
        size += cost
    if request.items:
        yield request


# Requests and results, shared by the blocking clients and their async twins.

def _text_request(query: str, top_k: int, collection: str, token: bytes, options: dict):
    return search_pb2.SearchByTextRequest(query=query, top_k=top_k, collection=collection,
                                          consistency_token=token, **search_options(**options))


def _image_request(image: bytes, top_k: int, collection: str, token: bytes, options: dict):
    return search_pb2.SearchByImageRequest(image=image, top_k=top_k, collection=collection,
                                           consistency_token=token, **search_options(**options))


def _hits(response) -> Hits:
    hits = Hits(Hit(id=h.id, score=h.score, uri=h.uri, metadata=dict(h.metadata))
                for h in response.hits)
    hits.next_offset = response.next_offset
    return hits


def _results(response) -> list[IngestResult]:
    return [IngestResult(r.index, r.id, r.uri, IngestStatus(r.status), r.error)
            for r in response.results]


def _deleted(response) -> Deleted:
    return Deleted(response.deleted, list(response.missing), response.consistency_token)


def _stats(response) -> Stats:
    return Stats(response.collection, response.count, ModelIdentity.of(response.model))


def _matrix(response) -> np.ndarray:
    return np.stack([np.frombuffer(e.vector, dtype="<f4") for e in response.embeddings])


def _model_info(info) -> ModelInfo:
    return ModelInfo(ModelIdentity.of(info.model), info.device, info.dtype, info.max_text_tokens,
                     Limits(info.limits.max_batch_items, info.limits.max_request_bytes,
                            info.limits.max_image_pixels))


class _Client:
    """A channel to one server, with the deadline, token and message limit of its calls."""
    aio = False  # an async twin's channel is grpc.aio's

    def __init__(self, server: str, timeout_s: float, max_message_mb: int,
                 security: Security | None = None) -> None:
        self.server = server
        self.timeout_s = timeout_s
        self.max_message_bytes = max_message_mb << 20
        security = security or Security()
        self._channel = security.channel(server, channel_options(max_message_mb << 20), self.aio)
        self._metadata = bearer(security.token)
        # The newest write of this client: tokens compare as byte strings.
        self.consistency_token = b""

    def _seen(self, token: bytes) -> None:
        self.consistency_token = max(self.consistency_token, token)

    def _unary(self, method, request):
        """`method(request)` with this client's deadline and token; a failure typed."""
        try:
            return method(request, timeout=self.timeout_s, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _AsyncClient(_Client):
    aio = True

    async def _unary(self, method, request):
        try:
            return await method(request, timeout=self.timeout_s, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


class SearchClient(_Client):
    """Client of imagesearch.v1.ImageSearchService."""

    def __init__(self, server: str = DEFAULT_SEARCH_SERVER, timeout_s: float = 60.0,
                 max_message_mb: int = 64, security: Security | None = None) -> None:
        super().__init__(server, timeout_s, max_message_mb, security)
        self._stub = search_pb2_grpc.ImageSearchServiceStub(self._channel)

    def ingest(self, items: Iterable[IngestItem], collection: str = "",
               timeout_s: float | None = None) -> Iterator[IngestResult]:
        """Stream items in; yield one result per item as the server stores them.
        `timeout_s` bounds the whole stream (default: none)."""
        call = self._stub.Ingest(_messages(items, collection, self.max_message_bytes),
                                 timeout=timeout_s, metadata=self._metadata)
        try:
            for response in call:
                self._seen(response.consistency_token)
                yield from _results(response)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        finally:  # the caller stopped early (Ctrl-C, break): end the stream now
            call.cancel()

    def search_text(self, query: str, top_k: int = 10, collection: str = "",
                    **options) -> Hits:
        """`options`: see `search_options`."""
        return _hits(self._unary(self._stub.SearchByText, _text_request(
            query, top_k, collection, self.consistency_token, options)))

    def search_image(self, image: bytes, top_k: int = 10, collection: str = "",
                     **options) -> Hits:
        """`options`: see `search_options`."""
        return _hits(self._unary(self._stub.SearchByImage, _image_request(
            image, top_k, collection, self.consistency_token, options)))

    def delete(self, ids: list[str], collection: str = "") -> Deleted:
        deleted = _deleted(self._unary(self._stub.Delete, search_pb2.DeleteRequest(
            ids=ids, collection=collection)))
        self._seen(deleted.consistency_token)
        return deleted

    def stats(self, collection: str = "") -> Stats:
        return _stats(self._unary(self._stub.GetStats, search_pb2.GetStatsRequest(
            collection=collection, consistency_token=self.consistency_token)))


class AsyncSearchClient(_AsyncClient):
    """SearchClient's twin for asyncio callers: the same calls, awaited
    (`ingest` is an async iterator), the same results and errors."""

    def __init__(self, server: str = DEFAULT_SEARCH_SERVER, timeout_s: float = 60.0,
                 max_message_mb: int = 64, security: Security | None = None) -> None:
        super().__init__(server, timeout_s, max_message_mb, security)
        self._stub = search_pb2_grpc.ImageSearchServiceStub(self._channel)

    async def ingest(self, items: Iterable[IngestItem], collection: str = "",
                     timeout_s: float | None = None) -> AsyncIterator[IngestResult]:
        call = self._stub.Ingest(_messages(items, collection, self.max_message_bytes),
                                 timeout=timeout_s, metadata=self._metadata)
        try:
            async for response in call:
                self._seen(response.consistency_token)
                for result in _results(response):
                    yield result
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            call.cancel()

    async def search_text(self, query: str, top_k: int = 10, collection: str = "",
                          **options) -> Hits:
        return _hits(await self._unary(self._stub.SearchByText, _text_request(
            query, top_k, collection, self.consistency_token, options)))

    async def search_image(self, image: bytes, top_k: int = 10, collection: str = "",
                           **options) -> Hits:
        return _hits(await self._unary(self._stub.SearchByImage, _image_request(
            image, top_k, collection, self.consistency_token, options)))

    async def delete(self, ids: list[str], collection: str = "") -> Deleted:
        deleted = _deleted(await self._unary(self._stub.Delete, search_pb2.DeleteRequest(
            ids=ids, collection=collection)))
        self._seen(deleted.consistency_token)
        return deleted

    async def stats(self, collection: str = "") -> Stats:
        return _stats(await self._unary(self._stub.GetStats, search_pb2.GetStatsRequest(
            collection=collection, consistency_token=self.consistency_token)))


class EmbedderClient(_Client):
    """Client of imagesearch.v1.EmbedderService; vectors come back as float32 numpy rows."""

    def __init__(self, server: str = DEFAULT_EMBEDDER_SERVER, timeout_s: float = 60.0,
                 max_message_mb: int = 64, security: Security | None = None) -> None:
        super().__init__(server, timeout_s, max_message_mb, security)
        self._stub = embedder_pb2_grpc.EmbedderServiceStub(self._channel)

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        return _matrix(self._unary(self._stub.EncodeText, embedder_pb2.EncodeTextRequest(texts=texts)))

    def encode_images(self, images: list[bytes]) -> np.ndarray:
        return _matrix(self._unary(self._stub.EncodeImage,
                                   embedder_pb2.EncodeImageRequest(images=images)))

    def model_info(self) -> ModelInfo:
        return _model_info(self._unary(self._stub.GetModelInfo, embedder_pb2.GetModelInfoRequest()))


class AsyncEmbedderClient(_AsyncClient):
    """EmbedderClient's twin for asyncio callers."""

    def __init__(self, server: str = DEFAULT_EMBEDDER_SERVER, timeout_s: float = 60.0,
                 max_message_mb: int = 64, security: Security | None = None) -> None:
        super().__init__(server, timeout_s, max_message_mb, security)
        self._stub = embedder_pb2_grpc.EmbedderServiceStub(self._channel)

    async def encode_texts(self, texts: list[str]) -> np.ndarray:
        return _matrix(await self._unary(self._stub.EncodeText,
                                         embedder_pb2.EncodeTextRequest(texts=texts)))

    async def encode_images(self, images: list[bytes]) -> np.ndarray:
        return _matrix(await self._unary(self._stub.EncodeImage,
                                         embedder_pb2.EncodeImageRequest(images=images)))

    async def model_info(self) -> ModelInfo:
        return _model_info(await self._unary(self._stub.GetModelInfo,
                                             embedder_pb2.GetModelInfoRequest()))
