"""Typed errors of both services, for callers and the CLI.

Every failed call of the clients raises an `ImageSearchError` subclass
chosen by the gRPC status code, carrying the google.rpc details the servers
send (`grpc-status-details-bin`): the `reason` of an ErrorInfo (domain
"imagesearch") and the BadRequest `field_violations`. Branch on the class
and the reason, never on the message: its words are for people and may
change.

    try:
        client.search_text("a white dog")
    except EmbedderUnavailable:
        ...  # the search service works; its embedder does not answer

Each is also a `grpc.RpcError` with `.code()` and `.details()`, as before.
"""
from __future__ import annotations

import grpc
from google.rpc import error_details_pb2, status_pb2

DOMAIN = "imagesearch"  # of the ErrorInfo reasons our servers send (imagesearch.status)


class ImageSearchError(grpc.RpcError):
    """A call failed. `status`: the gRPC code; `message`: why, for people;
    `reason`: why, for programs (an ErrorInfo reason, "" when none came);
    `field_violations`: (field, why) of each bad request field."""

    def __init__(self, status: grpc.StatusCode, message: str, reason: str = "",
                 field_violations: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.status, self.message, self.reason = status, message, reason
        self.field_violations = field_violations

    def code(self) -> grpc.StatusCode:
        return self.status

    def details(self) -> str:
        return self.message

    def __str__(self) -> str:
        return f"{self.status.name}: {self.message}"


class InvalidArgument(ImageSearchError):
    """The request is wrong: `field_violations` names the fields and why."""


class NotFound(ImageSearchError):
    """The collection does not exist."""


class FailedPrecondition(ImageSearchError):
    """The system is not in a state to do it."""


class ModelMismatch(FailedPrecondition):
    """The collection's vectors come from another model than the embedders serve."""


class OutOfRange(ImageSearchError):
    """The answer would not fit one message: ask for fewer hits, or page."""


class ResourceExhausted(ImageSearchError):
    """Busy, or a request too large: retry later, or send less."""


class Unavailable(ImageSearchError):
    """Not reached, or a dependency of it is down: retry with backoff."""


class EmbedderUnavailable(Unavailable):
    """The search service works, but its embedder does not answer."""


class MilvusUnavailable(Unavailable):
    """The search service works, but Milvus does not answer."""


class DeadlineExceeded(ImageSearchError):
    """The call's deadline passed (or a stream went idle too long)."""


class Unauthenticated(ImageSearchError):
    """No token, or a wrong one."""


class PermissionDenied(ImageSearchError):
    pass


class Unimplemented(ImageSearchError):
    """The server does not have this method: another service's port?"""


class Cancelled(ImageSearchError):
    pass


class Internal(ImageSearchError):
    """A bug or an unexpected failure on the server's side."""


_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRange,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNIMPLEMENTED: Unimplemented,
    grpc.StatusCode.CANCELLED: Cancelled,
}
_BY_REASON = {
    "MODEL_MISMATCH": ModelMismatch,
    "EMBEDDER_UNAVAILABLE": EmbedderUnavailable,
    "MILVUS_UNAVAILABLE": MilvusUnavailable,
}


def _details(exc: grpc.RpcError) -> tuple[str, tuple[tuple[str, str], ...]]:
    """The ErrorInfo reason and the BadRequest violations the server sent, if any."""
    trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    raw = next((value for key, value in trailing or () if key == "grpc-status-details-bin"), None)
    if raw is None:
        return "", ()
    reason, violations = "", []
    try:
        status = status_pb2.Status.FromString(raw)
    except Exception:  # noqa: BLE001 - a peer that is not ours may send anything
        return "", ()
    for detail in status.details:
        info, bad = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
        if detail.Unpack(info) and info.domain == DOMAIN:
            reason = info.reason
        elif detail.Unpack(bad):
            violations += [(v.field, v.description) for v in bad.field_violations]
    return reason, tuple(violations)


def from_rpc_error(exc: grpc.RpcError) -> ImageSearchError:
    """The typed error for a failed call (`exc` itself when it is one)."""
    if isinstance(exc, ImageSearchError):
        return exc
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    reason, violations = _details(exc)
    kind = _BY_REASON.get(reason) or _BY_CODE.get(code, Internal)
    error = kind(code, (exc.details() if hasattr(exc, "details") else "") or "", reason, violations)
    error.__cause__ = exc
    return error
