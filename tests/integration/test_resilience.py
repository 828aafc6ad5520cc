"""Overload, graceful shutdown and faults, on real processes:
- at three times capacity, excess calls get RESOURCE_EXHAUSTED at once and
  admitted calls keep a bounded p99;
- SIGTERM in the middle of an Ingest stream loses no acknowledged item;
- an embedder killed under search load: searches fail fast with UNAVAILABLE
  and succeed again by themselves once it is back.
"""
from __future__ import annotations

import io
import queue
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from imagesearch.client import EmbedderClient, IngestItem, IngestResult, SearchClient
from imagesearch.synthetic import generate
from imagesearch.v1 import embedder_pb2, embedder_pb2_grpc, search_pb2, search_pb2_grpc
from imagesearch.health import status
from tests.services import (ROOT, SearchLoad, eventually, metric, photo, scrape, start_embedder,
                            start_search, status_of)

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
                    # shutting down: new calls refused, this one goes on
                    eventually(lambda: status(search.address) != "SERVING", 10)
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
            eventually(lambda: load.count("OK") >= 5, 30)
            embedder.process.send_signal(signal.SIGKILL)
            embedder.process.wait()
            killed = time.monotonic()
            eventually(lambda: load.count("UNAVAILABLE", since=killed + 0.2) >= 8, 30)
            restarting = time.monotonic()
            embedder = start_embedder(tmp_path, port=embedder.port).wait_ready()
            back = time.monotonic()
            eventually(lambda: load.count("OK", since=back + 1.5) >= 5, 30)
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
    """Batches wait 2 s to fill, so a search with a 1 s deadline expires in
    the embedder's queue: the embedder answers DEADLINE_EXCEEDED itself (it
    got the caller's deadline, not the search service's 30 s) and runs no
    forward pass for it. (With 150 ms on a loaded machine, the deadline
    could pass before the search service had forwarded the call at all.)"""
    embedder = start_embedder(tmp_path, "--batch-wait-ms", "2000").wait_ready()
    search = start_search(tmp_path, embedder.address).wait_ready()
    try:
        with SearchClient(search.address, timeout_s=30) as client:
            client.search_text("a photo of a red circle")  # opens the collection, warms the path
            before = scrape(embedder)
            with SearchClient(search.address, timeout_s=1.0) as hasty:
                with pytest.raises(grpc.RpcError) as info:
                    hasty.search_text("a photo of a blue square")
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            expired = dict(grpc_method="EncodeText", grpc_code="DEADLINE_EXCEEDED")
            # the embedder's worker gets to the expired request and answers it
            eventually(lambda: metric(scrape(embedder), "grpc_server_handled_total", **expired)
                       > metric(before, "grpc_server_handled_total", **expired), 10)
            after = scrape(embedder)
    finally:
        assert search.stop() == 0 and embedder.stop() == 0
    assert metric(after, "grpc_server_handled_total", **expired) - \
        metric(before, "grpc_server_handled_total", **expired) == 1
    assert metric(after, "embedder_batch_size_count", batcher="text") == \
        metric(before, "embedder_batch_size_count", batcher="text")


def _webp(side: int) -> bytes:
    """A flat lossless WebP: a few dozen bytes that decode to side x side pixels."""
    out = io.BytesIO()
    Image.new("RGB", (side, side), (200, 30, 30)).save(out, format="WEBP", lossless=True,
                                                       method=0, quality=0)
    return out.getvalue()


def _peak_rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024


