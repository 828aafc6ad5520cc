"""Checks of the caller's input, before any work: each failure names the field
and what to send instead (INVALID_ARGUMENT)."""
from __future__ import annotations

import json
import re

from search_service import consistency, filters
from search_service.errors import InvalidArgument
from search_service.domain import MAX_JSON_BYTES, MAX_RESULT_WINDOW, MAX_URI_LENGTH

MAX_TOP_K = 1024
MAX_DELETE_IDS = 16384
MAX_METADATA_BYTES = MAX_JSON_BYTES
# Each key is a Python string and a dict entry at every read, and a map
# entry in every hit: 3,906 keys a row made a top-1024 search cost 1.36 GB.
MAX_METADATA_KEYS = 256
_COLLECTION_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}")
_IMAGE_ID = re.compile(r"[0-9a-f]{64}")


def collection(name: str, default: str) -> str:
    name = name or default
    if not _COLLECTION_NAME.fullmatch(name):
        raise InvalidArgument(f"collection name {name!r} is invalid: use letters, digits and "
                              "underscores, starting with a letter or underscore, at most 255",
                              "collection")
    return name


class Query:
    """The validated options of a SearchByText or SearchByImage request."""

    def __init__(self, request) -> None:
        self.top_k = request.top_k
        if not 1 <= self.top_k <= MAX_TOP_K:
            raise InvalidArgument(f"top_k must be between 1 and {MAX_TOP_K}, got {self.top_k}",
                                  "top_k")
        self.offset = request.offset
        if self.offset < 0:
            raise InvalidArgument(f"offset must be 0 or more, got {self.offset}", "offset")
        if self.top_k + self.offset > MAX_RESULT_WINDOW:
            raise InvalidArgument(f"top_k + offset must be at most {MAX_RESULT_WINDOW}, got "
                                  f"{self.top_k + self.offset}", "offset")
        self.min_score = request.min_score if request.HasField("min_score") else None
        if self.min_score is not None and not -1.0 <= self.min_score <= 1.0:  # NaN fails too
            raise InvalidArgument(f"min_score must be between -1 and 1, got {self.min_score}",
                                  "min_score")
        self.expr = filters.build(request.filter)
        self.after = read_after(request.consistency_token)
        # One hit more than asked, where Milvus allows, says whether a next page exists.
        self.limit = self.top_k + (self.top_k + self.offset < MAX_RESULT_WINDOW)


def read_after(token: bytes) -> int:
    """The Milvus timestamp a read must see, from the caller's consistency token (0: none)."""
    return consistency.decode(token)


def delete_ids(ids: list[str]) -> list[str]:
    if not ids:
        raise InvalidArgument("no ids to delete", "ids")
    if len(ids) > MAX_DELETE_IDS:
        raise InvalidArgument(f"{len(ids)} ids in one request; the limit is {MAX_DELETE_IDS}", "ids")
    for i, id_ in enumerate(ids):
        if not _IMAGE_ID.fullmatch(id_):
            raise InvalidArgument(f"ids[{i}] = {id_[:80]!r} is not an image id "
                                  "(64 lowercase hex characters, as Ingest returns)", f"ids[{i}]")
    return ids


def item_error(image: bytes, uri: str, metadata: dict[str, str]) -> str:
    """Why an ingest item cannot be stored, or "" when it can (so far: the
    embedder may still fail to decode it)."""
    if not image:
        return "empty image bytes"
    if len(uri.encode()) > MAX_URI_LENGTH:
        return f"uri is longer than {MAX_URI_LENGTH} bytes"
    if len(metadata) > MAX_METADATA_KEYS:
        return f"metadata has {len(metadata)} keys; the limit is {MAX_METADATA_KEYS}"
    if metadata and len(json.dumps(metadata)) > MAX_METADATA_BYTES:
        return f"metadata is larger than {MAX_METADATA_BYTES} bytes as JSON"
    return ""
