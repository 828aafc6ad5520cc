"""Error details for programs, beside the message for people (AIP-193)."""
from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from imagesearch.errors import DOMAIN  # of every google.rpc.ErrorInfo our servers send


async def abort_with(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str,
                     reason: str = "", violations: list[tuple[str, str]] = ()) -> None:
    """End the call with `code` and `message`, and, as google.rpc.Status
    details (`grpc-status-details-bin`), an ErrorInfo with `reason` and a
    BadRequest listing each (field, why) of `violations`, so that no client
    parses the message."""
    details = []
    for detail in ((error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN) if reason else None),
                   (error_details_pb2.BadRequest(field_violations=[
                       error_details_pb2.BadRequest.FieldViolation(field=field, description=why)
                       for field, why in violations]) if violations else None)):
        if detail is not None:
            packed = any_pb2.Any()
            packed.Pack(detail)
            details.append(packed)
    status = status_pb2.Status(code=code.value[0], message=message, details=details)
    trailing = (*(context.trailing_metadata() or ()),
                ("grpc-status-details-bin", status.SerializeToString()))
    await context.abort(code, message, trailing_metadata=trailing)


async def abort_bad_request(context: grpc.aio.ServicerContext, message: str,
                            violations: list[tuple[str, str]]) -> None:
    """End the call INVALID_ARGUMENT, each bad field in a BadRequest detail."""
    await abort_with(context, grpc.StatusCode.INVALID_ARGUMENT, message, "INVALID_ARGUMENT",
                     violations)
