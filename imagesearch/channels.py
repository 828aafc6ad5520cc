"""gRPC options both ends use, for clients and servers alike (no server code here)."""
from __future__ import annotations


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Message size caps both ways."""
    return [("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes)]
