"""The Milvus collection: schema, identity check, writes, search, delete, count.

One collection holds the vectors of one model. Its schema is explicit:

    id        VARCHAR(64) primary key, the SHA-256 hex of the image bytes
    vector    FLOAT_VECTOR(dim), L2-normalised, COSINE index
    uri       VARCHAR(4096), where the caller keeps the image
    metadata  JSON, a string-to-string map

and its properties record the model name and weights fingerprint, so that
vectors of two different models never meet in one collection (the servicer
checks every embedder response against them). Searches and counts see the
writes of a consistency token (consistency.py), or are Bounded without one;
the ingest's own duplicate check is Strong, so an acknowledged image is
never acknowledged as new again. Milvus Lite reads are always Strong.

On a Milvus server the vector index is HNSW with configurable M,
efConstruction and search ef; Milvus Lite builds what it supports for
AUTOINDEX (an exact, flat search). Writes are cut into requests of at most
`max_write_bytes`, below the server's gRPC message limit.

The client connects lazily, on each call until a connection succeeds (and
pymilvus reconnects an established client by itself), so the service
starts, and recovers, without a restart while Milvus is down; each call is
bounded by `timeout_s`. Calls are synchronous (pymilvus); the async facade
(`store.Store`) runs them on its own threads.
"""
from __future__ import annotations

import json
import logging
import re
import threading
import time
from dataclasses import dataclass
from typing import Sequence

import grpc
import numpy as np
from prometheus_client import Histogram
from pymilvus import DataType, MilvusClient, MilvusException
from pymilvus.grpc_gen import milvus_pb2
from pymilvus.exceptions import (DataNotMatchException, DataTypeNotMatchException, ParamError,
                                 SchemaMismatchRetryableException)

from search_service.domain import MAX_URI_LENGTH, ModelIdentity
from search_service.errors import (CollectionNotFound, MilvusUnavailable, ModelMismatch,
                                   ServiceError, UnsupportedMilvus)
from search_service.store.lite import PrivateLite
from search_service.wire import field_one_header

log = logging.getLogger(__name__)
MILVUS_CALLS = Histogram("search_milvus_call_seconds",
                         "Milvus call latency, by operation and outcome (ok, error)",
                         ["operation", "outcome"],
                         buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))

_MODEL_PROP = "imagesearch.model"
_FINGERPRINT_PROP = "imagesearch.fingerprint"
_STRONG = {"consistency_level": "Strong"}
# Raised by pymilvus before any call when a request is malformed.
_REQUEST_ERRORS = (ParamError, DataNotMatchException, DataTypeNotMatchException)
_ROW_OVERHEAD = 128  # bytes per row beyond its fields, in the insert request


@dataclass(frozen=True)
class Row:
    id: str
    vector: Sequence[float]  # a list, or a float32 numpy array (no per-float Python objects)
    uri: str
    metadata: dict[str, str]

    def size(self) -> int:
        """Bytes this row adds to an insert request (an upper estimate)."""
        return (4 * len(self.vector) + len(self.id) + len(self.uri.encode())
                + (len(json.dumps(self.metadata).encode()) if self.metadata else 2)
                + _ROW_OVERHEAD)


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
        row_size = row.size()
        if not out or size + row_size > max_bytes:
            out.append([])
            size = 0
        out[-1].append(row)
        size += row_size
    return out


def _upsert_request(name: str, rows: list[Row], schema: dict) -> milvus_pb2.UpsertRequest:
    """Milvus's UpsertRequest for `rows`, built column by column. The vector
    column is parsed from its wire form, a packed run of little-endian
    float32 (protobuf field 1 of FloatArray), made by numpy in one copy."""
    request = milvus_pb2.UpsertRequest(collection_name=name, num_rows=len(rows),
                                       schema_timestamp=schema.get("update_timestamp", 0))
    column = request.fields_data.add(field_name="id", type=DataType.VARCHAR)
    column.scalars.string_data.data.extend([row.id for row in rows])
    vectors = np.ascontiguousarray([row.vector for row in rows], dtype="<f4")
    column = request.fields_data.add(field_name="vector", type=DataType.FLOAT_VECTOR)
    column.vectors.dim = vectors.shape[1]
    packed = vectors.tobytes()
    column.vectors.float_vector.MergeFromString(field_one_header(len(packed)) + packed)
    column = request.fields_data.add(field_name="uri", type=DataType.VARCHAR)
    column.scalars.string_data.data.extend([row.uri for row in rows])
    column = request.fields_data.add(field_name="metadata", type=DataType.JSON)
    # Raw UTF-8, as pymilvus sends it: the 2.3 server's filters match no \u escapes.
    column.scalars.json_data.data.extend(
        [json.dumps(row.metadata, ensure_ascii=False).encode() if row.metadata else b"{}"
         for row in rows])
    return request


