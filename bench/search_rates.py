"""SearchByText end to end at fixed request rates, against a large collection
on a real Milvus server: client -> search service -> embedder -> Milvus.

    python -m bench.search_rates --vectors 100000 --rates 5 10 20 40 80
    python -m bench.search_rates --model tests/fixtures/shapes-clip --vectors 100000 \
        --rates 10 20 --consistency bounded old-token fresh-token

Starts a Milvus 2.3.5 standalone server (PyPI `milvus`), an embedder with a
random-weight CLIP ViT-B/32 (bench/random_clip.py) or `--model`, and a search service;
creates the collection through the service (one real ingest), bulk-loads
`--vectors` random unit vectors straight into it, flushes, waits for the HNSW
index, then sends text queries open-loop (a fixed schedule, whatever the
answers do) at each rate for `--seconds`, in each `--consistency` mode:

- bounded: no token (what every other caller pays);
- old-token: the token of the seed ingest, minutes old (a writer's later searches);
- fresh-token: a token at most 50 ms old, taken from Milvus's clock by a
  background thread (a search right after its own write: the worst case,
  as every search paid under Strong consistency before tokens).

Prints JSON per rate and mode: p50/p99 latency, errors by status, and the
highest rate held with zero errors.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np

from bench.photos import make_jpegs
from bench.random_clip import write as write_random_clip
from bench.report import emit
from imagesearch.client import IngestItem, SearchClient
from imagesearch.v1 import search_pb2, search_pb2_grpc

COLLECTION = "bench"
QUERIES = [f"a photo of a {c} {s}" for c in ("red", "white", "black", "blue", "green", "brown")
           for s in ("dog", "cat", "car", "house", "tree", "boat")]


def bulk_load(uri: str, dim: int, count: int, chunk: int = 5000) -> float:
    """Insert `count` random unit vectors; seconds taken, flush included."""
    from search_service.store import MilvusStore, Row

    store = MilvusStore(uri, timeout_s=120)
    rng = np.random.default_rng(0)
    started = time.monotonic()
    for first in range(0, count, chunk):
        vectors = rng.standard_normal((min(chunk, count - first), dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        store.write(COLLECTION, [Row(id=hashlib.sha256(f"synthetic-{first + i}".encode()).hexdigest(),
                                     vector=v.tolist(), uri=f"synthetic/{first + i}", metadata={})
                                 for i, v in enumerate(vectors)])
    store.connect().flush(COLLECTION)
    return time.monotonic() - started


def wait_indexed(uri: str, rows: int, timeout_s: float = 1800) -> float:
    """Seconds until the vector index covers `rows` rows. Only indexed_rows
    counts: on 2.3.5 pending_index_rows stays high for many minutes at 1M
    rows while compaction merges segments and indexes them again, though
    every row is already searchable through an index."""
    from pymilvus import MilvusClient

    client = MilvusClient(uri=uri)
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        index = client.describe_index(COLLECTION, "vector")
        if int(index.get("indexed_rows", 0)) >= rows:
            return time.monotonic() - started
        time.sleep(2)
    raise TimeoutError(f"index not built after {timeout_s} s: {index}")


class FreshTokens:
    """A consistency token from Milvus's clock, renewed every 50 ms."""

    def __init__(self, uri: str) -> None:
        from pymilvus import MilvusClient
        from search_service.consistency import encode
        self._client, self._encode = MilvusClient(uri=uri), encode
        self.token = b""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.token = self._encode(self._client._get_connection().alloc_timestamp())

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._client.close()


async def open_loop(address: str, rate: float, seconds: float, timeout_s: float = 5.0,
                    token=lambda: b"") -> dict:
    """Send SearchByText at `rate` per second for `seconds`, each with the
    consistency token `token()`; latency of each."""
    latencies: list[float] = []
    codes: Counter = Counter()
    async with grpc.aio.insecure_channel(address) as channel:
        stub = search_pb2_grpc.ImageSearchServiceStub(channel)

        async def one(i: int) -> None:
            started = time.perf_counter()
            try:
                await stub.SearchByText(search_pb2.SearchByTextRequest(
                    query=QUERIES[i % len(QUERIES)], top_k=10, collection=COLLECTION,
                    consistency_token=token()), timeout=timeout_s)
                codes["OK"] += 1
                latencies.append(time.perf_counter() - started)
            except grpc.aio.AioRpcError as exc:
                codes[exc.code().name] += 1

        loop = asyncio.get_running_loop()
        begin = loop.time()
        tasks = []
        for i in range(int(rate * seconds)):
            delay = begin + i / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
    ms = np.array(latencies) * 1000
    return {"rate_per_s": rate, "sent": len(tasks), "codes": dict(codes),
            "errors": sum(v for k, v in codes.items() if k != "OK"),
            "p50_ms": round(float(np.percentile(ms, 50)), 1) if len(ms) else None,
            "p99_ms": round(float(np.percentile(ms, 99)), 1) if len(ms) else None}


