"""The Milvus collection: schema, identity check, writes, search, delete, count.

One collection holds the vectors of one model. Its schema is explicit:

    id        VARCHAR(64) primary key, the SHA-256 hex of the image bytes
    vector    FLOAT_VECTOR(dim), L2-normalised, COSINE index
    uri       VARCHAR(4096), where the caller keeps the image
    metadata  JSON, a string-to-string map

and its properties record the model name and weights fingerprint, so that
vectors of two different models never meet in one collection. Every read
uses Strong consistency: a search right after an acknowledged write sees it.

On a Milvus server the vector index is HNSW with configurable M,
efConstruction and search ef; Milvus Lite builds what it supports for
AUTOINDEX (an exact, flat search). Writes are cut into requests of at most
`max_write_bytes`, below the server's gRPC message limit.

The client connects lazily, on each call until a connection succeeds (and
pymilvus reconnects an established client by itself), so the service
starts, and recovers, without a restart while Milvus is down; each call is
bounded by `timeout_s`. Calls are synchronous (pymilvus); the servicer runs
them on worker threads.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass

import grpc
from prometheus_client import Histogram
from pymilvus import DataType, MilvusClient, MilvusException
from pymilvus.exceptions import DataNotMatchException, DataTypeNotMatchException, ParamError

from search_service.errors import (CollectionNotFound, DependencyUnavailable, ModelMismatch,
                                   ServiceError)

log = logging.getLogger(__name__)
MILVUS_CALLS = Histogram("search_milvus_call_seconds",
                         "Milvus call latency, by operation and outcome (ok, error)",
                         ["operation", "outcome"],
                         buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
# pymilvus logs a traceback for every failed call; the service reports each
# failure itself, once, with the status the caller gets.
logging.getLogger("pymilvus").setLevel(logging.CRITICAL)

MAX_URI_LENGTH = 4096
MAX_RESULT_WINDOW = 16384  # Milvus's limit on top_k + offset
_MODEL_PROP = "imagesearch.model"
_FINGERPRINT_PROP = "imagesearch.fingerprint"
_READ = {"consistency_level": "Strong"}
# Raised by pymilvus before any call when a request is malformed.
_REQUEST_ERRORS = (ParamError, DataNotMatchException, DataTypeNotMatchException)
_ROW_OVERHEAD = 128  # bytes per row beyond its fields, in the insert request


@dataclass(frozen=True)
class ModelIdentity:
    name: str
    fingerprint: str
    dim: int


@dataclass(frozen=True)
class Row:
    id: str
    vector: list[float]
    uri: str
    metadata: dict[str, str]

    def size(self) -> int:
        """Bytes this row adds to an insert request (an upper estimate)."""
        return (4 * len(self.vector) + len(self.id) + len(self.uri.encode())
                + len(json.dumps(self.metadata).encode()) + _ROW_OVERHEAD)


@dataclass(frozen=True)
class HnswParams:
    m: int = 16
    ef_construction: int = 200
    ef: int = 64


def chunks(rows: list[Row], max_bytes: int) -> list[list[Row]]:
    """Consecutive runs of rows of at most `max_bytes` each (a larger row goes alone)."""
    out: list[list[Row]] = []
    size = 0
    for row in rows:
        if not out or size + row.size() > max_bytes:
            out.append([])
            size = 0
        out[-1].append(row)
        size += row.size()
    return out


def is_lite(uri: str) -> bool:
    """pymilvus's own rule: a local *.db file is Milvus Lite."""
    return uri.endswith(".db")


