"""Session-wide real services: one embedder (the bundled test model) and one
search service on Milvus Lite, both separate processes on loopback ports."""
from __future__ import annotations

import pytest

from imagesearch.client import EmbedderClient, SearchClient
from tests.services import start_embedder, start_search

EVAL_SEED = 7  # never used for training (tools/train_test_model.py)
EVAL_PER_LABEL = 10


@pytest.fixture(scope="session")
def embedder_service(tmp_path_factory):
    service = start_embedder(tmp_path_factory.mktemp("embedder")).wait_ready()
    yield service
    assert service.stop() == 0, service.log()


@pytest.fixture(scope="session")
def search_service(tmp_path_factory, embedder_service):
    service = start_search(tmp_path_factory.mktemp("search"), embedder_service.address).wait_ready()
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
def eval_images(tmp_path_factory):
    """A fresh synthetic set, generated with a seed the model never saw."""
    from imagesearch.synthetic import generate
    root = tmp_path_factory.mktemp("eval-images")
    generate(root, seed=EVAL_SEED, per_label=EVAL_PER_LABEL)
    return root
