"""What operators rely on, against real processes: health transitions,
reflection, Prometheus metrics after known traffic, request ids across
services, and round-robin over several embedder replicas."""
from __future__ import annotations

import queue
import re
import signal
import threading

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import \
    ProtoReflectionDescriptorDatabase

from imagesearch.client import IngestItem, SearchClient
from imagesearch.health import status
from imagesearch.serving import DEPENDENCIES, LIVENESS
from imagesearch.v1 import search_pb2, search_pb2_grpc
from tests.services import (eventually, metric, photo, scrape, start_embedder, start_search,
                            status_of)


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    """Three embedder processes, logging each RPC with its request id."""
    tmp = tmp_path_factory.mktemp("replicas")
    services = [start_embedder(tmp, "--log-level", "debug") for _ in range(3)]
    for service in services:
        service.wait_ready()
    yield services
    for service in services:
        service.stop()


def test_round_robin_over_three_embedders_and_one_killed(replicas, tmp_path):
    target = "ipv4:" + ",".join(s.address for s in replicas)
    search = start_search(tmp_path, target).wait_ready()
    try:
        before = [metric(scrape(s), "grpc_server_handled_total", grpc_method="EncodeText")
                  for s in replicas]
        with SearchClient(search.address, timeout_s=30) as client:
            for i in range(60):
                client.search_text(f"a photo of a red circle {i}", top_k=1)
            calls = [metric(scrape(s), "grpc_server_handled_total", grpc_method="EncodeText") - b
                     for s, b in zip(replicas, before)]
            assert sum(calls) == 60
            assert all(c >= 0.2 * 60 for c in calls), calls

            replicas[0].process.send_signal(signal.SIGKILL)
            replicas[0].process.wait()
            for i in range(30):  # every one succeeds: the dead replica is skipped or retried
                client.search_text(f"a photo of a blue square {i}", top_k=1)
    finally:
        assert search.stop() == 0


def test_request_id_travels_from_search_to_embedder(replicas, tmp_path):
    live = [s for s in replicas if s.process.poll() is None]
    search = start_search(tmp_path, "ipv4:" + ",".join(s.address for s in live)).wait_ready()
    try:
        with grpc.insecure_channel(search.address) as channel:
            stub = search_pb2_grpc.ImageSearchServiceStub(channel)
            _, call = stub.SearchByText.with_call(
                search_pb2.SearchByTextRequest(query="a red circle", top_k=1),
                metadata=(("x-request-id", "req-4711"),), timeout=30)
            assert ("x-request-id", "req-4711") in call.trailing_metadata()
            _, call = stub.SearchByText.with_call(
                search_pb2.SearchByTextRequest(query="a red circle", top_k=1), timeout=30)
            made = dict(call.trailing_metadata())["x-request-id"]
            assert re.fullmatch(r"[0-9a-f]{32}", made)  # one is made when the caller sends none
        # a log line is announced by nothing else
        eventually(lambda: any("[req-4711]: EncodeText OK" in s.log() for s in live), 5)
    finally:
        assert search.stop() == 0


def test_metrics_after_known_traffic(embedder_service, tmp_path):
    search = start_search(tmp_path, embedder_service.address).wait_ready()
    try:
        with SearchClient(search.address, timeout_s=30) as client:
            results = list(client.ingest([IngestItem(photo(i), f"p{i}") for i in range(5)]
                                         + [IngestItem(b"not an image", "bad")], collection="metrics"))
            assert len(results) == 6
            for _ in range(3):
                client.search_text("a red circle", top_k=2, collection="metrics")
            status_of(client.search_text, "a red circle", 0)
        samples = scrape(search)
        rpc = dict(grpc_service="imagesearch.v1.ImageSearchService", grpc_method="SearchByText")
        assert metric(samples, "grpc_server_handled_total", **rpc, grpc_code="OK") == 3
        assert metric(samples, "grpc_server_handled_total", **rpc, grpc_code="INVALID_ARGUMENT") == 1
        assert metric(samples, "grpc_server_handling_seconds_count", **rpc, grpc_code="OK") == 3
        assert metric(samples, "grpc_server_handled_total", grpc_method="Ingest", grpc_code="OK") == 1
        assert metric(samples, "search_images_ingested_total", status="inserted") == 5
        assert metric(samples, "search_images_ingested_total", status="failed") == 1
        assert metric(samples, "search_milvus_call_seconds_count", operation="search", outcome="ok") == 3
        assert metric(samples, "search_milvus_call_seconds_count", operation="upsert", outcome="ok") >= 1
        assert metric(samples, "search_embedder_call_seconds_count", method="EncodeText",
                      code="OK") == 3
        assert metric(samples, "search_embedder_call_seconds_count", method="EncodeImage",
                      code="OK") >= 1
        assert metric(samples, "grpc_server_handled_total", grpc_service="grpc.health.v1.Health") == 0
        assert metric(samples, "imagesearch_build_info", server="search") == 1

        samples = scrape(embedder_service)
        assert metric(samples, "embedder_model_load_seconds") > 0
        assert metric(samples, "embedder_batch_size_count", batcher="text") >= 3
        assert metric(samples, "embedder_batch_size_sum", batcher="image") >= 5  # the bad one never reaches the model
        assert 'embedder_queue_items{batcher="image"}' in samples
        assert metric(samples, "embedder_queue_wait_seconds_count", batcher="text") >= 3
        assert metric(samples, "embedder_compute_seconds_count", batcher="image") >= 1
        assert metric(samples, "grpc_server_handled_total", grpc_method="EncodeText", grpc_code="OK") >= 3
    finally:
        assert search.stop() == 0


