"""gRPC load generator for both services.

    python -m bench.loadgen --target EncodeImage --server localhost:50051 \
        --concurrency 32 --batch 16 --duration 20

Runs `concurrency` closed-loop asyncio clients (split over `--procs`
processes, so the client is not the bottleneck), each sending requests of
`batch` items back to back, and prints JSON: throughput (requests and items
per second), p50/p95/p99 latency in ms, and errors by status code.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import multiprocessing
import time
from collections import Counter

import grpc
import numpy as np

from bench.photos import make_jpegs, unique
from imagesearch.channels import channel_options
from imagesearch.v1 import embedder_pb2, embedder_pb2_grpc, search_pb2, search_pb2_grpc

TARGETS = ("EncodeText", "EncodeImage", "SearchByText", "Ingest")
QUERIES = [f"a photo of a {c} {s}" for c in ("red", "white", "black", "blue", "green", "brown")
           for s in ("dog", "cat", "car", "house", "tree", "boat")]


def _caller(target: str, channel: grpc.aio.Channel, batch: int, jpegs: list[bytes], worker: int):
    """An async function sending one request of `batch` items per call."""
    counter = itertools.count()
    if target == "EncodeText":
        stub = embedder_pb2_grpc.EmbedderServiceStub(channel)
        return lambda: stub.EncodeText(embedder_pb2.EncodeTextRequest(
            texts=[QUERIES[next(counter) % len(QUERIES)] for _ in range(batch)]))
    if target == "EncodeImage":
        stub = embedder_pb2_grpc.EmbedderServiceStub(channel)
        return lambda: stub.EncodeImage(embedder_pb2.EncodeImageRequest(
            images=[jpegs[next(counter) % len(jpegs)] for _ in range(batch)]))
    stub = search_pb2_grpc.ImageSearchServiceStub(channel)
    if target == "SearchByText":
        return lambda: stub.SearchByText(search_pb2.SearchByTextRequest(
            query=QUERIES[next(counter) % len(QUERIES)], top_k=10))

    async def ingest():  # every item new: a fresh id, so each one is embedded and written
        request = search_pb2.IngestRequest(items=[
            search_pb2.IngestItem(image=unique(jpegs[n % len(jpegs)], worker << 32 | n))
            for n in (next(counter) for _ in range(batch))])
        results = [r async for response in stub.Ingest(iter([request])) for r in response.results]
        failed = [r.error for r in results if r.status == search_pb2.IngestResult.STATUS_FAILED]
        if failed:
            raise RuntimeError(failed[0])
    return ingest


async def _load(target, server, concurrency, batch, duration_s, max_requests, jpegs, first_worker):
    latencies, errors = [], Counter()
    channels = [grpc.aio.insecure_channel(server, options=channel_options(256 << 20))
                for _ in range(max(1, min(concurrency, 8)))]
    budget = itertools.count()
    stop_at = time.perf_counter() + duration_s

    async def client(worker: int) -> None:
        call = _caller(target, channels[worker % len(channels)], batch, jpegs, first_worker + worker)
        while time.perf_counter() < stop_at and next(budget) < max_requests:
            started = time.perf_counter()
            try:
                await call()
                latencies.append(time.perf_counter() - started)
            except grpc.aio.AioRpcError as exc:
                errors[exc.code().name] += 1
            except RuntimeError:
                errors["ITEM_FAILED"] += 1

    started = time.perf_counter()
    await asyncio.gather(*(client(w) for w in range(concurrency)))
    elapsed = time.perf_counter() - started
    for channel in channels:
        await channel.close()
    return latencies, dict(errors), elapsed


def _proc(args):
    return asyncio.run(_load(*args))


def run(target: str, server: str, concurrency: int = 1, batch: int = 1, duration_s: float = 10,
        max_requests: int = 10**9, procs: int = 1, jpegs: list[bytes] | None = None,
        warmup_s: float = 1.0) -> dict:
    """One load run; returns the JSON-ready result."""
    if target in ("EncodeImage", "Ingest") and jpegs is None:
        jpegs = make_jpegs(64)
    if warmup_s > 0:
        asyncio.run(_load(target, server, concurrency, batch, warmup_s, 10**9, jpegs or [], 10**6))
    procs = max(1, min(procs, concurrency))
    share = split(concurrency, procs)
    firsts = np.cumsum([0, *share[:-1]]).tolist()
    jobs = [(target, server, n, batch, duration_s, max_requests // procs, jpegs or [], first)
            for n, first in zip(share, firsts)]
    return {"target": target, **summarize(in_processes(_proc, jobs), concurrency, batch)}


def split(concurrency: int, procs: int) -> list[int]:
    """Clients per load process: `concurrency` shared as evenly as can be."""
    return [concurrency // procs + (i < concurrency % procs) for i in range(procs)]


def in_processes(proc, jobs: list[tuple]) -> list[tuple]:
    """`proc(job)` for each job, each in a process of its own when there are
    several (one client process is bound by its own interpreter lock)."""
    if len(jobs) == 1:
        return [proc(jobs[0])]
    with multiprocessing.get_context("spawn").Pool(len(jobs)) as pool:
        return pool.map(proc, jobs)


def summarize(outcomes: list[tuple], concurrency: int, batch: int) -> dict:
    """The JSON-ready result of load processes' (latencies, error codes, seconds)."""
    latencies = np.array([lat for o in outcomes for lat in o[0]]) * 1000
    errors = sum((Counter(o[1]) for o in outcomes), Counter())
    elapsed = max(o[2] for o in outcomes)
    done = len(latencies)
    pct = (lambda q: round(float(np.percentile(latencies, q)), 3)) if done else (lambda q: None)
    return {"concurrency": concurrency, "batch": batch, "procs": len(outcomes),
            "requests": done, "errors": dict(errors), "seconds": round(elapsed, 3),
            "requests_per_s": round(done / elapsed, 1), "items_per_s": round(done * batch / elapsed, 1),
            "latency_ms": {"p50": pct(50), "p95": pct(95), "p99": pct(99)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--target", choices=TARGETS, required=True, help="RPC to load")
    parser.add_argument("--server", required=True, help="HOST:PORT of the embedder or search service")
    parser.add_argument("--concurrency", type=int, default=8, help="clients in flight")
    parser.add_argument("--batch", type=int, default=1, help="items per request (texts, images, ingest items)")
    parser.add_argument("--duration", type=float, default=10, help="seconds to run")
    parser.add_argument("--requests", type=int, default=10**9, help="stop after this many requests")
    parser.add_argument("--procs", type=int, default=1, help="client processes")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of unrecorded load first")
    args = parser.parse_args()
    print(json.dumps(run(args.target, args.server, args.concurrency, args.batch, args.duration,
                         args.requests, args.procs, warmup_s=args.warmup), indent=2))


if __name__ == "__main__":
    main()
