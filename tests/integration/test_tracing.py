"""OpenTelemetry tracing, switched on by environment variables: one trace
runs from the search service into the embedder. The spans are exported over
OTLP/gRPC to a real collector endpoint that this test serves itself."""
from __future__ import annotations

import threading
from concurrent import futures

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from imagesearch.client import SearchClient
from tests.services import eventually, start_embedder, start_search


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: list[tuple[str, object]] = []  # (service.name, span)
        self._lock = threading.Lock()

    def Export(self, request, context):
        with self._lock:
            for resource_spans in request.resource_spans:
                attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                for scope in resource_spans.scope_spans:
                    self.spans += [(attributes.get("service.name"), span) for span in scope.spans]
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture
def collector():
    servicer = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"http://127.0.0.1:{port}"
    server.stop(0)


def test_one_trace_from_search_into_the_embedder(collector, tmp_path):
    spans, endpoint = collector
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_EXPORTER_OTLP_INSECURE": "true",
           "OTEL_BSP_SCHEDULE_DELAY": "100"}
    embedder = start_embedder(tmp_path, env=env).wait_ready()
    search = start_search(tmp_path, embedder.address, env=env).wait_ready()
    try:
        with SearchClient(search.address) as client:
            client.search_text("a photo of a red circle", top_k=1)
        wanted = [("imagesearch-search", "imagesearch.v1.ImageSearchService/SearchByText"),
                  ("imagesearch-search", "imagesearch.v1.EmbedderService/EncodeText"),
                  ("imagesearch-embedder", "imagesearch.v1.EmbedderService/EncodeText")]

        def named() -> dict:
            return {(service, span.name): span for service, span in list(spans.spans)}
        eventually(lambda: all(key in named() for key in wanted), 10)  # spans arrive in batches
        server, client_call, remote = (named()[key] for key in wanted)
        assert server.trace_id == client_call.trace_id == remote.trace_id
        assert client_call.parent_span_id == server.span_id
        assert remote.parent_span_id == client_call.span_id  # continued from the metadata
        assert {a.key: a.value.string_value for a in remote.attributes}["rpc.grpc.status_code"] == "OK"
    finally:
        assert search.stop() == 0 and embedder.stop() == 0


def test_tracing_is_off_by_default(embedder_service):
    assert "tracing on" not in embedder_service.log()
