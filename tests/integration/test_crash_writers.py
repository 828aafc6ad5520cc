"""Concurrent writers of every kind, then `kill -9` of the whole search
process group mid-write, then a restart and a check of every acknowledgement:
each acknowledged image is still stored and each acknowledged delete still
holds. On Milvus Lite in one process, with `--workers 2` (the parent serves
the Lite file to both workers), and on the Milvus server.

Milvus Lite's write-ahead log takes no lock: two writes at once on two of
its server threads interleave their records, and everything after the first
torn record is dropped on recovery (docs/reliability.md). This test is what
fails when any Lite write escapes the one writer (search_service/store/lite.py)."""
from __future__ import annotations

import threading

import grpc
import pytest

from imagesearch.client import IngestItem, IngestResult, SearchClient
from tests.services import ROOT, eventually, photo, start_search

OLD = 400  # ingested first, then deleted one id per call by DELETERS threads at once
NEW = 480  # ingested by STREAMS concurrent streams meanwhile
DELETERS = 8
STREAMS = 6
COLLECTION = "crash_writers"
# Threads switch every 10 us, not 5 ms, so that writes on Milvus Lite's
# server threads overlap within seconds of load (tests/fixtures/faults).
STRESS = {"PYTHONPATH": str(ROOT / "tests" / "fixtures" / "faults"),
          "IMAGESEARCH_SWITCH_INTERVAL_S": "0.00001"}
ACKED = (IngestResult.STATUS_INSERTED, IngestResult.STATUS_ALREADY_PRESENT)


@pytest.fixture(params=["lite", "lite-workers", "server"])
def backend(request):
    if request.param == "server":
        return ["--milvus-uri", request.getfixturevalue("milvus_server").uri]
    return ["--workers", "2"] if request.param == "lite-workers" else []


def _items(seeds) -> list[IngestItem]:
    return [IngestItem(image=photo(seed), uri=f"photo-{seed}") for seed in seeds]


def test_concurrent_writers_then_kill_9_lose_no_acknowledgement(backend, embedder_service, tmp_path):
    old, new = _items(range(OLD)), _items(range(OLD, OLD + NEW))
    service = start_search(tmp_path, embedder_service.address, *backend, env=STRESS).wait_ready()
    with SearchClient(service.address, timeout_s=60) as client:
        old_ids = [r.id for r in client.ingest(old, collection=COLLECTION)]
        assert len(set(old_ids)) == OLD

    ingested: set[str] = set()  # acknowledged by an Ingest stream
    deleted: set[str] = set()   # acknowledged by a Delete
    lock = threading.Lock()

    def stream(items: list[IngestItem]) -> None:
        with SearchClient(service.address, timeout_s=60) as client:
            try:
                for result in client.ingest(items, collection=COLLECTION):
                    if result.status in ACKED:
                        with lock:
                            ingested.add(result.id)
            except grpc.RpcError:
                pass  # the kill

    def deleter(ids: list[str]) -> None:
        with SearchClient(service.address, timeout_s=60) as client:
            for one in ids:
                try:
                    response = client.delete([one], collection=COLLECTION)
                except grpc.RpcError:
                    return  # the kill
                assert response.deleted == 1, response
                with lock:
                    deleted.add(one)

    threads = ([threading.Thread(target=stream, args=(new[i::STREAMS],)) for i in range(STREAMS)]
               + [threading.Thread(target=deleter, args=(old_ids[i::DELETERS],))
                  for i in range(DELETERS)])
    for thread in threads:
        thread.start()
    # Mid-write: most of both kinds acknowledged, the rest still going.
    eventually(lambda: len(deleted) >= OLD * 3 // 4 and len(ingested) >= NEW // 2, 120)
    service.kill_group()
    at_kill = f"{len(deleted)} deletes and {len(ingested)} images acknowledged at the kill"
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads)

    service = start_search(tmp_path, embedder_service.address, *backend, env=STRESS).wait_ready()
    try:
        with SearchClient(service.address, timeout_s=60) as client:
            # Every acknowledged delete holds: the ids are missing now.
            gone = client.delete(sorted(deleted), collection=COLLECTION)
            undone = deleted - set(gone.missing)
            # Every acknowledged image is there: ingesting it again finds it.
            again = {r.id: r.status for r in
                     client.ingest(new, collection=COLLECTION)}
            lost = {i for i in ingested if again[i] != IngestResult.STATUS_ALREADY_PRESENT}
            assert (len(undone), len(lost)) == (0, 0), (
                f"{len(undone)} of {len(deleted)} acknowledged deletes undone, "
                f"{len(lost)} of {len(ingested)} acknowledged images lost ({at_kill})")
    finally:
        assert service.stop() == 0, service.log()