def test_reflection_lists_and_calls_the_services(search_service, embedder_service):
    for service, api in ((search_service, "imagesearch.v1.ImageSearchService"),
                         (embedder_service, "imagesearch.v1.EmbedderService")):
        with grpc.insecure_channel(service.address) as channel:
            database = ProtoReflectionDescriptorDatabase(channel)
            assert {api, "grpc.health.v1.Health"} <= set(database.get_services())
    # A generic client: no generated code, only what reflection tells it.
    with grpc.insecure_channel(search_service.address) as channel:
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        method = pool.FindServiceByName("imagesearch.v1.ImageSearchService").methods_by_name["GetStats"]
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        call = channel.unary_unary("/imagesearch.v1.ImageSearchService/GetStats",
                                   request_serializer=request_class.SerializeToString,
                                   response_deserializer=response_class.FromString)
        assert call(request_class(), timeout=30).collection == "images"


def test_reflection_can_be_switched_off(embedder_service, tmp_path):
    search = start_search(tmp_path, embedder_service.address, "--reflection", "false").wait_ready()
    try:
        with grpc.insecure_channel(search.address) as channel:
            with pytest.raises(grpc.RpcError) as info:
                ProtoReflectionDescriptorDatabase(channel).get_services()
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        assert search.stop() == 0


def _watch(address: str, service: str) -> tuple[list[str], threading.Thread]:
    """Follow a health name's Watch stream in a thread: every status it sends."""
    seen: list[str] = []
    ready = threading.Event()

    def follow():
        with grpc.insecure_channel(address) as channel:
            try:
                for update in health_pb2_grpc.HealthStub(channel).Watch(
                        health_pb2.HealthCheckRequest(service=service)):
                    seen.append(health_pb2.HealthCheckResponse.ServingStatus.Name(update.status))
                    ready.set()
            except grpc.RpcError:
                pass  # the server went away
    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    assert ready.wait(10), "no first Watch message"
    return seen, thread


def test_readiness_is_the_process_and_dependencies_are_reported(tmp_path):
    """Embedder killed: the search process stays SERVING (liveness and
    readiness), "dependencies" goes NOT_SERVING, GetStats and Delete still
    work, searches are UNAVAILABLE naming the embedder; with the embedder
    back, "dependencies" is SERVING again; SIGTERM ends with NOT_SERVING."""
    embedder = start_embedder(tmp_path).wait_ready()
    search = start_search(tmp_path, embedder.address).wait_ready(service=DEPENDENCIES)
    try:
        with SearchClient(search.address) as client:
            [result] = client.ingest([IngestItem(photo(5), "x")])
            dependencies, _ = _watch(search.address, DEPENDENCIES)
            embedder.process.send_signal(signal.SIGKILL)
            embedder.process.wait()
            eventually(lambda: dependencies[-1] == "NOT_SERVING", 10)
            assert status(search.address) == status(search.address, service=LIVENESS) == "SERVING"
            assert "dependency down (still serving what does not need it): embedder at" in search.log()
            assert metric(scrape(search), "search_dependency_up", dependency="embedder") == 0
            assert metric(scrape(search), "search_dependency_up", dependency="milvus") == 1
            assert client.stats().count == 1
            error = status_of(client.search_text, "a photo of a red circle")
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert f"embedder at {embedder.address} is unavailable" in error.details()
            assert client.delete([result.id]).deleted == 1

            embedder = start_embedder(tmp_path, port=embedder.port).wait_ready()
            eventually(lambda: dependencies[-1] == "SERVING", 10)
            assert client.search_text("a photo of a red circle") == []

        overall, follower = _watch(search.address, "")
        assert search.stop() == 0
        follower.join(10)
        assert overall[0] == "SERVING" and overall[-1] == "NOT_SERVING", overall
    finally:
        search.stop()
        embedder.stop()


def test_a_cancelled_ingest_is_never_unknown(embedder_service, tmp_path):
    """The caller cancels a stream after its first acknowledgement: the call
    ends CANCELLED in the metrics, or OK when the server had nothing left to
    do (gRPC then shows it the cancel as the end of the stream, and the
    race between the two is gRPC's), never UNKNOWN, with no traceback. A
    service of its own, so that no other test's streams count."""
    search = start_search(tmp_path, embedder_service.address).wait_ready()

    def counted(code: str) -> float:
        return metric(scrape(search), "grpc_server_handled_total", grpc_method="Ingest",
                      grpc_code=code)
    try:
        outbox: queue.Queue = queue.Queue()
        with grpc.insecure_channel(search.address) as channel:
            call = search_pb2_grpc.ImageSearchServiceStub(channel).Ingest(iter(outbox.get, None),
                                                                           timeout=60)
            outbox.put(search_pb2.IngestRequest(collection="cancelled", items=[
                search_pb2.IngestItem(image=photo(970), uri="first")]))
            next(call)
            call.cancel()
            outbox.put(None)  # lets gRPC's request thread finish
        eventually(lambda: counted("CANCELLED") + counted("OK") == 1, 10)
        assert counted("UNKNOWN") == 0
        assert "Traceback" not in search.log()
    finally:
        assert search.stop() == 0
