"""Error details for programs, beside the message for people (AIP-193)."""
from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2


async def abort_bad_request(context: grpc.aio.ServicerContext, message: str,
                            violations: list[tuple[str, str]]) -> None:
    """End the call INVALID_ARGUMENT with `message`, and a google.rpc.BadRequest
    detail listing each (field, why), so no client parses the message."""
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.BadRequest(field_violations=[
        error_details_pb2.BadRequest.FieldViolation(field=field, description=why)
        for field, why in violations]))
    status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=message, details=[detail])
    trailing = (*(context.trailing_metadata() or ()),
                ("grpc-status-details-bin", status.SerializeToString()))
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message, trailing_metadata=trailing)
