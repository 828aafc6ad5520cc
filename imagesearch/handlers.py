"""Rebuild a gRPC method handler around a new behaviour, whatever its kind."""
from __future__ import annotations

from typing import Callable

import grpc

_KINDS = (("unary_unary", grpc.unary_unary_rpc_method_handler),
          ("unary_stream", grpc.unary_stream_rpc_method_handler),
          ("stream_unary", grpc.stream_unary_rpc_method_handler),
          ("stream_stream", grpc.stream_stream_rpc_method_handler))


def rebuild(handler: grpc.RpcMethodHandler, behavior_for: Callable[[Callable], Callable],
            raw: bool = False) -> grpc.RpcMethodHandler:
    """The same RPC with its behaviour replaced by `behavior_for(old behaviour)`;
    with `raw`, the new behaviour gets the request bytes unparsed."""
    for kind, factory in _KINDS:
        behavior = getattr(handler, kind)
        if behavior is not None:
            return factory(behavior_for(behavior),
                           request_deserializer=None if raw else handler.request_deserializer,
                           response_serializer=handler.response_serializer)
    return handler
