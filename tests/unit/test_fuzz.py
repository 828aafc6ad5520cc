"""Property-based fuzzing, a bounded number of examples per run:
- image decoding gives a crop or an ImageDecodeError for any bytes, random or
  a real file with bytes flipped, cut or spliced, and never anything else;
- search request validation gives a query or InvalidArgument for any
  request, and the filter expressions it builds hold caller text only inside
  quoted literals.
(tests/integration/test_fuzz_rpc.py sends random requests to the services.)"""
from __future__ import annotations

import re

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from embedder_service.preprocess import ImageDecodeError, Preprocessor, decode_image
from imagesearch.v1 import search_pb2
from search_service.errors import InvalidArgument
from search_service.filters import build
from search_service.validation import Query
from tests.inputs import filters, mutated_images, texts
from tests.services import TEST_MODEL

PREPROCESSOR = Preprocessor.from_pretrained(TEST_MODEL)
FUZZ = settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])


def _check_decodes_or_refuses(data: bytes) -> None:
    try:
        image = decode_image(data, max_pixels=4_000_000)
    except ImageDecodeError as exc:
        assert str(exc)  # a reason the caller can read
        return
    crop = PREPROCESSOR.crop(image)
    assert crop.dtype == np.uint8 and crop.shape == (*PREPROCESSOR.crop_size, 3)


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes_decode_or_are_refused(data):
    _check_decodes_or_refuses(data)


@FUZZ
@given(mutated_images())
def test_damaged_images_decode_or_are_refused(data):
    _check_decodes_or_refuses(data)




@FUZZ
@given(st.builds(search_pb2.SearchByTextRequest, query=texts,
                 top_k=st.integers(-2**31, 2**31 - 1), offset=st.integers(-2**31, 2**31 - 1),
                 min_score=st.floats(allow_nan=True, allow_infinity=True, width=32),
                 filter=filters))
def test_search_requests_validate_or_are_invalid_argument(request):
    try:
        query = Query(request)
    except InvalidArgument as exc:
        assert str(exc)
        return
    assert 1 <= query.top_k <= 1024 and query.offset >= 0 and -1 <= query.min_score <= 1


# What may stand outside string literals in a built expression.
_LITERAL = re.compile(r'"(?:[^"\\]|\\.)*"')
_SKELETON = re.compile(r"(metadata\[\s*\]|==|>=|<|and|or|uri|[()\s])*")


@FUZZ
@given(filters)
def test_filter_expressions_keep_caller_text_inside_literals(flt):
    try:
        expression = build(flt)
    except InvalidArgument:
        return
    skeleton = _LITERAL.sub("", expression)
    assert _SKELETON.fullmatch(skeleton), (expression, skeleton)
    literals = [re.sub(r"\\(.)", r"\1", m.group(0)[1:-1]) for m in _LITERAL.finditer(expression)]
    for key, values in flt.metadata.items():
        assert key in literals and all(v in literals for v in values.values)
