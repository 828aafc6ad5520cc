"""The filter expression builder and the write splitter, without Milvus
(tests/integration/test_filters.py runs the expressions on both backends)."""
from __future__ import annotations

import grpc
import pytest

from imagesearch.v1 import search_pb2
from search_service.errors import InvalidArgument
from search_service.filters import _successor, build
from search_service.store.milvus import Row, chunks


def flt(uri_prefix: str = "", **metadata: list[str]) -> search_pb2.Filter:
    return search_pb2.Filter(uri_prefix=uri_prefix, metadata={
        k: search_pb2.AnyOf(values=v) for k, v in metadata.items()})


def test_empty_filter_matches_all():
    assert build(search_pb2.Filter()) == ""


def test_equality_membership_and_prefix():
    assert build(flt(label=["red"])) == 'metadata["label"] == "red"'
    assert build(flt(label=["red", "blue", "red"], kind=["x"])) == (
        'metadata["kind"] == "x" and (metadata["label"] == "red" or metadata["label"] == "blue")')
    assert build(flt(uri_prefix="/img/a_")) == 'uri >= "/img/a_" and uri < "/img/a`"'


def test_quotes_and_backslashes_are_escaped():
    assert build(flt(**{'k"': ['" or 1==1 or "\\']})) == \
        'metadata["k\\""] == "\\" or 1==1 or \\"\\\\"'


@pytest.mark.parametrize("prefix, upper", [
    ("ab", "ac"), ("a\U0010ffff", "b"), ("\U0010ffff", None), ("a\ud7ff", "a\ue000"), ("日", "旦"),
])
def test_prefix_upper_bound(prefix, upper):
    assert _successor(prefix) == upper


def test_prefix_range_holds_exactly_the_strings_with_the_prefix():
    prefix = "/img/re"
    upper = _successor(prefix)
    for s in ["/img/re", "/img/red", "/img/re\U0010ffff", "/img/rf", "/img/r", "/img/rd~", "/img/re_"]:
        assert (prefix <= s < upper) == s.startswith(prefix), s


@pytest.mark.parametrize("bad", [flt(k=[]), flt(**{"": ["x"]}), flt(k=["a\nb"]), flt(k=["x" * 1025]),
                                 flt(**{f"k{i}": ["x"] for i in range(17)}), flt(k=["v"] * 1 + [str(i) for i in range(64)]),
                                 flt(a=[str(i) for i in range(40)], b=[str(i) for i in range(25)])])
def test_malformed_filters_are_invalid_argument(bad):
    with pytest.raises(InvalidArgument) as info:
        build(bad)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_chunks_respect_the_byte_limit_and_keep_order():
    rows = [Row(id=f"{i:064x}", vector=[0.0] * 64, uri="u" * (i * 100), metadata={"k": "v" * i})
            for i in range(60)]
    parts = chunks(rows, 8192)
    assert sum(parts, []) == rows
    assert len(parts) > 1
    assert all(sum(r.size() for r in part) <= 8192 for part in parts)
    big = Row(id="0" * 64, vector=[0.0] * 512, uri="", metadata={"k": "v" * 20000})
    assert chunks([big, rows[0]], 8192) == [[big], [rows[0]]]  # too big alone still goes
    assert chunks([], 8192) == []
