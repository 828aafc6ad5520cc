"""Fleets: several embedder replicas (of two models, as in a rolling update to
new weights), several search replicas on one Milvus server, concurrent
streams. Every process is real; vectors are read back from Milvus and
recomputed to prove which model made them."""
from __future__ import annotations

import itertools
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from pymilvus import MilvusClient

from imagesearch.client import EmbedderClient, IngestItem, IngestResult, SearchClient
from imagesearch.health import status
from search_service.ingest import image_id
from search_service.domain import ModelIdentity
from search_service.store import MilvusStore, Row
from tests.services import (ROOT, TEST_MODEL, Load, Service, eventually, free_port, photo,
                            start_embedder, start_search, status_of)

FAULTS = ROOT / "tests" / "fixtures" / "faults"
QUERY = "a photo of a red circle"


@pytest.fixture(scope="module")
def other_model(tmp_path_factory) -> Path:
    """The test model with both projections rotated: the same dimension and a
    working model, but other weights, whose vectors do not compare with the
    original's."""
    import torch
    from transformers import CLIPModel

    out = tmp_path_factory.mktemp("models") / "shapes-clip-rotated"
    shutil.copytree(TEST_MODEL, out)
    model = CLIPModel.from_pretrained(TEST_MODEL)
    dim = model.config.projection_dim
    rotation, _ = torch.linalg.qr(torch.randn(dim, dim, generator=torch.Generator().manual_seed(3)))
    with torch.no_grad():
        for projection in (model.text_projection, model.visual_projection):
            projection.weight.copy_(rotation @ projection.weight)
    model.save_pretrained(out)
    return out


def _vectors(milvus_uri: str, collection: str) -> dict[str, np.ndarray]:
    """uri -> stored vector, read straight from Milvus."""
    client = MilvusClient(uri=milvus_uri)
    try:
        rows = client.query(collection, filter='id != ""', output_fields=["uri", "vector"],
                            limit=16384, consistency_level="Strong")
    finally:
        client.close()
    return {row["uri"]: np.asarray(row["vector"], dtype=np.float32) for row in rows}


def _assert_made_by(stored: dict[str, np.ndarray], images: dict[str, bytes], embedder: str) -> None:
    """Every stored vector is the one `embedder` makes of its image (cosine >= 0.999)."""
    with EmbedderClient(embedder) as client:
        expected = client.encode_images([images[uri] for uri in stored])
    cosines = np.sum(np.stack(list(stored.values())) * expected, axis=1)
    assert cosines.min() >= 0.999, dict(zip(stored, cosines.round(3)))


class _Load(Load):
    """Threads that ingest fresh images and search, until stopped; each
    outcome is kept as (kind, status name, details)."""

    def __init__(self, address: str, collection: str, images: dict[str, bytes]) -> None:
        super().__init__(self._ingest, self._search)
        self.outcomes: list[tuple[str, str, str]] = []
        self._address, self._collection, self._images = address, collection, images

    def _record(self, kind: str, call) -> None:
        try:
            call()
            self.outcomes.append((kind, "OK", ""))
        except grpc.RpcError as exc:
            self.outcomes.append((kind, exc.code().name, exc.details()))

    def _ingest(self) -> None:
        with SearchClient(self._address, timeout_s=30) as client:
            n = 0
            while not self._stop.is_set():
                uri = f"load-{n}"
                self._images[uri] = photo(1000 + n)
                self._record("ingest", lambda: list(client.ingest(
                    [IngestItem(self._images[uri], uri)], collection=self._collection)))
                n += 1

    def _search(self) -> None:
        with SearchClient(self._address, timeout_s=30) as client:
            while not self._stop.is_set():
                self._record("search", lambda: client.search_text(QUERY, 3, self._collection))
                self._stop.wait(0.05)  # paces the load; not a synchronisation


