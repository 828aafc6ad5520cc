"""OpenTelemetry tracing across search -> embedder; off unless configured.

It switches on when the standard variable OTEL_EXPORTER_OTLP_ENDPOINT (or
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) is set and OTEL_SDK_DISABLED is not
"true"; spans then go over OTLP/gRPC to that endpoint, and the other OTEL_*
variables (OTEL_SERVICE_NAME, OTEL_EXPORTER_OTLP_INSECURE, OTEL_BSP_*, ...)
apply as usual. It needs the `tracing` extra: pip install 'imagesearch[tracing]'.

Every RPC gets a SERVER span, continued from the caller's `traceparent`
metadata (W3C trace context); every embedder call from the search service
gets a CLIENT span whose context travels on in the call's metadata.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

from imagesearch.flags import exit_startup

log = logging.getLogger(__name__)

_tracer = None  # set by setup() when tracing is on


def enabled_by_environment() -> bool:
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or \
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    return bool(endpoint) and os.environ.get("OTEL_SDK_DISABLED", "").lower() != "true"


def setup(service_name: str) -> None:
    """Start exporting spans if the environment asks for it."""
    global _tracer
    if not enabled_by_environment():
        return
    try:
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        exit_startup(f"OTEL_EXPORTER_OTLP_ENDPOINT is set, but OpenTelemetry is not installed "
                     f"({exc.name}): pip install 'imagesearch[tracing]', or unset it")
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name)})
    provider = TracerProvider(resource=resource)  # flushes its spans at exit
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    _tracer = trace.get_tracer("imagesearch")
    log.info("tracing on: spans go to %s", os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
             or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


@contextlib.contextmanager
def server_span(method: str, metadata: dict[str, str]) -> Iterator[object | None]:
    """A SERVER span for one RPC, child of the caller's span if it sent one."""
    if _tracer is None:
        yield None
        return
    from opentelemetry import propagate
    from opentelemetry.trace import SpanKind
    with _tracer.start_as_current_span(method, context=propagate.extract(metadata),
                                       kind=SpanKind.SERVER, record_exception=False,
                                       set_status_on_exception=False) as span:
        yield span


def finish(span: object | None, code_name: str) -> None:
    """Record the gRPC status on a span from server_span."""
    if span is not None:
        from opentelemetry.trace import Status, StatusCode
        span.set_attribute("rpc.grpc.status_code", code_name)
        if code_name != "OK":
            span.set_status(Status(StatusCode.ERROR, code_name))


@contextlib.contextmanager
def client_span(method: str) -> Iterator[None]:
    """A CLIENT span around a call to another service."""
    if _tracer is None:
        yield
        return
    from opentelemetry.trace import SpanKind
    with _tracer.start_as_current_span(method, kind=SpanKind.CLIENT):
        yield


def inject(carrier: dict[str, str]) -> None:
    """Put the current trace context into outgoing metadata."""
    if _tracer is not None:
        from opentelemetry import propagate
        propagate.inject(carrier)
