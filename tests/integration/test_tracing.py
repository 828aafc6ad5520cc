"""OpenTelemetry tracing, switched on by environment variables: one trace
runs from the search service into the embedder. The spans are exported over
OTLP/gRPC to a real collector endpoint that this test serves itself."""
from __future__ import annotations

import threading
from concurrent import futures

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from imagesearch.client import SearchClient
from tests.services import eventually, start_embedder, start_search


KIND_SERVER, KIND_CLIENT = trace_pb2.Span.SPAN_KIND_SERVER, trace_pb2.Span.SPAN_KIND_CLIENT
STATUS_ERROR = trace_pb2.Status.STATUS_CODE_ERROR


def attributes(span) -> dict:
    return {a.key: getattr(a.value, a.value.WhichOneof("value")) for a in span.attributes}


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
            with pytest.raises(grpc.RpcError):
                client.search_text("a photo", top_k=0)  # the caller's mistake
        wanted = [("imagesearch-search", "/imagesearch.v1.ImageSearchService/SearchByText", KIND_SERVER),
                  ("imagesearch-search", "/imagesearch.v1.EmbedderService/EncodeText", KIND_CLIENT),
                  ("imagesearch-embedder", "/imagesearch.v1.EmbedderService/EncodeText", KIND_SERVER)]

        def named() -> dict:  # the first span of each (service, name, kind)
            found = {}
            for service, span in list(spans.spans):
                found.setdefault((service, span.name, span.kind), []).append(span)
            return found
        # spans arrive in batches; two searches, one of them encoded
        eventually(lambda: all(key in named() for key in wanted)
                   and len(named()[wanted[0]]) == 2, 10)
        (ok, refused), [client_call], [remote] = (named()[key] for key in wanted)
        if attributes(ok)["rpc.grpc.status_code"]:
            ok, refused = refused, ok
        assert ok.trace_id == client_call.trace_id == remote.trace_id
        assert client_call.parent_span_id == ok.span_id
        assert remote.parent_span_id == client_call.span_id  # continued from the metadata
        assert attributes(remote) == {**attributes(remote), "rpc.system": "grpc",
                                      "rpc.service": "imagesearch.v1.EmbedderService",
                                      "rpc.method": "EncodeText", "rpc.grpc.status_code": 0}
        assert attributes(refused)["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert refused.status.code != STATUS_ERROR  # a client error is not the server's
        assert not any("Health" in span.name for _, span in spans.spans)
    finally:
        assert search.stop() == 0 and embedder.stop() == 0


def test_tracing_is_off_by_default(embedder_service):
    assert "tracing on" not in embedder_service.log()
