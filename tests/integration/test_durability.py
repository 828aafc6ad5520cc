"""Nothing acknowledged is lost and nothing is duplicated when Milvus or the
search service dies by SIGKILL; while Milvus is down calls fail fast with
UNAVAILABLE naming it, and the service recovers by itself. Writes are split
to fit the configured request size."""
from __future__ import annotations

import re
import signal
import threading
import time

import grpc
import pytest

from imagesearch import errors
from imagesearch.client import IngestItem, IngestResult, SearchClient
from imagesearch.synthetic import generate
from tests.services import SearchLoad, eventually, photo, start_search, status_of

MILVUS_TIMEOUT_S = 10  # the default --milvus-timeout-s
DOWN_BUDGET_S = 3.0  # "fail fast" while Milvus is down: well under that timeout


def items_of(paths, metadata=None) -> list[IngestItem]:
    return [IngestItem(image=p.read_bytes(), uri=str(p), metadata=metadata or {}) for p in paths]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("durability-images"), seed=11, per_label=5)


@pytest.fixture(params=["lite", "server"])
def backend(request, tmp_path):
    """Arguments that point a fresh search service at one backend."""
    if request.param == "lite":
        return ["--data-dir", str(tmp_path / "data")]
    return ["--milvus-uri", request.getfixturevalue("milvus_server").uri]


def test_milvus_killed_then_restarted(milvus_server, embedder_service, images, tmp_path):
    service = start_search(tmp_path, embedder_service.address, "--milvus-uri", milvus_server.uri,
                           "--milvus-timeout-s", str(MILVUS_TIMEOUT_S)).wait_ready()
    try:
        with SearchClient(service.address, timeout_s=30) as client:
            acked = [r.id for r in client.ingest(items_of(images[:40]), collection="kill_milvus")
                     if r.status == IngestResult.STATUS_INSERTED]
            assert len(acked) == 40

            with SearchLoad(service.address, collection="kill_milvus") as load:
                eventually(lambda: load.count("OK") >= 3, 30)
                milvus_server.kill()
                calls = {
                    "SearchByText": lambda: client.search_text("a red circle", collection="kill_milvus"),
                    "SearchByImage": lambda: client.search_image(photo(), collection="kill_milvus"),
                    "GetStats": lambda: client.stats("kill_milvus"),
                    "Delete": lambda: client.delete(["0" * 64], collection="kill_milvus"),
                    "Ingest": lambda: list(client.ingest(items_of(images[40:42]),
                                                         collection="kill_milvus")),
                }
                for name, call in calls.items():
                    started = time.monotonic()
                    error = status_of(call)
                    assert time.monotonic() - started < DOWN_BUDGET_S, name
                    assert error.code() == grpc.StatusCode.UNAVAILABLE, (name, error.details())
                    assert f"Milvus at {milvus_server.uri} is unavailable" in error.details(), name
                    # Typed by the reason the server sends, not by these words.
                    assert isinstance(error, errors.MilvusUnavailable), (name, type(error))
                assert service.process.poll() is None

                restarted = time.monotonic()
                milvus_server.restart().wait_ready()
                seen = set()  # every status on the way back must say "retry"
                deadline = time.monotonic() + 180
                while True:
                    try:
                        stats = client.stats("kill_milvus")
                        hits = client.search_text("a red circle", top_k=100, collection="kill_milvus")
                        break
                    except grpc.RpcError as exc:
                        seen.add((exc.code(), re.sub(r"\d+", "N", exc.details())[:200]))
                        assert time.monotonic() < deadline, seen
                        time.sleep(0.5)  # recovery is announced nowhere but in answers: poll
                assert {code for code, _ in seen} <= {grpc.StatusCode.UNAVAILABLE}, seen
                assert stats.count == 40 and {h.id for h in hits} == set(acked)
                recovered = time.monotonic()
                eventually(lambda: load.count("OK", since=recovered) >= 3, 30)
            # Under load the whole time: every failure was UNAVAILABLE; fast while
            # Milvus was down; while it recovered (up, not ready) bounded by the
            # Milvus timeout of three calls (a search may wait for another
            # caller's collection open, then make its own two); and the
            # load's own searches succeed again once Milvus is back.
            failures = [(when, code, took) for when, code, took, _ in load.outcomes if code != "OK"]
            assert failures and {code for _, code, _ in failures} == {"UNAVAILABLE"}
            assert max(took for when, _, took in failures if when + took < restarted) < DOWN_BUDGET_S
            assert max(took for _, _, took in failures) < 3 * MILVUS_TIMEOUT_S + 1
            assert {code for when, code, _, _ in load.outcomes if when > recovered} == {"OK"}
            # Read-your-writes on the recovered server.
            more = list(client.ingest(items_of(images[40:45]), collection="kill_milvus"))
            assert [r.status for r in more] == [IngestResult.STATUS_INSERTED] * 5
            assert client.stats("kill_milvus").count == 45
    finally:
        assert service.stop() == 0, service.log()


