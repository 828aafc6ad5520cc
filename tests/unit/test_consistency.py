"""Consistency tokens: round trip, order, and refusal of foreign ones."""
from __future__ import annotations

import time

import pytest

from search_service import consistency
from search_service.errors import InvalidArgument


def _now() -> int:
    return int(time.time() * 1000) << 18


def test_a_token_round_trips_and_tokens_order_as_bytes():
    early, late = _now(), _now() + (5 << 18)
    assert consistency.decode(consistency.encode(early)) == early
    assert consistency.encode(early) < consistency.encode(late)
    assert consistency.encode(0) == b"" and consistency.decode(b"") == 0


@pytest.mark.parametrize("token", [b"x", b"\x02" + bytes(8), b"\x01" + bytes(9)])
def test_a_malformed_token_is_invalid_argument(token):
    with pytest.raises(InvalidArgument, match="malformed"):
        consistency.decode(token)


def test_a_token_from_the_future_is_refused():
    with pytest.raises(InvalidArgument, match="in the future"):
        consistency.decode(consistency.encode(_now() + (120_000 << 18)))
    with pytest.raises(InvalidArgument, match="10 s in the future"):  # was allowed up to 60 s
        consistency.decode(consistency.encode(_now() + (10_000 << 18)))
    near = _now() + (2_000 << 18)  # clocks a little apart
    assert consistency.decode(consistency.encode(near)) == near
