"""Errors the search service answers with, each tied to its gRPC status and
a reason.

Lower layers (store, embedder client, validation) raise these; the servicer
turns them into a status and message in one place, with the reason as a
google.rpc.ErrorInfo detail (imagesearch.status.DOMAIN), so programs, the CLI
among them, branch on the code and reason, never on the message's words.
"""
from __future__ import annotations

import grpc


class ServiceError(Exception):
    code = grpc.StatusCode.INTERNAL
    reason = "INTERNAL"


class InvalidArgument(ServiceError):
    """The caller's mistake; `field` names the request field at fault (as a
    google.rpc.BadRequest field violation), or is empty for the whole message."""
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field


class CollectionNotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "COLLECTION_NOT_FOUND"

    def __init__(self, name: str) -> None:
        super().__init__(f"collection {name!r} does not exist: ingest into it first, "
                         "or name an existing collection")


class ModelMismatch(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "MODEL_MISMATCH"


class UnsupportedMilvus(ServiceError):
    """A Milvus server older than the oldest this service works with."""
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "MILVUS_UNSUPPORTED"


class OutOfRange(ServiceError):
    """An answer larger than one message may carry."""
    code = grpc.StatusCode.OUT_OF_RANGE
    reason = "RESPONSE_TOO_LARGE"


class DependencyUnavailable(ServiceError):
    """A dependency, or this replica, cannot serve now: a retry (elsewhere) may."""
    code = grpc.StatusCode.UNAVAILABLE
    reason = "UNAVAILABLE"


class MilvusUnavailable(DependencyUnavailable):
    reason = "MILVUS_UNAVAILABLE"


class EmbedderUnavailable(DependencyUnavailable):
    reason = "EMBEDDER_UNAVAILABLE"


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "DEADLINE_EXCEEDED"


class Overloaded(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "EMBEDDER_BUSY"