def test_two_models_behind_one_address_never_mix(tmp_path, milvus_server, other_model):
    """Embedders of two models behind one address, as mid-way through a
    rolling update: every vector stored comes from the collection's model,
    and every search's scores are those of that model's query vector."""
    a = start_embedder(tmp_path)
    b = start_embedder(tmp_path, "--model", str(other_model))
    a.wait_ready(), b.wait_ready()
    search = start_search(tmp_path, f"ipv4:{a.address},{b.address}",
                          "--milvus-uri", milvus_server.uri, "--ingest-batch", "4").wait_ready()
    try:
        images = {f"img-{i}": photo(200 + i) for i in range(24)}
        with SearchClient(search.address) as client:
            # The collection is created for whichever model answers first.
            results = list(client.ingest([IngestItem(data, uri) for uri, data in images.items()],
                                         collection="mixing"))
            assert [r.status for r in results] == [IngestResult.STATUS_INSERTED] * 24
            model = client.stats("mixing").model.fingerprint
            owner = next(e for e in (a, b) if EmbedderClient(e.address).model_info()
                         .model.fingerprint == model)
            with EmbedderClient(owner.address) as embedder:
                query = embedder.encode_texts([QUERY])[0]
            stored = _vectors(milvus_server.uri, "mixing")
            for _ in range(20):  # round-robin: about half reach the other model first
                hits = client.search_text(QUERY, 5, "mixing")
                scores = [float(stored[h.uri] @ query) for h in hits]
                np.testing.assert_allclose([h.score for h in hits], scores, atol=1e-3)
        assert len(stored) == 24
        _assert_made_by(stored, images, owner.address)
    finally:
        search.stop(), a.stop(), b.stop()


def test_rolling_update_to_another_model(tmp_path, milvus_server, other_model):
    """Two embedders of model A are replaced one by one by two of model B
    under steady ingest and search: no vector of B lands in A's collection;
    every failure is UNAVAILABLE (a replica restarting) or FAILED_PRECONDITION
    naming both models; afterwards a new collection takes model B, and the
    old one serves again as soon as an embedder of A is back, all without
    restarting the search service."""
    ports = [free_port() for _ in range(4)]
    a1, a2 = (start_embedder(tmp_path, port=port) for port in ports[:2])
    a1.wait_ready(), a2.wait_ready()
    search = start_search(tmp_path, "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in ports),
                          "--milvus-uri", milvus_server.uri).wait_ready()
    running = [a1, a2]
    try:
        images = {f"seed-{i}": photo(300 + i) for i in range(4)}
        with SearchClient(search.address) as client:
            list(client.ingest([IngestItem(d, u) for u, d in images.items()], collection="rolling"))
            with _Load(search.address, "rolling", images) as load:
                for old, port in ((a1, ports[2]), (a2, ports[3])):
                    assert old.stop() == 0
                    running.remove(old)
                    running.append(start_embedder(tmp_path, "--model", str(other_model),
                                                  port=port).wait_ready())
                eventually(lambda: load.outcomes[-1][1] != "OK" and
                           load.outcomes[-2][1] != "OK", 30)  # only B is left
            failures = [o for o in load.outcomes if o[1] != "OK"]
            assert {code for _, code, _ in failures} <= {"UNAVAILABLE", "FAILED_PRECONDITION"}, \
                [f for f in failures if f[1] not in ("UNAVAILABLE", "FAILED_PRECONDITION")]
            with EmbedderClient(f"127.0.0.1:{ports[2]}") as embedder:
                b_model = embedder.model_info().model
            a_model = client.stats("rolling").model
            for _, code, details in failures:
                if code == "FAILED_PRECONDITION":
                    assert a_model.fingerprint in details and b_model.fingerprint in details
            assert sum(code == "OK" for kind, code, _ in load.outcomes if kind == "ingest") > 0
            error = status_of(client.search_text, QUERY, 3, "rolling")
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION

            [fresh] = client.ingest([IngestItem(photo(400), "fresh")], collection="after_update")
            assert fresh.status == IngestResult.STATUS_INSERTED
            assert client.stats("after_update").model.fingerprint == b_model.fingerprint

            stored = _vectors(milvus_server.uri, "rolling")
            running.append(start_embedder(tmp_path, port=ports[0]).wait_ready())
            _assert_made_by(stored, images, running[-1].address)
            eventually(lambda: _search_ok(client, "rolling"), 30)
    finally:
        search.stop()
        for embedder in running:
            embedder.stop()