# The oldest server with everything used here: COSINE, JSON fields, upsert,
# AllocTimestamp and "Customized" consistency with a guarantee timestamp.
OLDEST_SERVER = (2, 3)


def check_server_version(version: str) -> None:
    """UnsupportedMilvus for a server older than OLDEST_SERVER; a version
    that does not parse (a custom build) is let through."""
    found = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    if len(found) == 2 and found < OLDEST_SERVER:
        raise UnsupportedMilvus(
            f"Milvus {version} is older than {'.'.join(map(str, OLDEST_SERVER))}, the oldest "
            "this service works with (it needs upsert and consistency by timestamp): upgrade "
            "Milvus (docs/deploy.md, Compatibility)")


def is_lite(uri: str) -> bool:
    """pymilvus's own rule: a local *.db file is Milvus Lite."""
    return uri.endswith(".db")


def _quiet_pymilvus() -> None:
    """pymilvus logs a traceback for every failed call; the service reports
    each failure itself, once, with the status the caller gets. Done when a
    store is made, not when this module is imported."""
    logging.getLogger("pymilvus").setLevel(logging.CRITICAL)


class MilvusStore:
    def __init__(self, uri: str, token: str = "", *, timeout_s: float = 10.0,
                 hnsw: HnswParams = HnswParams(), max_write_bytes: int = 16 << 20,
                 lite_server: str = "") -> None:
        """`lite_server`: for a Milvus Lite `uri`, the address where another
        process (the parent of --workers) serves that file; empty: this
        process opens the file and serves it to itself."""
        _quiet_pymilvus()
        self.uri = uri
        self._lite_server = lite_server
        self._token = token
        self._timeout_s = timeout_s
        self.lite = is_lite(uri)
        self._hnsw = None if self.lite else hnsw
        self._max_write_bytes = max_write_bytes
        self._client: MilvusClient | None = None
        self._lite: PrivateLite | None = None  # the Milvus Lite server of a *.db uri
        self._connect_lock = threading.Lock()
        self._open_lock = threading.Lock()
        # What is known of each collection, so each is checked once per process.
        self._loaded: dict[str, ModelIdentity] = {}
        self._schemas: dict[str, dict] = {}  # pymilvus's description, for writes

    def connect(self) -> MilvusClient:
        """The client, connecting first if there is none (yet, or since a failure)."""
        with self._connect_lock:
            if self._client is None:
                try:
                    if self.lite and self._lite is None and not self._lite_server:
                        self._lite = self._start_lite()
                    target = self._lite.uri if self._lite else self._lite_server or self.uri
                    client = MilvusClient(uri=target, token=self._token, timeout=self._timeout_s)
                    if not self.lite:
                        version = client.get_server_version(timeout=self._timeout_s)
                        check_server_version(version)
                        log.info("Milvus server %s at %s", version, self.uri)
                    self._client = client
                except (MilvusException, OSError) as exc:
                    raise MilvusUnavailable(
                        f"Milvus at {self.uri} is unavailable (connect): {_message(exc)}; "
                        "retry with backoff") from exc
            return self._client

    def _start_lite(self) -> PrivateLite:
        try:
            return PrivateLite(self.uri)
        except Exception as exc:  # noqa: BLE001 - milvus-lite raises what its storage raises
            raise MilvusUnavailable(f"Milvus Lite cannot open {self.uri}: "
                                        f"{type(exc).__name__}: {exc}") from exc

    def _error(self, action: str, exc: Exception) -> ServiceError:
        """INTERNAL when Milvus refused the request itself (our bug: a retry
        cannot help); UNAVAILABLE for the rest, which a retry may fix: no
        connection, a timeout, a server still recovering after a restart."""
        # A collection may have been dropped, released or restored meanwhile.
        self._loaded.clear()
        self._schemas.clear()
        if isinstance(exc, _REQUEST_ERRORS) or getattr(exc, "is_input_error", False):
            return ServiceError(f"Milvus refused to {action}: {_message(exc)}")
        return MilvusUnavailable(f"Milvus at {self.uri} is unavailable ({action}): "
                                     f"{_message(exc)}; retry with backoff")

    def _call(self, action: str, method: str, *args, handler: bool = False, **kwargs):
        """`handler`: call pymilvus's connection handler rather than MilvusClient."""
        client = self.connect()
        started, outcome = time.perf_counter(), "error"
        try:
            if handler:  # the handler takes the database from the call, not the URI
                target = client._get_connection()
                kwargs["context"] = client._generate_call_context()
            else:
                target = client
            result = getattr(target, method)(*args, timeout=self._timeout_s, **kwargs)
            outcome = "ok"
            return result
        except (MilvusException, grpc.RpcError) as exc:
            raise self._error(action, exc) from exc
        finally:
            MILVUS_CALLS.labels(method, outcome).observe(time.perf_counter() - started)

    def open(self, name: str) -> ModelIdentity:
        """The model `name` was built with, once it is loaded; CollectionNotFound
        when it does not exist."""
        # .get, not `in` then [...]: a failing call on another thread may clear the cache between.
        if (known := self._loaded.get(name)) is not None:
            return known
        with self._open_lock:  # one caller at a time loads (or, in create, creates) it
            return self._open(name)

    def create(self, name: str, model: ModelIdentity) -> ModelIdentity:
        """Open `name`, creating it for `model` first if it does not exist. The
        model it was built with, which differs from `model` when another
        process created it first for another model: the caller checks."""
        if (known := self._loaded.get(name)) is not None:
            return known
        with self._open_lock:
            if not self._call("list collections", "has_collection", name):
                try:
                    self._create(name, model)
                except ServiceError:  # another process may have created it meanwhile
                    if not self._call("list collections", "has_collection", name):
                        raise
            return self._open(name)

    def _open(self, name: str) -> ModelIdentity:
        if (known := self._loaded.get(name)) is not None:
            return known
        built = self.describe(name)
        # An existing collection starts out released after a Milvus restart.
        self._call(f"load collection {name!r}", "load_collection", name)
        self._loaded[name] = built
        return built

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
        self._schemas[name] = desc
        fields = {f["name"]: f for f in desc["fields"]}
        if {"id", "vector", "uri", "metadata"} - fields.keys():
            raise ModelMismatch(f"collection {name!r} was not created by this service (its fields "
                                f"are {sorted(fields)}): name another collection")
        props = desc.get("properties", {})
        return ModelIdentity(name=props.get(_MODEL_PROP, "?"),
                             fingerprint=props.get(_FINGERPRINT_PROP, "?"),
                             dim=int(fields["vector"]["params"]["dim"]))

    def existing_ids(self, name: str, ids: list[str]) -> set[str]:
        if not ids:
            return set()
        rows = self._call("read ids", "get", name, ids=ids, output_fields=["id"], **_STRONG)
        return {row["id"] for row in rows}

    def _read(self, after: int) -> dict:
        """Consistency of a search or count that must see the write stamped `after` (0: none)."""
        if self.lite:  # one process, no time ticks to wait for
            return _STRONG
        if after:
            return {"consistency_level": "Customized", "guarantee_timestamp": after}
        return {"consistency_level": "Bounded"}

    def write(self, name: str, rows: list[Row]) -> int:
        """Upsert, not insert: two concurrent ingests of one image leave one row.
        Returns once every row is written; requests stay under the size limit.
        Returns the Milvus timestamp of the last request (a read that waits
        for it sees every row, as pymilvus's Session consistency uses it), or
        0: on Milvus Lite, when nothing was written, or when the server sent
        none.

        Column-wise: each request is built here as Milvus's own UpsertRequest,
        one column per field, the vectors copied in as one packed float32
        buffer (`_upsert_request`), and sent through pymilvus's connection
        handler. pymilvus's row path (MilvusClient.upsert with dicts) packs
        every value of every row in Python: 66 us a 512-d row against 4 us
        here (bench/ingest_cpu.py, docs/benchmarks.md)."""
        parts = chunks(rows, self._max_write_bytes)
        if not parts:
            return 0
        schema = self._schema(name)
        stamp = 0
        for part in parts:
            try:
                stamp = self._call(f"write to {name!r}", "upsert", name, [], handler=True,
                                   schema=schema, upsert_param=_upsert_request(name, part, schema)
                                   ).timestamp
            except ServiceError as exc:
                if not isinstance(exc.__cause__, SchemaMismatchRetryableException):
                    raise
                # Not retried here: the collection may now be another model's,
                # which only a new open() checks. The caller's retry does that.
                raise MilvusUnavailable(
                    f"collection {name!r} changed while being written (dropped and made "
                    "again?): these rows were not written; retry") from exc
        log.debug("wrote %d rows to %r in %d requests", len(rows), name, len(parts))
        return 0 if self.lite else stamp

    def _schema(self, name: str) -> dict:
        """The collection's description as pymilvus gives it (cached)."""
        if (known := self._schemas.get(name)) is None:
            known = self._schemas[name] = self._call(f"describe collection {name!r}",
                                                     "describe_collection", name)
        return known

    def timestamp(self) -> int:
        """A Milvus timestamp later than every write Milvus has acknowledged or
        shown so far: the consistency token of what the caller just wrote or
        read. 0 on Milvus Lite, whose reads are Strong anyway. pymilvus's
        MilvusClient has no public call for it (nor returns write
        timestamps), so this asks its connection handler."""
        if self.lite:
            return 0
        return self._call("allocate a timestamp", "alloc_timestamp", handler=True)

    def search(self, name: str, vector: list[float], limit: int, offset: int = 0,
               expr: str = "", after: int = 0, fields: bool = True) -> list[dict]:
        """Hits as dicts with id and score, best first, and with uri and
        metadata unless `fields` is False (then `rows` fetches them)."""
        params: dict = {"metric_type": "COSINE"}
        if self._hnsw:  # HNSW needs ef >= the hits it must find
            params["params"] = {"ef": max(self._hnsw.ef, limit + offset)}
        result = self._call("search", "search", name, data=[vector], limit=limit, offset=offset,
                            filter=expr, output_fields=["uri", "metadata"] if fields else [],
                            search_params=params, **self._read(after))
        if not fields:
            return [{"id": hit["id"], "score": hit["distance"]} for hit in result[0]]
        return [{"id": hit["id"], "score": hit["distance"], "uri": hit["entity"]["uri"],
                 "metadata": hit["entity"]["metadata"] or {}} for hit in result[0]]

    def rows(self, name: str, ids: list[str], after: int = 0) -> dict[str, dict]:
        """{id: {"uri", "metadata"}} of the ids that are stored, read as a
        search with the same token reads."""
        rows = self._call("read rows", "get", name, ids=ids, output_fields=["uri", "metadata"],
                          **self._read(after))
        return {row["id"]: {"uri": row["uri"], "metadata": row["metadata"] or {}} for row in rows}

    def delete(self, name: str, ids: list[str]) -> set[str]:
        """Remove the ids that are present; return those."""
        present = self.existing_ids(name, ids)
        if present:
            self._call(f"delete from {name!r}", "delete", name, ids=sorted(present))
        return present

    def count(self, name: str, after: int = 0) -> int:
        rows = self._call("count rows", "query", name, filter="", output_fields=["count(*)"],
                          **self._read(after))
        return int(rows[0]["count(*)"])

    def ping(self) -> None:
        """Raise MilvusUnavailable unless Milvus answers."""
        self._call("answer a health check", "list_collections")

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        if self._lite is not None:
            self._lite.stop()


def _message(exc: Exception) -> str:
    if isinstance(exc, MilvusException):
        return exc.message or str(exc)
    if isinstance(exc, grpc.RpcError):
        return f"{exc.code().name}: {exc.details()}"
    return str(exc)