_STAGES = {  # stage -> (which service, metric, labels)
    "search_service_SearchByText": ("search", "grpc_server_handling_seconds",
                                    {"grpc_method": "SearchByText", "grpc_code": "OK"}),
    "milvus_search_call": ("search", "search_milvus_call_seconds",
                           {"operation": "search", "outcome": "ok"}),
    "embedder_EncodeText": ("embedder", "grpc_server_handling_seconds",
                            {"grpc_method": "EncodeText", "grpc_code": "OK"}),
}


def totals(services: dict) -> dict[str, tuple[float, float]]:
    """(seconds, calls) so far per stage, from both services' metrics."""
    from bench.harness import metric, scrape_url
    samples = {name: scrape_url(service.metrics_url) for name, service in services.items()}
    return {stage: (metric(samples[where], f"{name}_sum", **labels),
                    metric(samples[where], f"{name}_count", **labels))
            for stage, (where, name, labels) in _STAGES.items()}


def profile(before: dict, after: dict) -> dict:
    """Mean milliseconds per call of each stage between two `totals`."""
    return {stage: round(1000 * (after[stage][0] - before[stage][0])
                         / (after[stage][1] - before[stage][1]), 1)
            if after[stage][1] > before[stage][1] else None for stage in _STAGES}


def main() -> None:
    from bench.harness import MilvusServer, start_embedder, start_search

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vectors", type=int, default=100_000)
    p.add_argument("--rates", type=float, nargs="+", default=[5, 10, 20, 40, 80])
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--torch-threads", default="2")
    p.add_argument("--model", default="",
                   help="checkpoint for the embedder (default: a random-weight ViT-B/32)")
    p.add_argument("--consistency", nargs="+", default=["bounded"],
                   choices=["bounded", "old-token", "fresh-token"])
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args()
    result: dict = {"vectors": args.vectors, "seconds_per_rate": args.seconds}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "milvus").mkdir()
        milvus = MilvusServer(tmp / "milvus").wait_ready()
        model = args.model or write_random_clip(tmp / "vit-b-32-random")
        embedder = start_embedder(tmp, "--model", str(model), "--torch-threads", args.torch_threads)
        search = None
        try:
            embedder.wait_ready(600)
            search = start_search(tmp, embedder.address, "--milvus-uri", milvus.uri).wait_ready()
            with SearchClient(search.address) as client:
                list(client.ingest([IngestItem(make_jpegs(1)[0], "seed")], collection=COLLECTION))
                dim = client.stats(COLLECTION).model.dim
                old_token = client.consistency_token
            result["load_s"] = round(bulk_load(milvus.uri, dim, args.vectors), 1)
            result["index_wait_s"] = round(wait_indexed(milvus.uri, args.vectors), 1)
            with SearchClient(search.address) as client:
                result["count"] = client.stats(COLLECTION).count
            asyncio.run(open_loop(search.address, 2, 5))  # warm-up
            fresh = FreshTokens(milvus.uri)
            tokens = {"bounded": lambda: b"", "old-token": lambda: old_token,
                      "fresh-token": lambda: fresh.token}
            result["rates"] = []
            try:
                services = {"search": search, "embedder": embedder}
                for mode in args.consistency:
                    before = totals(services)
                    for rate in args.rates:
                        run = {"consistency": mode, **asyncio.run(open_loop(
                            search.address, rate, args.seconds, token=tokens[mode]))}
                        result["rates"].append(run)
                        print(json.dumps(run), flush=True)
                        if run["errors"]:
                            break
                    result.setdefault("profile_mean_ms", {})[mode] = profile(before, totals(services))
            finally:
                fresh.close()
            held = [r["rate_per_s"] for r in result["rates"] if r["errors"] == 0]
            result["highest_rate_with_zero_errors"] = max(held) if held else None
        finally:
            if search:
                search.stop()
            embedder.stop()
            milvus.stop()
    emit(result, args.out)


if __name__ == "__main__":
    main()
