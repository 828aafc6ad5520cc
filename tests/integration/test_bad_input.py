"""Bad input gets the documented status, a message naming the problem and the
item, and the servers keep serving. Real processes, real Milvus Lite."""
from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2, status_pb2
from PIL import Image

from imagesearch.client import IngestItem, IngestResult
from imagesearch.v1 import embedder_pb2, embedder_pb2_grpc, search_pb2
from tests.inputs import CORRUPT, bomb_png, case_data, scan_bomb
from tests.services import eventually, metric, photo, scrape, status_of


@pytest.fixture(scope="module")
def embedder_stub(embedder_service):
    with grpc.insecure_channel(embedder_service.address) as channel:
        yield embedder_pb2_grpc.EmbedderServiceStub(channel)


@pytest.fixture(autouse=True)
def still_serving(request, embedder):
    """After every case, the servers it used answer a normal request
    correctly. Only cases that use the search service run once per Milvus
    backend (the `search` fixture is parametrised); embedder cases run once."""
    uses_search = {"search", "search_stub", "search_service"} & set(request.fixturenames)
    search = request.getfixturevalue("search") if uses_search else None
    yield
    vectors = embedder.encode_texts(["a photo of a red circle"])
    assert np.linalg.norm(vectors[0]) == pytest.approx(1.0, abs=1e-4)
    if search is not None:
        search.search_text("a photo of a red circle", top_k=1)  # raises unless it answers


@pytest.mark.parametrize("texts, needle", [
    ([], "no texts"),
    ([""], "texts[0]: empty"),
    (["a red circle", "   \n\t"], "texts[1]: empty or only whitespace"),
])
def test_encode_text_rejects(embedder_stub, texts, needle):
    error = status_of(embedder_stub.EncodeText, embedder_pb2.EncodeTextRequest(texts=texts))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in error.details()


@pytest.mark.parametrize("images, needles", [
    ([], ["no images"]),
    ([b""], ["images[0]: empty image bytes"]),
    ([photo(), CORRUPT], ["images[1]:"]),
    ([b"plain text, not an image", photo(), b""], ["images[0]:", "images[2]: empty"]),
])
def test_encode_image_rejects(embedder_stub, images, needles):
    error = status_of(embedder_stub.EncodeImage, embedder_pb2.EncodeImageRequest(images=images))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    for needle in needles:
        assert needle in error.details()


def field_violations(error: grpc.RpcError) -> dict[str, str]:
    """{field: why} from the error's google.rpc.BadRequest detail; the status
    in it repeats the message."""
    status = status_pb2.Status.FromString(dict(error.trailing_metadata())["grpc-status-details-bin"])
    assert (status.code, status.message) == (grpc.StatusCode.INVALID_ARGUMENT.value[0], error.details())
    request, info = error_details_pb2.BadRequest(), error_details_pb2.ErrorInfo()
    assert [detail.Unpack(request) for detail in status.details].count(True) == 1
    assert any(detail.Unpack(info) for detail in status.details)  # and the reason, for programs
    assert (info.reason, info.domain) == ("INVALID_ARGUMENT", "imagesearch")
    return {v.field: v.description for v in request.field_violations}


def test_bad_items_come_as_field_violations(embedder_stub):
    """Besides the message, a google.rpc.BadRequest names each bad item, and
    the request id still comes back."""
    error = status_of(embedder_stub.EncodeImage, embedder_pb2.EncodeImageRequest(
        images=[b"plain text, not an image", photo(), b""]))
    violations = field_violations(error)
    assert list(violations) == ["images[0]", "images[2]"]
    assert violations["images[2]"] == "empty image bytes"
    assert dict(error.trailing_metadata())["x-request-id"]


