"""Errors the search service answers with, each tied to its gRPC status.

Lower layers (store, embedder client, validation) raise these; the servicer
turns them into a status and message in one place.
"""
from __future__ import annotations

import grpc


class ServiceError(Exception):
    code = grpc.StatusCode.INTERNAL


class InvalidArgument(ServiceError):
    """The caller's mistake; `field` names the request field at fault (as a
    google.rpc.BadRequest field violation), or is empty for the whole message."""
    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field


class CollectionNotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND

    def __init__(self, name: str) -> None:
        super().__init__(f"collection {name!r} does not exist: ingest into it first, "
                         "or name an existing collection")


class ModelMismatch(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class UnsupportedMilvus(ServiceError):
    """A Milvus server older than the oldest this service works with."""
    code = grpc.StatusCode.FAILED_PRECONDITION


class OutOfRange(ServiceError):
    """An answer larger than one message may carry."""
    code = grpc.StatusCode.OUT_OF_RANGE


class DependencyUnavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Overloaded(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
