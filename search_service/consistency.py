"""Consistency tokens: read-your-writes across replicas, at no cost to other reads.

Milvus stamps every write with a hybrid timestamp from its one timestamp
oracle (physical milliseconds << 18, plus a logical counter), shared by every
client and every replica of ours. A write's token carries its timestamp; a
read that passes one asks Milvus to wait until it has applied everything up
to that timestamp (consistency level "Customized" with that guarantee
timestamp), which costs at most one time tick, about 200 ms, and only when
the write is that recent. A read without a token is Bounded: no wait, but it
may miss writes of the last few seconds.

Milvus Lite has no timestamps; it lives in the one search process that owns
its file, so its reads see every acknowledged write and its tokens are empty.
"""
from __future__ import annotations

import struct
import time

from search_service.errors import InvalidArgument

_VERSION = 1
# Version, then the timestamp big-endian: tokens compare as byte strings,
# and the larger one covers the smaller (clients keep the max).
_FORMAT = ">BQ"
_LOGICAL_BITS = 18
# A token whose time is further ahead of this machine's clock than this came
# from somewhere else (another Milvus, or was made up). A read that carries
# one holds a Milvus thread until Milvus's clock gets there: at 60 s allowed,
# eight such searches held eight threads for the whole Milvus timeout and
# then failed UNAVAILABLE, blaming Milvus. Clocks kept by NTP are
# milliseconds apart, so a few seconds refuse no real token and bound the
# wait well under the Milvus timeout (10 s by default).
MAX_AHEAD_MS = 5_000


def encode(timestamp: int) -> bytes:
    """The token of a write stamped `timestamp`; empty for none (Milvus Lite)."""
    return struct.pack(_FORMAT, _VERSION, timestamp) if timestamp else b""


def decode(token: bytes) -> int:
    """The timestamp a read must see; 0 for an empty token. INVALID_ARGUMENT
    for anything this service did not make."""
    if not token:
        return 0
    if len(token) != struct.calcsize(_FORMAT) or token[0] != _VERSION:
        raise InvalidArgument("consistency_token is malformed: pass the token of a write's "
                              "response unchanged, or none", "consistency_token")
    _, timestamp = struct.unpack(_FORMAT, token)
    ahead_ms = (timestamp >> _LOGICAL_BITS) - time.time() * 1000
    if ahead_ms > MAX_AHEAD_MS:
        raise InvalidArgument(f"consistency_token is {ahead_ms / 1000:.0f} s in the future (at most "
                              f"{MAX_AHEAD_MS // 1000} s is allowed for clocks apart): it was not "
                              "made by this deployment's Milvus; pass a token from this one",
                              "consistency_token")
    return timestamp

