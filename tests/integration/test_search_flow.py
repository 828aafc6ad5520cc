"""The tutorial's flow end to end: real embedder and search processes, Milvus
Lite, the bundled test model, a freshly generated image set, the CLI."""
from __future__ import annotations

import asyncio
import json
import os
import queue

import grpc
import numpy as np
import pytest
from PIL import Image

from imagesearch.cli import find_images
from imagesearch.client import IngestItem, IngestResult, SearchClient
from imagesearch.synthetic import LABELS, caption
from imagesearch.v1 import search_pb2, search_pb2_grpc
from tests.services import EVAL_PER_LABEL, LITE_ONLY, imgsearch, photo, start_search


def test_ingest_summary(ingested):
    total = len(LABELS) * EVAL_PER_LABEL
    assert f"{total} images: {total} inserted, 0 already present, 0 failed" in ingested.stdout


def test_text_search_precision_at_10(search_service, ingested):
    """The issue's quality bar, through `imgsearch search --json`: mean precision@10 >= 0.9."""
    precisions = {}
    for label in LABELS:
        run = imgsearch(search_service.address, "search", caption(label), "-k", "10", "--json")
        assert run.returncode == 0, run.stderr
        hits = json.loads(run.stdout)
        assert len(hits) == 10
        assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
        assert all(set(h) == {"rank", "id", "score", "uri", "metadata"} for h in hits)
        assert [h["rank"] for h in hits] == list(range(1, 11))
        precisions[label] = sum(h["metadata"]["label"] == label for h in hits) / 10
    mean = sum(precisions.values()) / len(precisions)
    assert mean >= 0.9, precisions


def test_reingest_leaves_count_unchanged(search, search_service, eval_images, ingested):
    before = search.stats().count
    run = imgsearch(search_service.address, "ingest", str(eval_images), "--quiet")
    assert run.returncode == 0, run.stderr
    assert f"0 inserted, {before} already present, 0 failed" in run.stdout
    assert search.stats().count == before == len(LABELS) * EVAL_PER_LABEL


def test_stats(search, embedder, ingested):
    stats = search.stats()
    info = embedder.model_info()
    assert (stats.collection, stats.model) == ("images", info.model)
    assert info.model.name == "shapes-clip"  # the directory's name, never its path


def test_search_by_image_finds_itself(search, eval_images, ingested):
    for path in find_images(eval_images)[::37]:
        [best, *_] = search.search_image(path.read_bytes(), top_k=3)
        assert best.uri == str(path.resolve())
        assert best.score == pytest.approx(1.0, abs=1e-3)


def test_search_cli_by_image_and_grid(search_service, eval_images, ingested, tmp_path):
    query = find_images(eval_images)[0]
    grid = tmp_path / "grid.png"
    run = imgsearch(search_service.address, "search", "--image", str(query), "-k", "10",
                    "--grid", str(grid), "--no-labels")  # the tutorial's plain grid
    assert run.returncode == 0, run.stderr
    assert str(query.resolve()) in run.stdout.splitlines()[0]
    with Image.open(grid) as picture:
        assert picture.size == (5 * 150, 2 * 150)
        # The first cell is the query image itself, resized as the tutorial does.
        with Image.open(query) as original:
            expected = original.convert("RGB").resize((150, 150))
        cell = picture.crop((0, 0, 150, 150))
        assert np.array_equal(np.asarray(cell), np.asarray(expected))


def test_delete(search, eval_images):
    """Its own collection, so the shared one keeps its count."""
    paths = find_images(eval_images)[:3]
    items = [IngestItem(image=p.read_bytes(), uri=str(p)) for p in paths]
    results = list(search.ingest(items, collection="delete_test"))
    assert [r.status for r in results] == [IngestResult.STATUS_INSERTED] * 3
    ids = [r.id for r in results]
    gone = search.delete([ids[0], "0" * 64], collection="delete_test")
    assert (gone.deleted, list(gone.missing)) == (1, ["0" * 64])
    assert search.stats("delete_test").count == 2
    hits = search.search_image(paths[0].read_bytes(), top_k=10, collection="delete_test")
    assert ids[0] not in {h.id for h in hits} and len(hits) == 2