def test_search_service_killed_mid_ingest(backend, embedder_service, images, tmp_path):
    """SIGKILL while a stream is half acknowledged; the re-run ingest ends with
    one row per distinct image, and every earlier acknowledgement holds."""
    duplicates = [IngestItem(image=p.read_bytes(), uri=f"{p}-copy") for p in images[:10]]
    items = items_of(images) + duplicates
    distinct = len(images)
    service = start_search(tmp_path, embedder_service.address, *backend).wait_ready()
    killed = threading.Event()

    def stream():
        for i, item in enumerate(items):
            if i == 64:
                killed.wait(60)  # hold the rest back until the server is dead
            yield item

    acked: dict[str, int] = {}
    with SearchClient(service.address) as client:
        with pytest.raises(grpc.RpcError) as info:
            for result in client.ingest(stream(), collection="kill_search"):
                if result.status in (IngestResult.STATUS_INSERTED, IngestResult.STATUS_ALREADY_PRESENT):
                    acked[result.id] = result.index
                if len(acked) >= 32 and not killed.is_set():
                    service.process.send_signal(signal.SIGKILL)
                    service.process.wait()
                    killed.set()
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert 32 <= len(acked) < distinct

    service = start_search(tmp_path, embedder_service.address, *backend).wait_ready()
    try:
        with SearchClient(service.address) as client:
            results = list(client.ingest(items, collection="kill_search"))
            by_status = {s: {r.id for r in results if r.status == s}
                         for s in (IngestResult.STATUS_INSERTED, IngestResult.STATUS_ALREADY_PRESENT, IngestResult.STATUS_FAILED)}
            assert by_status[IngestResult.STATUS_FAILED] == set()
            assert set(acked) <= by_status[IngestResult.STATUS_ALREADY_PRESENT]  # nothing acknowledged lost
            assert client.stats("kill_search").count == distinct  # nothing duplicated
            hits = client.search_text("a shape", top_k=1024, collection="kill_search")
            assert len(hits) == len({h.id for h in hits}) == distinct
    finally:
        assert service.stop() == 0, service.log()


def test_writes_are_split_to_the_configured_size(backend, embedder_service, images, tmp_path):
    """128 KiB requests and ~7 KiB rows: each batch of 32 takes several writes."""
    service = start_search(tmp_path, embedder_service.address, *backend, "--milvus-write-kb", "128",
                           "--log-level", "debug").wait_ready()
    try:
        with SearchClient(service.address) as client:
            items = [IngestItem(image=p.read_bytes(), uri=str(p), metadata={"n": str(i), "pad": "x" * 7000})
                     for i, p in enumerate(images[:40])]
            results = list(client.ingest(items, collection="small_writes"))
            assert [r.status for r in results] == [IngestResult.STATUS_INSERTED] * 40
            assert client.stats("small_writes").count == 40
            for i in (0, 17, 39):
                [hit] = client.search_text("x", top_k=10, collection="small_writes", where={"n": str(i)})
                assert hit.metadata["pad"] == "x" * 7000 and hit.uri == str(images[i])
    finally:
        assert service.stop() == 0
    writes = [int(n) for n in re.findall(r"wrote \d+ rows to 'small_writes' in (\d+) requests", service.log())]
    assert sum(writes) > 2 and max(writes) > 1, writes


def test_a_batch_above_the_default_write_size(milvus_server, embedder_service, images, tmp_path):
    """One real ingest batch of about 18 MiB against the server's 64 MiB
    message limit and our 16 MiB default: two requests, every row stored."""
    service = start_search(tmp_path, embedder_service.address, "--milvus-uri", milvus_server.uri,
                           "--ingest-batch", "300", "--log-level", "debug").wait_ready()
    pad = "x" * 63_000
    try:
        with SearchClient(service.address) as client:
            items = [IngestItem(image=p.read_bytes(), uri=str(p), metadata={"pad": pad})
                     for p in images[:100]] + [IngestItem(image=photo(1000 + i), metadata={"pad": pad})
                                               for i in range(200)]
            results = list(client.ingest(items, collection="big_batch"))
            assert [r.status for r in results] == [IngestResult.STATUS_INSERTED] * 300
            assert client.stats("big_batch").count == 300
    finally:
        assert service.stop() == 0
    assert re.findall(r"wrote (\d+) rows to 'big_batch' in (\d+) requests", service.log()) \
        and any(int(k) > 1 for _, k in re.findall(r"wrote (\d+) rows to 'big_batch' in (\d+) requests",
                                                 service.log()))
