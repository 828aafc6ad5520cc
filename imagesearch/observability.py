"""What operators see of a server: per-RPC metrics, request ids, logs.

Every RPC passes through `RpcInterceptor`, which
- takes the caller's `x-request-id` metadata (or makes one), keeps it in a
  context variable for the logs and for calls to other services, and sends
  it back as trailing metadata;
- counts the call and times it, by method and status code, for Prometheus
  (`grpc_server_handled_total`, `grpc_server_handling_seconds`), except
  health checks: probes every few seconds, and Watch streams that last for
  hours, would drown the API's own figures;
- logs calls that end in a server-side error status (and, at debug level,
  every call);
- parses the request itself, after authentication (security.py hands it a
  refusal that takes raw bytes), so an unauthenticated call is
  UNAUTHENTICATED whatever its bytes, and a malformed one INVALID_ARGUMENT,
  counted and logged (one line, at most one a second) like any other.
"""
from __future__ import annotations

import asyncio
import importlib.metadata
import contextvars
import inspect
import json
import logging
import time
import uuid

import grpc
from prometheus_client import Counter, Histogram, Info, start_http_server

from imagesearch.flags import exit_startup
from imagesearch.handlers import rebuild

log = logging.getLogger(__name__)

REQUEST_ID_KEY = "x-request-id"
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

HANDLED = Counter("grpc_server_handled_total", "RPCs completed, by method and status code",
                  ["grpc_service", "grpc_method", "grpc_code"])
HANDLING = Histogram("grpc_server_handling_seconds", "RPC latency, by method and status code",
                     ["grpc_service", "grpc_method", "grpc_code"],
                     buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
BUILD = Info("imagesearch_build", "What runs: the imagesearch version and which server")
_HEALTH = "grpc.health.v1.Health"
# Statuses that point at the server or a dependency, not at the caller's request.
_SERVER_SIDE = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.DATA_LOSS, grpc.StatusCode.UNIMPLEMENTED}


def outgoing_metadata() -> tuple[tuple[str, str], ...]:
    """Metadata that carries the current request id to another service (the
    trace context, when tracing is on, is added by tracing's interceptors)."""
    return ((REQUEST_ID_KEY, request_id.get()),)


def _code(context: grpc.aio.ServicerContext, exc: BaseException | None) -> grpc.StatusCode:
    code = context.code()  # set by abort() or set_code()
    if isinstance(code, grpc.StatusCode):
        return code
    if exc is None:
        return grpc.StatusCode.OK
    if isinstance(exc, asyncio.CancelledError):  # gRPC cancels a call whose deadline passed
        remaining = context.time_remaining()
        expired = remaining is not None and remaining <= 0
        return grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


class _Call:
    """One RPC's request id, clock and outcome."""

    def __init__(self, method: str, metadata) -> None:
        self.service, _, self.method = method.lstrip("/").rpartition("/")
        self.metadata = dict(metadata or ())
        self.rid = self.metadata.get(REQUEST_ID_KEY) or uuid.uuid4().hex
        self.started = time.perf_counter()

    def begin(self, context: grpc.aio.ServicerContext) -> contextvars.Token:
        context.set_trailing_metadata(((REQUEST_ID_KEY, self.rid),))
        return request_id.set(self.rid)

    def end(self, context: grpc.aio.ServicerContext, exc: BaseException | None,
            token: contextvars.Token) -> None:
        code = _code(context, exc)
        seconds = time.perf_counter() - self.started
        if self.service != _HEALTH:
            HANDLED.labels(self.service, self.method, code.name).inc()
            HANDLING.labels(self.service, self.method, code.name).observe(seconds)
        if code in _SERVER_SIDE:
            log.warning("%s %s after %.1f ms: %s", self.method, code.name, 1000 * seconds,
                        context.details() or exc or "")
        else:
            log.debug("%s %s in %.1f ms", self.method, code.name, 1000 * seconds)
        request_id.reset(token)


class MalformedRequest(ValueError):
    """Request bytes that are not the method's request message."""


class _Throttled:
    """A warning at most every `interval_s`; the ones in between are counted."""

    def __init__(self, interval_s: float = 1.0) -> None:
        self._interval_s, self._next, self._skipped = interval_s, 0.0, 0

    def warning(self, message: str) -> None:
        now = time.monotonic()
        if now < self._next:
            self._skipped += 1
            return
        more = f" (and {self._skipped} more since the last such line)" if self._skipped else ""
        log.warning("%s%s", message, more)
        self._next, self._skipped = now + self._interval_s, 0


_MALFORMED = _Throttled()


def _parser(deserializer):
    def parse(raw: bytes):
        try:
            return deserializer(raw)
        except Exception as exc:  # noqa: BLE001 - DecodeError, or a string field not UTF-8
            raise MalformedRequest(f"the request is not a valid message of this method: "
                                   f"{exc}") from None
    return parse


async def _parsed_stream(requests, parse):
    """The parsed messages of a stream, holding none while the next is
    awaited (they may be large; the handler lets each go once read)."""
    async for raw in requests:
        message, raw = parse(raw), None
        yield message
        message = None


async def _request(request, parse, streaming: bool, context):
    """The parsed request (or stream of them); INVALID_ARGUMENT when it is not one."""
    if parse is None:  # a refusal: the bytes are never looked at
        return request
    if streaming:
        return _parsed_stream(request, parse)
    try:
        return parse(request)
    except MalformedRequest as exc:
        _MALFORMED.warning(f"malformed request refused: {exc}")
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))


def _wrap(behavior, call_info, parse, streaming: bool):
    if inspect.isasyncgenfunction(behavior):
        async def stream(request, context):
            call, exc = _Call(*call_info), None
            token = call.begin(context)
            try:
                request = await _request(request, parse, streaming, context)
                async for response in behavior(request, context):
                    yield response
            except BaseException as e:
                exc = e
                raise
            finally:
                call.end(context, exc, token)
        return stream

    async def unary(request, context):
        call, exc = _Call(*call_info), None
        token = call.begin(context)
        try:
            request = await _request(request, parse, streaming, context)
            return await behavior(request, context)
        except BaseException as e:
            exc = e
            raise
        finally:
            call.end(context, exc, token)
    return unary


class RpcInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        info = (handler_call_details.method, handler_call_details.invocation_metadata)
        parse = _parser(handler.request_deserializer) if handler.request_deserializer else None
        return rebuild(handler, lambda behavior: _wrap(behavior, info, parse,
                                                       handler.request_streaming), raw=True)


def package_version() -> str:
    try:
        return importlib.metadata.version("imagesearch")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout, not installed
        return "unknown"


def start_metrics(port: int, host: str, server: str) -> None:
    """Serve Prometheus metrics on http://HOST:PORT/metrics (port 0: off)."""
    BUILD.info({"version": package_version(), "server": server})
    if port:
        try:
            start_http_server(port, addr=host)
        except OSError as exc:
            exit_startup(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}; "
                         "pick another --metrics-port, or 0 to turn metrics off")
        log.info("metrics on http://%s:%d/metrics", host, port)


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
                 "request_id": getattr(record, "request_id", "-"), "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(level: str, fmt: str = "text") -> None:
    """Text or one JSON object per line, each record with its request id."""
    handler = logging.StreamHandler()
    handler.addFilter(_RequestIdFilter())
    handler.setFormatter(_JsonFormatter() if fmt == "json" else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    logging.getLogger("faiss").setLevel(logging.WARNING)  # Milvus Lite's loader chatter