def test_hostile_decode_work_stops_at_the_deadline(tmp_path):
    """16 lossless WebPs of a few bytes each, at the largest size WebP may
    have (its decode cost counts double): with a 2 s deadline the call ends
    DEADLINE_EXCEEDED, the images not started are never decoded, and a normal
    request right after takes at most 2 s more than it does on an idle
    server; peak memory grows by under 1 GB. At 7000x7000 they cost more
    than WebP may and are refused before any decoding."""
    embedder = start_embedder(tmp_path).wait_ready()
    try:
        with EmbedderClient(embedder.address, timeout_s=60) as client:
            normal = [photo(i) for i in range(4)]
            started = time.monotonic()
            client.encode_images(normal)
            idle_s = time.monotonic() - started
            too_costly = status_of(client.encode_images, [_webp(7000)] * 16)
            assert too_costly.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "WEBP costs 2x baseline JPEG to decode" in too_costly.details()

            rss = _peak_rss_mb(embedder.process.pid)
            request = embedder_pb2.EncodeImageRequest(images=[_webp(5000)] * 16)
            with grpc.insecure_channel(embedder.address) as channel:
                stub = embedder_pb2_grpc.EmbedderServiceStub(channel)
                hostile = status_of(lambda: stub.EncodeImage(request, timeout=2))
            assert hostile.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            started = time.monotonic()
            assert client.encode_images(normal).shape[0] == 4
            assert time.monotonic() - started < idle_s + 2
            assert _peak_rss_mb(embedder.process.pid) - rss < 1024
    finally:
        assert embedder.stop() == 0


def _sized_jpeg(seed: int, size: int) -> bytes:
    """A JPEG padded after its end marker (as camera trailers are) to exactly `size` bytes."""
    data = photo(seed)
    return data + bytes(size - len(data))


def test_requests_are_cut_by_their_encoded_size(tmp_path):
    """Two items just under and just over half of the embedder's message
    limit arrive in one message (the search service takes twice as much):
    each fits an embedder request alone, together they would overflow one,
    so the search service sends them in two. Both are stored."""
    embedder = start_embedder(tmp_path, "--max-message-mb", "4").wait_ready()
    search = start_search(tmp_path, embedder.address, "--max-message-mb", "8").wait_ready()
    try:
        half = 2 << 20
        request = search_pb2.IngestRequest(collection="sized", items=[
            search_pb2.IngestItem(image=_sized_jpeg(1, half - 200), uri="a"),
            search_pb2.IngestItem(image=_sized_jpeg(2, half + 800), uri="b")])
        with grpc.insecure_channel(search.address, options=[
                ("grpc.max_send_message_length", 8 << 20)]) as channel:
            responses = search_pb2_grpc.ImageSearchServiceStub(channel).Ingest(iter([request]),
                                                                              timeout=60)
            results = [r for response in responses for r in response.results]
        assert [r.status for r in results] == [IngestResult.STATUS_INSERTED] * 2, results
    finally:
        search.stop(), embedder.stop()


def test_a_response_too_large_for_one_message_says_how_to_fix_it(embedder_service, tmp_path):
    """Hits whose metadata add up to more than the message limit: OUT_OF_RANGE
    with what to do, counted as such (never OK), and the service goes on.
    The hits' rows are read in parts once they could exceed a message, so
    the refusal comes before the whole answer is built; and metadata of
    thousands of keys (3,906 made a top-1024 search cost 1.36 GB and 4.4 s)
    is refused at ingest."""
    search = start_search(tmp_path, embedder_service.address, "--max-message-mb", "1").wait_ready()
    try:
        with SearchClient(search.address, max_message_mb=1) as client:
            many_keys = {f"k{i}": "v" * 4 for i in range(3906)}
            [refused] = client.ingest([IngestItem(photo(79), "keys", many_keys)],
                                      collection="big_rows")
            assert refused.status == IngestResult.STATUS_FAILED
            assert "metadata has 3906 keys; the limit is 256" in refused.error
            items = [IngestItem(photo(80 + i), f"{i}", {"note": "x" * 60_000}) for i in range(20)]
            assert all(r.status == IngestResult.STATUS_INSERTED
                       for r in client.ingest(items, collection="big_rows"))
            error = status_of(client.search_text, "a photo of a red circle", 20, "big_rows")
            assert error.code() == grpc.StatusCode.OUT_OF_RANGE
            assert "ask for fewer (a lower top_k), at most 17," in error.details(), error.details()
            assert len(client.search_text("a photo of a red circle", 17, "big_rows")) == 17
            assert len(client.search_text("a photo of a red circle", 5, "big_rows")) == 5
        samples = scrape(search)
        assert metric(samples, "grpc_server_handled_total", grpc_method="SearchByText",
                      grpc_code="OUT_OF_RANGE") == 1
        assert metric(samples, "grpc_server_handled_total", grpc_method="SearchByText",
                      grpc_code="OK") == 2
    finally:
        search.stop()


