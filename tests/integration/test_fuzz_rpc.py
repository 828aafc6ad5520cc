"""Random requests to the running services (a bounded number per run): every
answer is OK or a documented caller-side status with a message, never
INTERNAL or UNKNOWN, and both servers keep serving."""
from __future__ import annotations

import grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imagesearch.health import status
from imagesearch.v1 import embedder_pb2, embedder_pb2_grpc, search_pb2
from tests.inputs import filters, mutated_images

RPC_FUZZ = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
CALLER_SIDE = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}
texts = st.text(max_size=64)
collections = st.one_of(st.just(""), st.just("images"), texts)


def outcome(call, request) -> grpc.StatusCode:
    try:
        call(request, timeout=30)
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        assert exc.details(), exc.code()
        return exc.code()


@RPC_FUZZ
@given(st.builds(search_pb2.SearchByTextRequest, query=texts, top_k=st.integers(-5, 2000),
                 offset=st.integers(-5, 20000), filter=filters, collection=collections,
                 min_score=st.floats(-2, 2, width=32)))
def test_search_by_text(search_service, search_stub, request):
    assert outcome(search_stub.SearchByText, request) in CALLER_SIDE | {grpc.StatusCode.OK}
    assert status(search_service.address) == "SERVING"


@RPC_FUZZ
@given(st.builds(search_pb2.SearchByImageRequest, image=st.one_of(mutated_images(), st.binary()),
                 top_k=st.integers(1, 10), filter=filters))
def test_search_by_image(search_service, search_stub, request):
    assert outcome(search_stub.SearchByImage, request) in CALLER_SIDE | {grpc.StatusCode.OK}


@RPC_FUZZ
@given(st.lists(st.one_of(mutated_images(), st.binary(max_size=64)), max_size=6), st.booleans())
def test_encode_image(embedder_service, images, partial):
    with grpc.insecure_channel(embedder_service.address) as channel:
        stub = embedder_pb2_grpc.EmbedderServiceStub(channel)
        code = outcome(stub.EncodeImage, embedder_pb2.EncodeImageRequest(images=images,
                                                                        allow_partial=partial))
    assert code in CALLER_SIDE | {grpc.StatusCode.OK}
    assert status(embedder_service.address) == "SERVING"


@RPC_FUZZ
@given(st.lists(st.text(max_size=300), max_size=8))
def test_encode_text(embedder_service, texts_):
    with grpc.insecure_channel(embedder_service.address) as channel:
        stub = embedder_pb2_grpc.EmbedderServiceStub(channel)
        code = outcome(stub.EncodeText, embedder_pb2.EncodeTextRequest(texts=texts_))
    assert code in CALLER_SIDE | {grpc.StatusCode.OK}
