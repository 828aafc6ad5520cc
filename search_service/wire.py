"""Protobuf wire form written by hand, for the two messages whose building
field by field costs the event loop most per image (see bench/ingest_cpu.py):
the EncodeImage request and the vector column of a Milvus write."""
from __future__ import annotations


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        if not n:
            out.append(low)
            return bytes(out)
        out.append(low | 0x80)


def field_one_header(length: int) -> bytes:
    """The tag and length that precede `length` bytes of field 1 when it is
    length-delimited (bytes, a string, a packed repeated scalar)."""
    return b"\x0a" + _varint(length)