def _search_ok(client: SearchClient, collection: str) -> bool:
    try:
        return len(client.search_text(QUERY, 3, collection)) == 3
    except grpc.RpcError:
        return False


def test_embedder_with_a_broken_model_leaves_rotation(tmp_path):
    """A model that fails every batch makes its embedder NOT_SERVING (so
    load balancers skip it); once it works again, the probe makes it
    SERVING without a restart."""
    flag = tmp_path / "broken"
    env = {"PYTHONPATH": str(FAULTS), "IMAGESEARCH_FAULT_FILE": str(flag)}
    embedder = start_embedder(tmp_path, env=env).wait_ready()
    try:
        with EmbedderClient(embedder.address) as client:
            flag.touch()
            for _ in range(3):
                error = status_of(client.encode_texts, [QUERY])
                assert error.code() == grpc.StatusCode.INTERNAL
                assert "injected fault" in error.details()
            assert status(embedder.address) == "NOT_SERVING"
            flag.unlink()
            eventually(lambda: status(embedder.address) == "SERVING", 10)
            assert client.encode_texts([QUERY]).shape[0] == 1
    finally:
        assert embedder.stop() == 0


def test_requests_are_sized_to_the_embedders_limits(tmp_path):
    """The embedder takes 8 items per request; the search service, on its
    defaults (batches of 32), learns that and inserts all 40 images."""
    embedder = start_embedder(tmp_path, "--max-batch-items", "8").wait_ready()
    search = start_search(tmp_path, embedder.address).wait_ready()
    try:
        with SearchClient(search.address) as client:
            results = list(client.ingest([IngestItem(photo(500 + i), f"{i}") for i in range(40)]))
            assert [r.status for r in results] == [IngestResult.STATUS_INSERTED] * 40
        assert "embedder limits: 8 items" in search.log()
    finally:
        search.stop(), embedder.stop()


def test_a_write_through_one_replica_is_read_through_another(tmp_path, embedder_service,
                                                            milvus_server):
    """Two search replicas on one Milvus server: an image ingested through
    the first is found at once through the second by a search that carries
    the ingest's consistency token; GetStats with it counts it."""
    replicas = [start_search(tmp_path, embedder_service.address, "--milvus-uri",
                             milvus_server.uri) for _ in range(2)]
    for replica in replicas:
        replica.wait_ready()
    try:
        with SearchClient(replicas[0].address) as writer, \
                SearchClient(replicas[1].address) as reader:
            for n in range(10):
                image = photo(600 + n)
                [result] = writer.ingest([IngestItem(image, f"token-{n}")], collection="tokens")
                assert result.status == IngestResult.STATUS_INSERTED
                reader.consistency_token = writer.consistency_token
                assert reader.search_image(image, 1, "tokens")[0].id == result.id
                assert reader.stats("tokens").count == n + 1
            reader.consistency_token = b"\x01" + (1 << 62).to_bytes(8, "big")
            error = status_of(reader.search_text, QUERY, 1, "tokens")
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "future" in error.details()
    finally:
        for replica in replicas:
            replica.stop()


def _token_ahead(seconds: float) -> bytes:
    return b"\x01" + ((int((time.time() + seconds) * 1000)) << 18).to_bytes(8, "big")


def test_tokens_ahead_of_the_clock_hold_no_milvus_thread(tmp_path, embedder_service,
                                                        milvus_server):
    """Eight searches with a well-formed token 30 s ahead each held a Milvus
    thread for the whole --milvus-timeout-s and failed UNAVAILABLE, blaming
    Milvus, while a GetStats waited behind them. Now a token more than a few
    seconds ahead is refused at once; one slightly ahead is waited for."""
    service = start_search(tmp_path, embedder_service.address, "--milvus-uri",
                           milvus_server.uri).wait_ready()
    try:
        with SearchClient(service.address) as client:
            [result] = client.ingest([IngestItem(photo(700), "ahead")], collection="ahead")
            assert result.status == IngestResult.STATUS_INSERTED

            def search_ahead(_):
                with SearchClient(service.address) as ahead:
                    ahead.consistency_token = _token_ahead(30)
                    return status_of(ahead.search_text, QUERY, 1, "ahead")

            with ThreadPoolExecutor(8) as pool:
                errors = list(pool.map(search_ahead, range(8)))
                assert client.stats("ahead").count == 1
            assert {e.code() for e in errors} == {grpc.StatusCode.INVALID_ARGUMENT}
            assert all("s in the future" in e.details() for e in errors), errors[0].details()
            client.consistency_token = _token_ahead(1)  # clocks a little apart: waited for
            assert client.search_text(QUERY, 1, "ahead")[0].id == result.id
    finally:
        assert service.stop() == 0, service.log()


