"""Milvus filter expressions built from a structured `Filter` message.

Callers never write expressions. Each key and value becomes a double-quoted
string literal in which only backslash and double quote are escaped, the
one quoting that Milvus Lite and the 2.3 server parse alike (Lite rejects
\\u escapes, so non-ASCII text stays as it is, and control characters are
refused instead). Membership is spelled as ORed equalities (Lite has no
`in` on JSON keys) and a uri prefix as a string range (`like` treats `_`
as a wildcard on Lite but not on the server), so both backends answer the
same.
"""
from __future__ import annotations

import re

from imagesearch.v1 import search_pb2
from search_service.errors import InvalidArgument

MAX_KEYS = 16
# Values in all keys together: each is one comparison per row. Measured
# (bench/filter_cost.py, docs/benchmarks.md): Milvus Lite takes about 10 ms
# per comparison per 2,000 rows, and a 2.3 server refuses 1,024 ORed
# comparisons outright, while 256 take it 0.1 s.
MAX_VALUES = 64
MAX_TEXT_BYTES = 1024
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_MAX_CODE_POINT = 0x10FFFF


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _literal(text: str, what: str, field: str) -> str:
    """`text` from the caller (request field `field`), checked, as a literal."""
    if not 1 <= len(text.encode()) <= MAX_TEXT_BYTES:
        raise InvalidArgument(f"filter: {what} must be 1 to {MAX_TEXT_BYTES} bytes", field)
    if _CONTROL.search(text):
        raise InvalidArgument(f"filter: {what} {text[:80]!r} contains a control character", field)
    return _quote(text)


def _successor(prefix: str) -> str | None:
    """The smallest string above every string that starts with `prefix`
    (code-point order, which is UTF-8 byte order), or None if there is none."""
    chars = list(prefix)
    while chars:
        code = ord(chars.pop()) + 1
        if 0xD800 <= code <= 0xDFFF:  # surrogates never occur in valid text
            code = 0xE000
        if code <= _MAX_CODE_POINT:
            return "".join(chars) + chr(code)
    return None


def build(flt: search_pb2.Filter) -> str:
    """The expression for `flt`; "" when it matches everything."""
    if len(flt.metadata) > MAX_KEYS:
        raise InvalidArgument(f"filter: {len(flt.metadata)} metadata keys; the limit is {MAX_KEYS}",
                              "filter.metadata")
    total = sum(len(set(any_of.values)) for any_of in flt.metadata.values())
    if total > MAX_VALUES:
        raise InvalidArgument(f"filter: {total} metadata values in all; the limit is "
                              f"{MAX_VALUES}, since each is a comparison on every row: narrow "
                              "the filter, or store a coarser label to match on", "filter.metadata")
    clauses = []
    for key in sorted(flt.metadata):
        values = list(dict.fromkeys(flt.metadata[key].values))
        if not values:
            raise InvalidArgument(f"filter: metadata key {key[:80]!r} has no values to match",
                                  "filter.metadata")
        field = f"metadata[{_literal(key, 'metadata key', 'filter.metadata')}]"
        equalities = [f"{field} == {_literal(v, f'value of {key[:80]!r}', 'filter.metadata')}"
                      for v in values]
        clauses.append(equalities[0] if len(equalities) == 1 else f"({' or '.join(equalities)})")
    if flt.uri_prefix:
        clauses.append(f"uri >= {_literal(flt.uri_prefix, 'uri_prefix', 'filter.uri_prefix')}")
        upper = _successor(flt.uri_prefix)
        if upper is not None:
            clauses.append(f"uri < {_quote(upper)}")
    return " and ".join(clauses)
