"""The embedder over gRPC: batching keeps each request's own vectors, the
queue bound answers RESOURCE_EXHAUSTED, both preprocessing modes agree."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from imagesearch.client import EmbedderClient
from tests.inputs import CORRUPT
from tests.services import ROOT, start_embedder

PHOTOS = [p.read_bytes() for p in sorted((ROOT / "tests" / "fixtures" / "photos").glob("*.jpg"))]


def test_concurrent_requests_get_their_own_vectors(embedder):
    texts = [f"a photo of {n} {c} circles" for n in range(12) for c in ("red", "blue")]
    alone = {t: embedder.encode_texts([t])[0] for t in texts}
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda t: embedder.encode_texts([t, "x"])[0], texts * 2))
    for text, vector in zip(texts * 2, together):
        np.testing.assert_allclose(vector, alone[text], atol=1e-5)


def test_images_come_back_in_request_order(embedder):
    one_by_one = np.stack([embedder.encode_images([p])[0] for p in PHOTOS])
    np.testing.assert_allclose(embedder.encode_images(PHOTOS[::-1]), one_by_one[::-1], atol=1e-5)


@pytest.fixture(scope="module")
def small_queue_embedder(tmp_path_factory):
    service = start_embedder(tmp_path_factory.mktemp("small-queue"), "--max-queue", "3",
                             "--preprocess-mode", "process").wait_ready()
    with EmbedderClient(service.address) as client:
        yield client
    assert service.stop() == 0


def test_full_queue_is_resource_exhausted(small_queue_embedder):
    with pytest.raises(grpc.RpcError) as error:
        small_queue_embedder.encode_texts(["a", "b", "c", "d"])
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queue is full" in error.value.details() and "limit 3" in error.value.details()
    assert small_queue_embedder.encode_texts(["a", "b", "c"]).shape[0] == 3


def test_process_preprocessing_matches_threads(embedder, small_queue_embedder):
    np.testing.assert_allclose(small_queue_embedder.encode_images(PHOTOS[:3]),
                               embedder.encode_images(PHOTOS[:3]), atol=1e-5)
    with pytest.raises(grpc.RpcError) as error:
        small_queue_embedder.encode_images([PHOTOS[0], CORRUPT])
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "images[1]" in error.value.details()