def test_a_writes_own_timestamp_is_its_token(milvus_server):
    """The token of an ingest batch of new images is the Milvus timestamp of
    its write (no timestamp call after it): each write's is later than the
    last, and a count that waits for it, sent at once, sees every row."""
    store = MilvusStore(milvus_server.uri)
    try:
        store.create("stamps", ModelIdentity("stamps", "f" * 64, 8))
        last, rng = store.timestamp(), np.random.default_rng(7)
        for n in range(5):
            vectors = rng.standard_normal((20, 8)).astype("<f4")
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            stamp = store.write("stamps", [Row(image_id(b"%d-%d" % (n, i)), vector, "", {})
                                           for i, vector in enumerate(vectors)])
            assert stamp > last
            assert store.count("stamps", stamp) == 20 * (n + 1)
            last = stamp
        assert store.write("stamps", []) == 0  # nothing written: the caller takes a timestamp
    finally:
        store.close()


def _at_once(call, args) -> None:
    """`call(arg)` for each of `args`, each on its own thread, all at once."""
    threads = [threading.Thread(target=call, args=(arg,)) for arg in args]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)


def test_concurrent_streams_tokens_cover_their_own_rows(tmp_path, embedder_service,
                                                       milvus_server):
    """Six streams at once through one replica: their batches' reads and
    writes go to Milvus merged (search_service/coalesce.py). Each stream's
    own consistency token then lets a search through a second replica find
    every image of that stream. Then six streams of the same new images:
    each is INSERTED once, and every stream's token, also of those told
    ALREADY_PRESENT (possibly while another stream was still writing it),
    finds them all."""
    writer, reader = (start_search(tmp_path, embedder_service.address, "--milvus-uri",
                                   milvus_server.uri, "--ingest-batch", "4") for _ in range(2))
    writer.wait_ready(), reader.wait_ready()

    def ingest_at_once(streams: dict[int, list[IngestItem]]) -> dict[int, tuple[list, bytes]]:
        outcomes = {}

        def stream(s: int) -> None:
            with SearchClient(writer.address) as client:
                results = list(client.ingest(streams[s], collection="merged"))
                outcomes[s] = (results, client.consistency_token)
        _at_once(stream, list(streams))
        assert sorted(outcomes) == list(streams)
        with SearchClient(reader.address) as client:
            for s, (results, token) in outcomes.items():
                client.consistency_token = token
                for item, result in zip(streams[s], results):
                    assert client.search_image(item.image, 1, "merged")[0].id == result.id
        return outcomes

    try:
        distinct = {s: [IngestItem(photo(800 + 10 * s + i), f"{s}-{i}") for i in range(8)]
                    for s in range(6)}
        for results, _ in ingest_at_once(distinct).values():
            assert [r.status for r in results] == [IngestResult.STATUS_INSERTED] * 8
        same = [IngestItem(photo(900 + i), f"same-{i}") for i in range(8)]
        statuses = [r.status for results, _ in ingest_at_once(dict.fromkeys(range(6), same)).values()
                    for r in results]
        assert statuses.count(IngestResult.STATUS_INSERTED) == 8
        assert statuses.count(IngestResult.STATUS_ALREADY_PRESENT) == 5 * 8
        with SearchClient(reader.address) as client:
            assert client.stats("merged").count == 56
    finally:
        writer.stop()
        reader.stop()


