"""OpenTelemetry tracing across search -> embedder; off unless configured.

It switches on when the standard variable OTEL_EXPORTER_OTLP_ENDPOINT (or
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) is set and OTEL_SDK_DISABLED is not
"true"; spans then go over OTLP/gRPC to that endpoint, and the other OTEL_*
variables (OTEL_SERVICE_NAME, OTEL_EXPORTER_OTLP_INSECURE, OTEL_BSP_*, ...)
apply as usual. It needs the `tracing` extra: pip install 'imagesearch[tracing]'.

The spans come from opentelemetry-instrumentation-grpc, so they follow
OpenTelemetry's RPC conventions (rpc.system, rpc.service, rpc.method,
rpc.grpc.status_code; a server span is an error only for server-side
codes, never for the caller's INVALID_ARGUMENT): a SERVER span per RPC,
continued from the caller's `traceparent` metadata, and a CLIENT span per
call to another service, whose context travels on in that call's metadata.
Health checks make no spans.
"""
from __future__ import annotations

import importlib
import logging
import os

from imagesearch.flags import exit_startup

log = logging.getLogger(__name__)

_on = False  # set by setup() when the environment asks for tracing


def enabled_by_environment() -> bool:
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or \
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    return bool(endpoint) and os.environ.get("OTEL_SDK_DISABLED", "").lower() != "true"


def setup(service_name: str) -> None:
    """Start exporting spans if the environment asks for it."""
    global _on
    if not enabled_by_environment():
        return
    try:
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        importlib.import_module("opentelemetry.instrumentation.grpc")  # missing: fail now
    except ImportError as exc:
        exit_startup(f"OTEL_EXPORTER_OTLP_ENDPOINT is set, but OpenTelemetry is not installed "
                     f"({exc.name}): pip install 'imagesearch[tracing]', or unset it")
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name)})
    provider = TracerProvider(resource=resource)  # flushes its spans at exit
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    _on = True
    log.info("tracing on: spans go to %s", os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
             or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def _not_health():
    from opentelemetry.instrumentation.grpc import filters
    return filters.negate(filters.health_check())


def server_interceptors() -> list:
    """For grpc.aio.server(interceptors=...): first, so its span covers the rest."""
    if not _on:
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor
    return [aio_server_interceptor(filter_=_not_health())]


def client_interceptors() -> list:
    """For a grpc.aio channel to another service of ours."""
    if not _on:
        return []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors
    return aio_client_interceptors(filter_=_not_health())
