"""Locust users for both services, on the typed clients (no proto files).

    pip install '.[dev]'      # locust comes with the dev extra
    locust -f bench/locustfile.py --host localhost:50052 --embedder-host localhost:50051
    locust -f bench/locustfile.py --headless -u 20 -r 5 -t 60s --host HOST:50052 \\
        --embedder-host HOST:50051 --csv results

`--host` is the search service, `--embedder-host` the embedder (either user
class can be left out by name: `locust ... SearchUser`). Each call is one
Locust request named after its RPC; a failure is reported with its typed
error (status code and reason), so Locust's table shows why calls failed.
The images are small random JPEGs made once per user; ingested ones are new
each time, so every Ingest embeds and writes.
"""
from __future__ import annotations

import io
import itertools
import os
import time

import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()  # before any channel: gRPC must yield to gevent, as Locust's users do

import numpy as np  # noqa: E402
from locust import User, between, events, task  # noqa: E402
from PIL import Image  # noqa: E402

from imagesearch.client import EmbedderClient, IngestItem, SearchClient  # noqa: E402

QUERIES = ("a white dog", "a red circle", "a beach at sunset", "a photo of a cat")
_serial = itertools.count()


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    parser.add_argument("--embedder-host", default=os.environ.get("EMBEDDER_HOST", "localhost:50051"),
                        help="the embedder's HOST:PORT, for EmbedderUser")
    parser.add_argument("--collection", default="", help="search service collection (default: its own)")


def _jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG")
    return out.getvalue()


class _GrpcUser(User):
    abstract = True
    wait_time = between(0.05, 0.2)

    def _timed(self, name: str, call):
        """Run `call()`, reporting it to Locust as one request named `name`."""
        started, error, result = time.perf_counter(), None, None
        try:
            result = call()
        except Exception as exc:  # noqa: BLE001 - a failed request is reported, not raised
            error = exc
        self.environment.events.request.fire(
            request_type="grpc", name=name, response_time=(time.perf_counter() - started) * 1000,
            response_length=0, exception=error, context={})
        return result


class SearchUser(_GrpcUser):
    def on_start(self) -> None:
        self.client = SearchClient(self.host, timeout_s=30)
        self.collection = self.environment.parsed_options.collection
        self.image = _jpeg(next(_serial))

    def on_stop(self) -> None:
        self.client.close()

    @task(6)
    def search_by_text(self) -> None:
        query = QUERIES[next(_serial) % len(QUERIES)]
        self._timed("SearchByText", lambda: self.client.search_text(query, 10, self.collection))

    @task(2)
    def search_by_image(self) -> None:
        self._timed("SearchByImage", lambda: self.client.search_image(self.image, 10, self.collection))

    @task(1)
    def ingest(self) -> None:
        items = [IngestItem(_jpeg(1_000_000 + next(_serial)), "locust") for _ in range(4)]

        def call():
            failed = [r.error for r in self.client.ingest(items, self.collection) if r.error]
            if failed:
                raise RuntimeError(f"{len(failed)} of {len(items)} items failed: {failed[0]}")
        self._timed("Ingest", call)

    @task(1)
    def stats(self) -> None:
        self._timed("GetStats", lambda: self.client.stats(self.collection))


class EmbedderUser(_GrpcUser):
    def on_start(self) -> None:
        self.client = EmbedderClient(self.environment.parsed_options.embedder_host, timeout_s=30)
        self.image = _jpeg(next(_serial))

    def on_stop(self) -> None:
        self.client.close()

    @task(3)
    def encode_text(self) -> None:
        self._timed("EncodeText", lambda: self.client.encode_texts([QUERIES[0]]))

    @task(1)
    def encode_image(self) -> None:
        self._timed("EncodeImage", lambda: self.client.encode_images([self.image]))
