"""Overload, graceful shutdown and faults, on real processes:
- at three times capacity, excess calls get RESOURCE_EXHAUSTED at once and
  admitted calls keep a bounded p99;
- SIGTERM in the middle of an Ingest stream loses no acknowledged item;
- an embedder killed under search load: searches fail fast with UNAVAILABLE
  and succeed again by themselves once it is back.
"""
from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from imagesearch.client import EmbedderClient, IngestItem, IngestResult, SearchClient
from imagesearch.synthetic import generate
from tests.services import ROOT, SearchLoad, metric, scrape, start_embedder, start_search

PHOTOS = [p.read_bytes() for p in sorted((ROOT / "tests" / "fixtures" / "photos").glob("*.jpg"))]


def test_three_times_capacity(tmp_path):
    """Queue bound 4 images, 12 closed-loop callers of one photo each."""
    service = start_embedder(tmp_path, "--max-queue", "4", "--batch-size", "4",
                             "--preprocess-workers", "1").wait_ready()
    admitted, rejected, other = [], [], []
    stop = time.monotonic() + 6

    def caller(i: int) -> None:
        with EmbedderClient(service.address, timeout_s=30) as client:
            while time.monotonic() < stop:
                started = time.monotonic()
                try:
                    client.encode_images([PHOTOS[i % len(PHOTOS)]])
                    admitted.append(time.monotonic() - started)
                except grpc.RpcError as exc:
                    took = time.monotonic() - started
                    if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        rejected.append(took)
                        time.sleep(0.01)  # a polite client backs off a little
                    else:
                        other.append(exc.code())
    try:
        with ThreadPoolExecutor(12) as pool:
            list(pool.map(caller, range(12)))
    finally:
        assert service.stop() == 0
    assert other == []
    assert len(admitted) > 20 and len(rejected) > 20, (len(admitted), len(rejected))
    p99_rejected, p99_admitted = np.percentile(rejected, 99), np.percentile(admitted, 99)
    print(f"admitted {len(admitted)} p99 {p99_admitted * 1000:.0f} ms; "
          f"rejected {len(rejected)} p99 {p99_rejected * 1000:.0f} ms")
    assert p99_rejected < 0.25  # refused at once, before any decoding
    assert p99_admitted < 5.0  # a bounded queue: no pile-up into timeouts


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("resilience-images"), seed=21, per_label=4)


def test_sigterm_mid_ingest_loses_no_acknowledged_item(embedder_service, images, tmp_path):
    search = start_search(tmp_path, embedder_service.address, "--grace-s", "20").wait_ready()
    hold = threading.Event()

    def stream():
        for i, path in enumerate(images):
            if i == 40:
                hold.wait(30)  # the server gets SIGTERM while the stream is open
            yield IngestItem(path.read_bytes(), str(path))

    acked = set()
    with SearchClient(search.address) as client:
        try:
            for result in client.ingest(stream()):
                if result.status == IngestResult.STATUS_INSERTED:
                    acked.add(result.id)
                if len(acked) >= 32 and not hold.is_set():
                    search.process.send_signal(signal.SIGTERM)
                    time.sleep(0.5)  # shutting down: new calls refused, this one goes on
                    with SearchClient(search.address, timeout_s=5) as other:
                        with pytest.raises(grpc.RpcError):
                            other.stats()
                    hold.set()
        except grpc.RpcError:
            pass  # the stream may be ended by the shutdown; what was acknowledged counts
    assert search.process.wait(30) == 0
    assert len(acked) >= 32

    search = start_search(tmp_path, embedder_service.address).wait_ready()
    try:
        with SearchClient(search.address) as client:
            results = {r.id: r.status for r in client.ingest(
                IngestItem(p.read_bytes(), str(p)) for p in images)}
            assert all(results[i] == IngestResult.STATUS_ALREADY_PRESENT for i in acked)
            assert client.stats().count == len(images)
    finally:
        assert search.stop() == 0


def test_embedder_killed_under_search_load(tmp_path):
    embedder = start_embedder(tmp_path).wait_ready()
    search = start_search(tmp_path, embedder.address).wait_ready()
    try:
        with SearchLoad(search.address, threads=4) as load:
            time.sleep(1)
            embedder.process.send_signal(signal.SIGKILL)
            embedder.process.wait()
            killed = time.monotonic()
            time.sleep(2)
            # The new process serves calls before it reports ready (while it
            # warms up): the outage ends when it starts, not when it is ready.
            restarting = time.monotonic()
            embedder = start_embedder(tmp_path, port=embedder.port).wait_ready()
            back = time.monotonic()
            time.sleep(2)
    finally:
        search.stop()
        embedder.stop()
    during = [(code, took) for when, code, took, _ in load.outcomes
              if killed + 0.2 < when < restarting - 0.2]
    after = [code for when, code, _, _ in load.outcomes if when > back + 1.5]
    assert {code for code, _ in during} == {"UNAVAILABLE"}, during[:5]
    assert all("embedder at" in details for _, code, _, details in load.outcomes
               if code == "UNAVAILABLE")
    assert max(took for _, took in during) < 1.0  # fast, not a timeout
    assert after and set(after) == {"OK"}, after[:5]


def test_caller_deadline_reaches_the_embedder_and_costs_no_model_time(tmp_path):
    """Batches wait 500 ms to fill, so a search with a 150 ms deadline expires
    in the embedder's queue: the embedder answers DEADLINE_EXCEEDED itself
    (it got the caller's deadline, not the search service's 30 s) and runs
    no forward pass for it."""
    embedder = start_embedder(tmp_path, "--batch-wait-ms", "500").wait_ready()
    search = start_search(tmp_path, embedder.address).wait_ready()
    try:
        with SearchClient(search.address, timeout_s=30) as client:
            client.search_text("a photo of a red circle")  # opens the collection, warms the path
            before = scrape(embedder)
            with SearchClient(search.address, timeout_s=0.15) as hasty:
                with pytest.raises(grpc.RpcError) as info:
                    hasty.search_text("a photo of a blue square")
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            time.sleep(1)  # the embedder's worker gets to the expired request
            after = scrape(embedder)
    finally:
        assert search.stop() == 0 and embedder.stop() == 0
    expired = dict(grpc_method="EncodeText", grpc_code="DEADLINE_EXCEEDED")
    assert metric(after, "grpc_server_handled_total", **expired) - \
        metric(before, "grpc_server_handled_total", **expired) == 1
    assert metric(after, "embedder_batch_size_count", batcher="text") == \
        metric(before, "embedder_batch_size_count", batcher="text")