def test_cli_stats_and_delete(search_service, ingested):
    run = imgsearch(search_service.address, "stats")
    total = len(LABELS) * EVAL_PER_LABEL
    assert run.returncode == 0 and f"collection images: {total} images" in run.stdout, run.stdout
    run = imgsearch(search_service.address, "delete", "f" * 64)
    assert run.returncode == 0 and "deleted 0" in run.stdout and "not found: " + "f" * 64 in run.stdout


@LITE_ONLY
def test_cli_ingest_reports_a_file_it_cannot_send_alone(search_service, eval_images, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    good = find_images(eval_images)[:2]
    for path in good:
        (folder / path.name.replace(".JPEG", f"-{path.parent.name}.jpg")).write_bytes(path.read_bytes())
    (folder / "broken.jpg").write_bytes(b"not an image")
    (folder / "huge.png").write_bytes(bytes(65 << 20))  # over the 64 MiB message limit
    run = imgsearch(search_service.address, "--collection", "cli_mixed", "ingest", str(folder), "--quiet")
    assert run.returncode == 1
    assert "4 images: 2 inserted, 0 already present, 2 failed" in run.stdout, run.stdout
    assert "huge.png: 68157440 bytes, above the 67043328-byte message limit" in run.stdout
    assert "broken.jpg: not a recognised image format" in run.stdout


@pytest.fixture(scope="module")
def one_per_batch(embedder_service, tmp_path_factory):
    """A search service that writes every ingest item as a batch of its own."""
    service = start_search(tmp_path_factory.mktemp("one-per-batch"), embedder_service.address,
                           "--ingest-batch", "1").wait_ready()
    yield service
    assert service.stop() == 0, service.log()


def test_repeats_across_pipelined_batches(one_per_batch):
    """Ingest embeds batch n+1 while batch n is written. With one item per
    batch, a repeat of the previous item is checked while that item's write
    is still in flight: it must come back ALREADY_PRESENT, in stream order,
    and leave one row."""
    with SearchClient(one_per_batch.address, timeout_s=60) as client:
        a, b = photo(40), photo(41)
        items = [IngestItem(image, f"item-{i}") for i, image in enumerate([a, a, b, a, b, b])]
        results = list(client.ingest(items, collection="pipelined"))
        assert [r.index for r in results] == list(range(len(items)))
        assert [r.status.name for r in results] == [
            "INSERTED", "ALREADY_PRESENT", "INSERTED", "ALREADY_PRESENT", "ALREADY_PRESENT",
            "ALREADY_PRESENT"]
        assert client.stats("pipelined").count == 2


def test_a_broken_stream_still_acknowledges_what_was_written(one_per_batch):
    """The stream breaks while a write is in flight: that write's items are
    acknowledged before INVALID_ARGUMENT, so a client knows they are stored."""
    good = [search_pb2.IngestRequest(collection="" if i else "broken", items=[
        search_pb2.IngestItem(image=photo(50 + i), uri=f"ok-{i}")]).SerializeToString()
        for i in range(2)]
    bad = b"\x12\x04" + b"\x12\x02\xff\xfe"  # an item whose uri is not UTF-8: unparseable
    results = []
    with grpc.insecure_channel(one_per_batch.address) as channel:
        ingest = channel.stream_stream("/imagesearch.v1.ImageSearchService/Ingest",
                                       request_serializer=lambda raw: raw,
                                       response_deserializer=search_pb2.IngestResponse.FromString)
        with pytest.raises(grpc.RpcError) as error:
            for response in ingest(iter([*good, bad]), timeout=30):
                results.extend(response.results)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [(r.uri, search_pb2.IngestResult.Status.Name(r.status)) for r in results] == [
        ("ok-0", "STATUS_INSERTED"), ("ok-1", "STATUS_INSERTED")]  # raw messages here
    with SearchClient(one_per_batch.address, timeout_s=60) as client:
        assert client.stats("broken").count == 2


def test_cli_search_right_after_cli_ingest_sees_it(search_service, tmp_path):
    """Two CLI processes: the search passes the token the ingest left, so
    on a Milvus server too it sees the image at once."""
    folder = tmp_path / "fresh"
    folder.mkdir()
    (folder / "new.jpg").write_bytes(photo(900))
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
    run = imgsearch(search_service.address, "--collection", "cli_fresh", "ingest", str(folder),
                    "--quiet", env=env)
    assert run.returncode == 0, run.stderr
    run = imgsearch(search_service.address, "--collection", "cli_fresh", "search", "--image",
                    str(folder / "new.jpg"), "-k", "1", "--json", env=env)
    assert run.returncode == 0, run.stderr
    assert [hit["uri"] for hit in json.loads(run.stdout)] == [str(folder / "new.jpg")]


def test_a_caller_that_waits_for_each_acknowledgement_gets_it(search_service):
    """The stream stays open and the next item is sent only after the last
    one's result came: each result must come without more input (before,
    it waited for the next item or the end of the stream)."""
    outbox: queue.Queue = queue.Queue()
    with grpc.insecure_channel(search_service.address) as channel:
        responses = search_pb2_grpc.ImageSearchServiceStub(channel).Ingest(
            iter(outbox.get, None), timeout=60)
        for n in range(3):
            outbox.put(search_pb2.IngestRequest(
                collection="" if n else "one_by_one",
                items=[search_pb2.IngestItem(image=photo(950 + n), uri=str(n))]))
            response = next(responses)
            assert [(r.index, r.status) for r in response.results] == [(n, IngestResult.STATUS_INSERTED)]
        outbox.put(None)
        assert list(responses) == []


def test_cli_escapes_control_characters_that_other_callers_stored(search_service, tmp_path):
    """A uri with a terminal title sequence and a line break (here a file
    name: ingest stores the path) is printed escaped: no raw escape, no
    fake result line."""
    folder = tmp_path / "evil"
    folder.mkdir()
    image = folder / "x\x1b]0;pwned\x07\n  1  0.9999  000000000000  fake.jpg"
    image.write_bytes(photo(960))
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
    run = imgsearch(search_service.address, "--collection", "evil", "ingest", str(folder),
                    "--quiet", env=env)
    assert run.returncode == 0, run.stderr
    run = imgsearch(search_service.address, "--collection", "evil", "search", "--image",
                    str(image), "-k", "1", env=env)
    assert run.returncode == 0, run.stderr
    assert "\x1b" not in run.stdout and "\x07" not in run.stdout
    assert len(run.stdout.splitlines()) == 1
    assert "x\\x1b]0;pwned\\x07\\n  1  0.9999" in run.stdout


def test_async_twins_make_the_same_calls(search_service, embedder_service, embedder):
    """AsyncSearchClient and AsyncEmbedderClient, for callers in asyncio
    services: the same results (read-your-writes through the token, on
    either backend) and the same typed errors as the blocking clients."""
    from imagesearch import errors
    from imagesearch.client import AsyncEmbedderClient, AsyncSearchClient

    async def run():
        async with AsyncSearchClient(search_service.address) as client:
            results = [r async for r in client.ingest(
                [IngestItem(photo(7100), "async-0"), IngestItem(photo(7101), "async-1")],
                collection="async_twins")]
            assert [r.status for r in results] == [IngestResult.STATUS_INSERTED] * 2
            hits = await client.search_image(photo(7101), 1, "async_twins")
            assert hits[0].uri == "async-1"
            assert (await client.stats("async_twins")).count == 2
            gone = await client.delete([results[0].id, "0" * 64], "async_twins")
            assert (gone.deleted, gone.missing) == (1, ["0" * 64])
            assert (await client.stats("async_twins")).count == 1
            with pytest.raises(errors.NotFound):
                await client.stats("no_such_collection")
        async with AsyncEmbedderClient(embedder_service.address) as client:
            vectors = await client.encode_texts(["a red circle"])
            info = await client.model_info()
        return vectors, info
    vectors, info = asyncio.run(run())
    np.testing.assert_allclose(vectors, embedder.encode_texts(["a red circle"]), atol=1e-5)
    assert info == embedder.model_info()