def test_too_many_items(embedder_stub, embedder):
    limit = embedder.model_info().limits.max_batch_items
    error = status_of(embedder_stub.EncodeText, embedder_pb2.EncodeTextRequest(texts=["x"] * (limit + 1)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"the limit is {limit}" in error.details()


def test_allow_partial_fails_bad_items_alone(embedder_stub, embedder):
    good = [photo(1), photo(2)]
    response = embedder_stub.EncodeImage(embedder_pb2.EncodeImageRequest(
        images=[good[0], CORRUPT, good[1]], allow_partial=True))
    assert [bool(e.error) for e in response.embeddings] == [False, True, False]
    vectors = np.stack([np.frombuffer(response.embeddings[i].vector, "<f4") for i in (0, 2)])
    np.testing.assert_allclose(vectors, embedder.encode_images(good), atol=1e-5)


def test_an_image_refused_for_its_decode_cost_fails_alone(embedder_stub, search):
    """A JPEG of thousands of scans failed a whole Ingest stream (the
    embedder timed out on it) and, through SearchByImage, made the embedder
    UNAVAILABLE for everyone. Refused from its bytes, it fails as one item."""
    bomb = scan_bomb(64, 5000)
    response = embedder_stub.EncodeImage(embedder_pb2.EncodeImageRequest(
        images=[photo(41), bomb], allow_partial=True))
    assert not response.embeddings[0].error
    assert "5010 scans, over the limit of 100" in response.embeddings[1].error
    results = list(search.ingest([IngestItem(photo(42), "ok"), IngestItem(bomb, "bomb")],
                                 collection="decode_cost"))
    assert [r.status for r in results] == [IngestResult.STATUS_INSERTED, IngestResult.STATUS_FAILED]
    assert "scans" in results[1].error
    error = status_of(search.search_image, bomb)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "scans" in error.details()


@pytest.mark.parametrize("request_, code, needle", [
    (search_pb2.SearchByTextRequest(query="", top_k=5), "INVALID_ARGUMENT", "query is empty"),
    (search_pb2.SearchByTextRequest(query="x", top_k=0), "INVALID_ARGUMENT", "top_k must be between 1 and 1024, got 0"),
    (search_pb2.SearchByTextRequest(query="x", top_k=-3), "INVALID_ARGUMENT", "got -3"),
    (search_pb2.SearchByTextRequest(query="x", top_k=1025), "INVALID_ARGUMENT", "got 1025"),
    (search_pb2.SearchByTextRequest(query="x", top_k=5, collection="no_such"), "NOT_FOUND",
     "collection 'no_such' does not exist"),
    (search_pb2.SearchByTextRequest(query="x", top_k=5, collection="bad-name!"), "INVALID_ARGUMENT",
     "collection name 'bad-name!' is invalid"),
])
def test_search_by_text_rejects(search_stub, request_, code, needle):
    error = status_of(search_stub.SearchByText, request_)
    assert error.code().name == code
    assert needle in error.details()


@pytest.mark.parametrize("image, needle", [
    (b"", "image is empty"),
    (CORRUPT, "image: "),
])
def test_search_by_image_rejects(search_stub, image, needle):
    error = status_of(search_stub.SearchByImage, search_pb2.SearchByImageRequest(image=image, top_k=3))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in error.details()


@pytest.mark.parametrize("request_, code, needle", [
    (search_pb2.DeleteRequest(), "INVALID_ARGUMENT", "no ids"),
    (search_pb2.DeleteRequest(ids=["a" * 64, "nope"]), "INVALID_ARGUMENT", "ids[1] = 'nope' is not an image id"),
    (search_pb2.DeleteRequest(ids=["a" * 64], collection="no_such"), "NOT_FOUND", "'no_such'"),
])
def test_delete_rejects(search_stub, request_, code, needle):
    error = status_of(search_stub.Delete, request_)
    assert error.code().name == code
    assert needle in error.details()


@pytest.mark.parametrize("method, request_, field", [
    ("SearchByText", search_pb2.SearchByTextRequest(query=" ", top_k=5), "query"),
    ("SearchByText", search_pb2.SearchByTextRequest(query="x", top_k=0), "top_k"),
    ("SearchByText", search_pb2.SearchByTextRequest(query="x", top_k=5, offset=-1), "offset"),
    ("SearchByText", search_pb2.SearchByTextRequest(query="x", top_k=5, filter=search_pb2.Filter(
        uri_prefix="a\x00")), "filter.uri_prefix"),
    ("SearchByText", search_pb2.SearchByTextRequest(query="x", top_k=5, consistency_token=b"?"),
     "consistency_token"),
    ("SearchByImage", search_pb2.SearchByImageRequest(image=CORRUPT, top_k=3), "image"),
    ("Delete", search_pb2.DeleteRequest(ids=["a" * 64, "nope"]), "ids[1]"),
    ("GetStats", search_pb2.GetStatsRequest(collection="bad-name!"), "collection"),
])
def test_search_mistakes_name_their_field(search_stub, method, request_, field):
    error = status_of(getattr(search_stub, method), request_)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(error) == {field: error.details()}


def test_stats_of_unknown_collection(search_stub):
    error = status_of(search_stub.GetStats, search_pb2.GetStatsRequest(collection="no_such"))
    assert error.code() == grpc.StatusCode.NOT_FOUND


def test_bad_ingest_items_fail_alone(search):
    items = [IngestItem(photo(10), "good-0"), IngestItem(CORRUPT, "corrupt"), IngestItem(b"", "empty"),
             IngestItem(photo(11), "good-1"), IngestItem(photo(10), "repeat-of-good-0"),
             IngestItem(b"GIF89a truncated", "truncated-gif"), IngestItem(photo(12), "good-2")]
    results = list(search.ingest(items, collection="bad_ingest"))
    assert [r.index for r in results] == list(range(len(items)))
    assert [r.uri for r in results] == [i.uri for i in items]
    assert [r.status.name for r in results] == [
        "INSERTED", "FAILED", "FAILED", "INSERTED", "ALREADY_PRESENT", "FAILED", "INSERTED"]
    assert results[2].error == "empty image bytes"
    assert results[1].error and results[5].error
    assert search.stats("bad_ingest").count == 3
    hits = search.search_image(photo(11), top_k=1, collection="bad_ingest")
    assert hits[0].uri == "good-1"


def test_collection_named_after_the_first_message_fails_the_stream(search_stub):
    requests = [search_pb2.IngestRequest(collection="mixed",
                                         items=[search_pb2.IngestItem(image=photo(20), uri="a")]),
                search_pb2.IngestRequest(collection="other",
                                         items=[search_pb2.IngestItem(image=photo(21), uri="b")])]
    error = status_of(lambda: list(search_stub.Ingest(iter(requests))))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "message 1 names a collection" in error.details()


def test_ingest_into_invalid_collection_name(search_stub):
    error = status_of(lambda: list(search_stub.Ingest(iter(
        [search_pb2.IngestRequest(collection="1bad",
                                  items=[search_pb2.IngestItem(image=photo())])]))))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_extreme_aspect_ratio_is_refused_not_resized(embedder_stub):
    """A 200000x1 PNG is a few hundred bytes but would resize to billions of pixels."""
    out = io.BytesIO()
    Image.new("L", (200_000, 1)).save(out, format="PNG")
    error = status_of(embedder_stub.EncodeImage, embedder_pb2.EncodeImageRequest(images=[out.getvalue()]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "images[0]: image is 200000x1: its aspect ratio is too extreme" in error.details()


def test_a_megabyte_of_text_is_truncated_not_refused(embedder):
    vectors = embedder.encode_texts(["a photo of a red circle " * 45_000, "a photo of a red circle"])
    assert vectors.shape[0] == 2


def test_undecodable_ingest_message_fails_the_stream_without_hanging(search_service):
    """A message whose uri is not UTF-8 cannot be parsed: INVALID_ARGUMENT, at once."""
    bad = b"\x12\x04" + b"\x12\x02\xff\xfe"  # an item whose uri is not UTF-8
    with grpc.insecure_channel(search_service.address) as channel:
        ingest = channel.stream_stream("/imagesearch.v1.ImageSearchService/Ingest",
                                       request_serializer=lambda raw: raw,
                                       response_deserializer=search_pb2.IngestResponse.FromString)
        error = status_of(lambda: list(ingest(iter([bad]), timeout=20)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert "request stream message 0" in error.details()


def peak_rss(pid: int) -> int:
    """The process's peak resident memory so far, in bytes (VmHWM)."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_decompression_bomb_is_refused_without_a_memory_spike(embedder_stub, embedder_service):
    """A ~110 KB PNG that claims 30000x30000 pixels (2.7 GB as RGB)."""
    bomb = bomb_png(30_000, 30_000)
    before = peak_rss(embedder_service.process.pid)
    error = status_of(embedder_stub.EncodeImage, embedder_pb2.EncodeImageRequest(images=[bomb]))
    growth = peak_rss(embedder_service.process.pid) - before
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "images[0]: image is 30000x30000 = 900 Mpx" in error.details()
    assert growth < 50 << 20, f"peak RSS grew {growth >> 20} MB"


@pytest.mark.parametrize("case", ["gif:animated", "jpeg:CMYK", "png:16-bit-gray", "png:16-bit-RGB",
                                  "tiff:gray", "png:P-transparency", "jpeg:exif-orientation-6"])
def test_unusual_images_are_encoded_not_refused(embedder, case):
    """Through the service; tests/unit/test_preprocess.py checks each one's
    pixels against transformers' own processor."""
    data, _ = case_data(case)
    [vector] = embedder.encode_images([data])
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("text", ["一只白色的狗", "Собака на снегу", "🐕 dog"])
def test_text_in_other_scripts_is_encoded(embedder, search, text):
    [vector] = embedder.encode_texts([text])
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-4)
    hits = search.search_text(text, top_k=1)
    assert len(hits) <= 1 and all(-1.0 <= hit.score <= 1.0 for hit in hits)


def test_a_message_over_the_limit_is_resource_exhausted(embedder_service):
    limit = 64 << 20  # the default --max-message-mb
    with grpc.insecure_channel(embedder_service.address,
                               options=[("grpc.max_send_message_length", 2 * limit)]) as channel:
        stub = embedder_pb2_grpc.EmbedderServiceStub(channel)
        error = status_of(stub.EncodeImage, embedder_pb2.EncodeImageRequest(images=[bytes(limit + 1)]))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_refused_and_failed_image_requests_give_their_room_back(embedder_stub, embedder_service):
    """Room in the image queue is reserved before decoding; whatever way a
    request ends (bad items, partial results, a deadline passed while
    decoding) the reservation is returned."""
    requests = [embedder_pb2.EncodeImageRequest(images=[CORRUPT, b"", CORRUPT]),
                embedder_pb2.EncodeImageRequest(images=[photo(1), CORRUPT], allow_partial=True),
                embedder_pb2.EncodeImageRequest(images=[photo(i) for i in range(64)])]
    for request, timeout in zip(requests, (10, 10, 0.01)):
        try:
            embedder_stub.EncodeImage(request, timeout=timeout)
        except grpc.RpcError as exc:
            assert exc.code() in (grpc.StatusCode.INVALID_ARGUMENT,
                                  grpc.StatusCode.DEADLINE_EXCEEDED), exc
    assert 'embedder_reserved_items{batcher="image"}' in scrape(embedder_service)
    eventually(lambda: metric(scrape(embedder_service), "embedder_reserved_items") == 0
               and metric(scrape(embedder_service), "embedder_queue_items") == 0, 30)