def test_concurrent_streams_of_the_same_images_insert_each_once(tmp_path, embedder_service):
    """8 streams of the same 120 images at once into one process: 120
    INSERTED in all, the rest ALREADY_PRESENT, 120 rows."""
    search = start_search(tmp_path, embedder_service.address, "--ingest-batch", "8").wait_ready()
    items = [IngestItem(photo(700 + i), f"{i}") for i in range(120)]
    statuses: list[int] = []
    try:
        def stream():
            with SearchClient(search.address) as client:
                statuses.extend(r.status for r in client.ingest(items, collection="same"))
        _at_once(lambda _: stream(), range(8))
        assert len(statuses) == 8 * 120
        assert statuses.count(IngestResult.STATUS_INSERTED) == 120
        assert statuses.count(IngestResult.STATUS_ALREADY_PRESENT) == 7 * 120
        with SearchClient(search.address) as client:
            assert client.stats("same").count == 120
    finally:
        search.stop()


class _Failover(Load):
    """Callers that ingest new images in streams of 6 through whichever search
    replica is in `live`, in turn, and send a failed stream again through the
    next one. Results are recorded as they arrive: an id counts as
    acknowledged even when its stream failed later."""

    def __init__(self, live: list[str], callers: int) -> None:
        super().__init__(*[self._run] * callers)
        self.live = live  # addresses; the test changes them
        self.sent: set[str] = set()
        self.acked: set[str] = set()
        self.failures: list[tuple[str, str]] = []
        self._seeds = itertools.count(5000)

    def _run(self) -> None:
        turn = 0
        while not self._stop.is_set():
            items = [IngestItem(photo(next(self._seeds))) for _ in range(6)]
            self.sent.update(image_id(item.image) for item in items)
            for _ in range(8):
                live = list(self.live)
                turn += 1
                try:
                    with SearchClient(live[turn % len(live)], timeout_s=30) as client:
                        for result in client.ingest(items, collection="replaced"):
                            assert result.status in (IngestResult.STATUS_INSERTED,
                                                     IngestResult.STATUS_ALREADY_PRESENT), result
                            self.acked.add(result.id)
                    break
                except grpc.RpcError as exc:
                    self.failures.append((exc.code().name, exc.details()))


def test_search_replicas_replaced_under_ingest_load_lose_nothing(tmp_path, embedder_service,
                                                                milvus_server):
    """Three callers ingest through two search replicas on one Milvus server
    while the replicas are replaced: one in a rolling update (the new one
    joins, the old one leaves rotation and gets SIGTERM), then one killed
    with SIGKILL while still in rotation, and replaced. Ingest goes on
    through each step; a caller's failed stream only ever fails UNAVAILABLE
    or CANCELLED and succeeds on another replica; every acknowledged image is
    in Milvus, and nothing that was not sent is."""
    def replica() -> Service:
        return start_search(tmp_path, embedder_service.address, "--milvus-uri", milvus_server.uri,
                            "--ingest-batch", "2").wait_ready()

    started = [replica(), replica()]
    live = [s.address for s in started]
    try:
        with _Failover(live, callers=3) as load:
            def progress() -> None:  # a dozen more images acknowledged
                mark = len(load.acked)
                eventually(lambda: len(load.acked) >= mark + 12, 90)
            progress()
            started.append(replica())  # rolling update of replica 0
            live.append(started[-1].address)
            live.remove(started[0].address)
            assert started[0].stop() == 0
            progress()
            started[1].process.kill()  # a crash, still in rotation
            started[1].process.wait()
            progress()
            started.append(replica())
            live.append(started[-1].address)
            live.remove(started[1].address)
            progress()
        assert {code for code, _ in load.failures} <= {"UNAVAILABLE", "CANCELLED"}, load.failures
        milvus = MilvusClient(uri=milvus_server.uri)
        try:
            stored = {row["id"] for row in milvus.query(
                "replaced", filter='id != ""', output_fields=["id"], limit=16384,
                consistency_level="Strong")}
        finally:
            milvus.close()
        assert load.acked <= stored, f"{len(load.acked - stored)} acknowledged images lost"
        assert stored <= load.sent
    finally:
        for service in started:
            service.stop()
