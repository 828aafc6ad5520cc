"""The Milvus collection: schema, identity check, writes, search, delete, count.

One collection holds the vectors of one model. Its schema is explicit:

    id        VARCHAR(64) primary key, the SHA-256 hex of the image bytes
    vector    FLOAT_VECTOR(dim), L2-normalised, COSINE index
    uri       VARCHAR(4096), where the caller keeps the image
    metadata  JSON, a string-to-string map

and its properties record the model name and weights fingerprint, so that
vectors of two different models never meet in one collection. Every read
uses Strong consistency: a search right after an acknowledged write sees it.

Calls are synchronous (pymilvus); the servicer runs them on one thread.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from pymilvus import DataType, MilvusClient, MilvusException

from search_service.errors import (CollectionNotFound, DependencyUnavailable, ModelMismatch,
                                   ServiceError)

log = logging.getLogger(__name__)

MAX_URI_LENGTH = 4096
_MODEL_PROP = "imagesearch.model"
_FINGERPRINT_PROP = "imagesearch.fingerprint"
_READ = {"consistency_level": "Strong"}


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


def _milvus_error(action: str, exc: Exception) -> ServiceError:
    return DependencyUnavailable(f"Milvus failed to {action}: {exc}")


class MilvusStore:
    def __init__(self, uri: str, token: str = "") -> None:
        self._uri = uri
        try:
            self._client = MilvusClient(uri=uri, token=token)
        except (MilvusException, OSError) as exc:
            raise _milvus_error(f"connect to {uri}", exc) from exc
        # What is known of each collection, so each is checked once per process.
        self._loaded: set[str] = set()
        self._matched: set[tuple[str, ModelIdentity]] = set()  # (collection, model) that match

    def _call(self, action: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MilvusException as exc:
            # A collection may have been dropped or released behind our back.
            self._loaded.clear()
            self._matched.clear()
            raise _milvus_error(action, exc) from exc

    def open(self, name: str, model: ModelIdentity | None = None, create: bool = False) -> None:
        """Make sure `name` exists (created for `model` if `create`) and is
        loaded and, when `model` is given, that it was built with that model."""
        if name not in self._loaded:
            if not self._call("list collections", self._client.has_collection, name):
                if not (create and model):
                    raise CollectionNotFound(name)
                self._create(name, model)
                self._matched.add((name, model))
            # An existing collection starts out released after a Milvus restart.
            self._call(f"load collection {name!r}", self._client.load_collection, name)
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
        index = self._client.prepare_index_params()
        index.add_index("vector", metric_type="COSINE", index_type="AUTOINDEX")
        self._call(f"create collection {name!r}", self._client.create_collection, name,
                   schema=schema, index_params=index, consistency_level="Strong",
                   properties={_MODEL_PROP: model.name, _FINGERPRINT_PROP: model.fingerprint})
        log.info("created collection %r: dim %d, model %s (%s)", name, model.dim, model.name,
                 model.fingerprint)

    def describe(self, name: str) -> ModelIdentity:
        """The model a collection was built with, from its schema and properties."""
        try:
            desc = self._client.describe_collection(name)
        except MilvusException as exc:
            if not self._call("list collections", self._client.has_collection, name):
                raise CollectionNotFound(name) from exc
            raise _milvus_error(f"describe collection {name!r}", exc) from exc
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
        rows = self._call("read ids", self._client.get, name, ids=ids, output_fields=["id"], **_READ)
        return {row["id"] for row in rows}

    def write(self, name: str, rows: list[Row]) -> None:
        """Upsert, not insert: two concurrent ingests of one image leave one row."""
        if rows:
            self._call(f"write to {name!r}", self._client.upsert, name,
                       [vars(row) for row in rows])

    def search(self, name: str, vector: list[float], top_k: int) -> list[dict]:
        """Hits as dicts with id, score, uri and metadata, best first."""
        result = self._call("search", self._client.search, name, data=[vector], limit=top_k,
                            output_fields=["uri", "metadata"],
                            search_params={"metric_type": "COSINE"}, **_READ)
        return [{"id": hit["id"], "score": hit["distance"], "uri": hit["entity"]["uri"],
                 "metadata": hit["entity"]["metadata"] or {}} for hit in result[0]]

    def delete(self, name: str, ids: list[str]) -> set[str]:
        """Remove the ids that are present; return those."""
        present = self.existing_ids(name, ids)
        if present:
            self._call(f"delete from {name!r}", self._client.delete, name, ids=sorted(present))
        return present

    def count(self, name: str) -> int:
        rows = self._call("count rows", self._client.query, name, filter="",
                          output_fields=["count(*)"], **_READ)
        return int(rows[0]["count(*)"])

    def close(self) -> None:
        self._client.close()
