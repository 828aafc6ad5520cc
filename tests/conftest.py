"""Session-wide real services: one embedder (the bundled test model) and a
search service, each a separate process on loopback ports. Every test that
uses the search service runs twice: on an embedded Milvus Lite file, and on
a real Milvus standalone server that the session starts itself."""
from __future__ import annotations

import grpc
import pytest

from imagesearch.client import EmbedderClient, SearchClient
from imagesearch.v1 import search_pb2_grpc
from tests.services import (EVAL_PER_LABEL, MilvusServer, eventually, imgsearch, start_embedder,
                            start_search)

EVAL_SEED = 7  # never used for training (tools/train_test_model.py)


@pytest.fixture(scope="session")
def embedder_service(tmp_path_factory):
    service = start_embedder(tmp_path_factory.mktemp("embedder")).wait_ready()
    yield service
    assert service.stop() == 0, service.log()


@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory):
    server = MilvusServer(tmp_path_factory.mktemp("milvus-server")).wait_ready()
    yield server
    server.stop()


@pytest.fixture(scope="session", params=["lite", "server"])
def search_service(request, tmp_path_factory, embedder_service):
    args = []
    if request.param == "server":
        args = ["--milvus-uri", request.getfixturevalue("milvus_server").uri]
    service = start_search(tmp_path_factory.mktemp(f"search-{request.param}"),
                           embedder_service.address, *args).wait_ready()
    yield service
    assert service.stop() == 0, service.log()


@pytest.fixture(scope="session")
def embedder(embedder_service):
    with EmbedderClient(embedder_service.address, timeout_s=60) as client:
        yield client


@pytest.fixture(scope="session")
def search(search_service):
    with SearchClient(search_service.address, timeout_s=60) as client:
        yield client


@pytest.fixture(scope="session")
def search_stub(search_service):
    with grpc.insecure_channel(search_service.address) as channel:
        yield search_pb2_grpc.ImageSearchServiceStub(channel)


@pytest.fixture(scope="session")
def eval_images(tmp_path_factory):
    """A fresh synthetic set, generated with a seed the model never saw."""
    from imagesearch.synthetic import generate
    root = tmp_path_factory.mktemp("eval-images")
    generate(root, seed=EVAL_SEED, per_label=EVAL_PER_LABEL)
    return root


@pytest.fixture(scope="session")
def ingested(search_service, eval_images):
    """The eval set ingested through the CLI into the default collection."""
    run = imgsearch(search_service.address, "ingest", str(eval_images), "--quiet")
    assert run.returncode == 0, run.stderr + run.stdout
    # The CLI's consistency token ended with it: other readers see its writes
    # within Milvus's staleness bound (at once on Milvus Lite).
    with SearchClient(search_service.address) as client:
        eventually(lambda: client.stats().count == 24 * EVAL_PER_LABEL, 30)
    return run