class MilvusStore:
    def __init__(self, uri: str, token: str = "", *, timeout_s: float = 10.0,
                 hnsw: HnswParams = HnswParams(), max_write_bytes: int = 16 << 20) -> None:
        self.uri = uri
        self._token = token
        self._timeout_s = timeout_s
        self._hnsw = None if is_lite(uri) else hnsw
        self._max_write_bytes = max_write_bytes
        self._client: MilvusClient | None = None
        self._connect_lock = threading.Lock()
        self._open_lock = threading.Lock()
        # What is known of each collection, so each is checked once per process.
        self._loaded: set[str] = set()
        self._matched: set[tuple[str, ModelIdentity]] = set()  # (collection, model) that match

    def connect(self) -> MilvusClient:
        """The client, connecting first if there is none (yet, or since a failure)."""
        with self._connect_lock:
            if self._client is None:
                try:
                    self._client = MilvusClient(uri=self.uri, token=self._token,
                                                timeout=self._timeout_s)
                except (MilvusException, OSError) as exc:
                    raise DependencyUnavailable(
                        f"Milvus at {self.uri} is unavailable (connect): {_message(exc)}; "
                        "retry with backoff") from exc
            return self._client

    def _error(self, action: str, exc: Exception) -> ServiceError:
        """INTERNAL when Milvus refused the request itself (our bug: a retry
        cannot help); UNAVAILABLE for the rest, which a retry may fix: no
        connection, a timeout, a server still recovering after a restart."""
        # A collection may have been dropped, released or restored meanwhile.
        self._loaded.clear()
        self._matched.clear()
        if isinstance(exc, _REQUEST_ERRORS) or getattr(exc, "is_input_error", False):
            return ServiceError(f"Milvus refused to {action}: {_message(exc)}")
        return DependencyUnavailable(f"Milvus at {self.uri} is unavailable ({action}): "
                                     f"{_message(exc)}; retry with backoff")

    def _call(self, action: str, method: str, *args, **kwargs):
        client = self.connect()
        started, outcome = time.perf_counter(), "error"
        try:
            result = getattr(client, method)(*args, timeout=self._timeout_s, **kwargs)
            outcome = "ok"
            return result
        except (MilvusException, grpc.RpcError) as exc:
            raise self._error(action, exc) from exc
        finally:
            MILVUS_CALLS.labels(method, outcome).observe(time.perf_counter() - started)

    def open(self, name: str, model: ModelIdentity | None = None, create: bool = False) -> None:
        """Make sure `name` exists (created for `model` if `create`) and is
        loaded and, when `model` is given, that it was built with that model.
        One caller at a time: two first requests must not both create it."""
        if name in self._loaded and (model is None or (name, model) in self._matched):
            return
        with self._open_lock:
            self._open(name, model, create)

    def _open(self, name: str, model: ModelIdentity | None, create: bool) -> None:
        if name not in self._loaded:
            if not self._call("list collections", "has_collection", name):
                if not (create and model):
                    raise CollectionNotFound(name)
                self._create(name, model)
                self._matched.add((name, model))
            # An existing collection starts out released after a Milvus restart.
            self._call(f"load collection {name!r}", "load_collection", name)
            self._loaded.add(name)
        if model is not None and (name, model) not in self._matched:
            self._check_identity(name, model)
            self._matched.add((name, model))

    def _create(self, name: str, model: ModelIdentity) -> None:
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=64)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=model.dim)
        schema.add_field("uri", DataType.VARCHAR, max_length=MAX_URI_LENGTH)
        schema.add_field("metadata", DataType.JSON)
        index = MilvusClient.prepare_index_params()
        if self._hnsw:
            index.add_index("vector", metric_type="COSINE", index_type="HNSW",
                            params={"M": self._hnsw.m, "efConstruction": self._hnsw.ef_construction})
        else:
            index.add_index("vector", metric_type="COSINE", index_type="AUTOINDEX")
        self._call(f"create collection {name!r}", "create_collection", name,
                   schema=schema, index_params=index, consistency_level="Strong",
                   properties={_MODEL_PROP: model.name, _FINGERPRINT_PROP: model.fingerprint})
        log.info("created collection %r: dim %d, model %s (%s), index %s", name, model.dim,
                 model.name, model.fingerprint, self._hnsw or "AUTOINDEX")

    def describe(self, name: str) -> ModelIdentity:
        """The model a collection was built with, from its schema and properties."""
        if not self._call("list collections", "has_collection", name):
            raise CollectionNotFound(name)
        desc = self._call(f"describe collection {name!r}", "describe_collection", name)
        fields = {f["name"]: f for f in desc["fields"]}
        if {"id", "vector", "uri", "metadata"} - fields.keys():
            raise ModelMismatch(f"collection {name!r} was not created by this service (its fields "
                                f"are {sorted(fields)}): name another collection")
        props = desc.get("properties", {})
        return ModelIdentity(name=props.get(_MODEL_PROP, "?"),
                             fingerprint=props.get(_FINGERPRINT_PROP, "?"),
                             dim=int(fields["vector"]["params"]["dim"]))

    def _check_identity(self, name: str, model: ModelIdentity) -> None:
        built = self.describe(name)
        if (built.dim, built.fingerprint) != (model.dim, model.fingerprint):
            raise ModelMismatch(
                f"collection {name!r} holds {built.dim}-d vectors of model {built.name!r} "
                f"(fingerprint {built.fingerprint}), but the embedder serves {model.dim}-d model "
                f"{model.name!r} (fingerprint {model.fingerprint}): run the embedder with the "
                "collection's model, or use another collection")

    def existing_ids(self, name: str, ids: list[str]) -> set[str]:
        if not ids:
            return set()
        rows = self._call("read ids", "get", name, ids=ids, output_fields=["id"], **_READ)
        return {row["id"] for row in rows}

    def write(self, name: str, rows: list[Row]) -> None:
        """Upsert, not insert: two concurrent ingests of one image leave one row.
        Returns once every row is written; requests stay under the size limit."""
        parts = chunks(rows, self._max_write_bytes)
        for part in parts:
            self._call(f"write to {name!r}", "upsert", name, [vars(row) for row in part])
        if rows:
            log.debug("wrote %d rows to %r in %d requests", len(rows), name, len(parts))

    def search(self, name: str, vector: list[float], top_k: int, offset: int = 0,
               expr: str = "") -> list[dict]:
        """Hits as dicts with id, score, uri and metadata, best first."""
        params: dict = {"metric_type": "COSINE"}
        if self._hnsw:  # HNSW needs ef >= the hits it must find
            params["params"] = {"ef": max(self._hnsw.ef, top_k + offset)}
        result = self._call("search", "search", name, data=[vector], limit=top_k, offset=offset,
                            filter=expr, output_fields=["uri", "metadata"],
                            search_params=params, **_READ)
        return [{"id": hit["id"], "score": hit["distance"], "uri": hit["entity"]["uri"],
                 "metadata": hit["entity"]["metadata"] or {}} for hit in result[0]]

    def delete(self, name: str, ids: list[str]) -> set[str]:
        """Remove the ids that are present; return those."""
        present = self.existing_ids(name, ids)
        if present:
            self._call(f"delete from {name!r}", "delete", name, ids=sorted(present))
        return present

    def count(self, name: str) -> int:
        rows = self._call("count rows", "query", name, filter="", output_fields=["count(*)"],
                          **_READ)
        return int(rows[0]["count(*)"])

    def ping(self) -> None:
        """Raise DependencyUnavailable unless Milvus answers."""
        self._call("answer a health check", "list_collections")

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def _message(exc: Exception) -> str:
    if isinstance(exc, MilvusException):
        return exc.message or str(exc)
    if isinstance(exc, grpc.RpcError):
        return f"{exc.code().name}: {exc.details()}"
    return str(exc)