def test_an_idle_ingest_stream_is_closed_and_keeps_what_it_stored(embedder_service, tmp_path):
    """A stream that sends one image, gets its acknowledgement and then goes
    quiet ends DEADLINE_EXCEEDED after --stream-idle-s, saying why; the
    acknowledged image stays stored."""
    search = start_search(tmp_path, embedder_service.address, "--stream-idle-s", "1").wait_ready()
    outbox: queue.Queue = queue.Queue()
    try:
        with grpc.insecure_channel(search.address) as channel:
            responses = search_pb2_grpc.ImageSearchServiceStub(channel).Ingest(
                iter(outbox.get, None), timeout=60)
            outbox.put(search_pb2.IngestRequest(collection="idle", items=[
                search_pb2.IngestItem(image=photo(990), uri="only")]))
            [result] = next(responses).results
            assert result.status == IngestResult.STATUS_INSERTED
            error = status_of(lambda: next(responses))
            outbox.put(None)
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "sent nothing for 1 s" in error.details()
        with SearchClient(search.address) as client:
            assert client.stats("idle").count == 1
    finally:
        assert search.stop() == 0


def test_a_stream_whose_results_go_unread_stops_reading_and_ends(embedder_service, tmp_path):
    """A caller that sends and never reads its responses grew the search
    process by ~5.5 MB/s: the results waited in an unbounded queue while the
    stream went on reading and storing. Now the stream stops taking work once
    a few responses wait unread, and after --stream-idle-s of that it ends
    DEADLINE_EXCEEDED, after the responses it had made. (The client's window
    stays at 64 KB, its BDP probe off, so results of 4 KB uris fill it
    within a few messages; a growing window would take up to a few MB of
    results into the client first, with the same outcome.)"""
    total = 60 * 32
    search = start_search(tmp_path, embedder_service.address, "--stream-idle-s", "2").wait_ready()

    def messages():
        for m in range(total // 32):
            yield search_pb2.IngestRequest(collection="unread" if m == 0 else "", items=[
                search_pb2.IngestItem(image=photo(5000 + 32 * m + i), uri=f"{m}-{i}-" + "u" * 4000)
                for i in range(32)])

    try:
        with grpc.insecure_channel(search.address, [("grpc.http2.bdp_probe", 0)]) as channel, \
                SearchClient(search.address) as client:
            def stored() -> int:
                try:
                    return client.stats("unread").count
                except grpc.RpcError as exc:  # not created yet
                    assert exc.code() == grpc.StatusCode.NOT_FOUND
                    return 0

            responses = search_pb2_grpc.ImageSearchServiceStub(channel).Ingest(messages(), timeout=120)
            # Unread: the stored count stops growing well short of the stream.
            eventually(lambda: stored() > 0, 60)
            stalled = -1
            while (count := stored()) != stalled:
                stalled = count
                time.sleep(1.5)  # no event says "nothing more is stored": watch the count settle
            assert stalled < total // 4, f"{stalled} of {total} stored while nothing was read"
            time.sleep(3)  # past --stream-idle-s with results unread
            results = []
            with pytest.raises(grpc.RpcError) as info:
                for response in responses:
                    results += response.results
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, info.value.details()
            assert "read none of its results" in info.value.details()
            # What it acknowledged is stored; nothing more was taken since.
            assert len(results) <= client.stats("unread").count == stalled
            assert all(r.status == IngestResult.STATUS_INSERTED for r in results)
    finally:
        assert search.stop() == 0, search.log()
