"""Soak: mixed load at about 80% of capacity for minutes; zero errors and
flat memory are the pass mark.

    python -m bench.soak --minutes 30            # starts its own services
    python -m bench.soak --minutes 30 --model openai/clip-vit-base-patch32

It starts an embedder and a search service (Milvus Lite in a temporary
directory), ingests a seed set, measures capacity with a closed loop of the
mix (70% SearchByText, 20% SearchByImage, 5% one-image Ingest of a new
image, 5% Delete of the oldest of those, so the collection keeps its size:
Milvus Lite searches exactly, so a growing collection would slow every
search), then sends the mix open-loop at `--load` (0.8) of that rate.
It samples both processes' RSS every second and prints JSON: calls and
errors by status, p50/p99 latency, and RSS growth from the end of the
warm-up to the end. tests/integration/test_soak.py runs a short version.
"""
from __future__ import annotations

import argparse
import random
import tempfile
import threading
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np

from bench.photos import make_jpegs, unique
from bench.report import emit
from imagesearch.client import IngestItem, SearchClient

QUERIES = [f"a photo of a {c} {s}" for c in ("red", "blue", "green", "white")
           for s in ("circle", "square", "triangle", "dog")]


def rss(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class Mix:
    """The soak's calls: 70% SearchByText, 20% SearchByImage, 5% Ingest of a
    new image, 5% Delete of the oldest image the soak ingested (so the
    collection keeps its size, and with it the cost of a search); each
    outcome counted by status code, with its latency."""

    def __init__(self, address: str, seed: int = 0) -> None:
        self.address = address
        self._rng = random.Random(seed)
        self._photos = make_jpegs(8, seed=seed)
        self._fresh = iter(range(10**9))
        self._ingested: deque[str] = deque()  # ids the soak added, oldest first
        self._lock = threading.Lock()
        self.codes: Counter = Counter()
        self.latencies: list[float] = []

    def call(self, client: SearchClient) -> None:
        kind = self._rng.choices(["text", "image", "ingest", "delete"], [14, 4, 1, 1])[0]
        begin = time.monotonic()
        try:
            if kind == "text":
                client.search_text(self._rng.choice(QUERIES), top_k=10)
            elif kind == "image":
                client.search_image(self._rng.choice(self._photos), top_k=10)
            elif kind == "ingest":
                [result] = client.ingest([IngestItem(unique(self._photos[0], next(self._fresh)),
                                                     "soak")])
                assert result.error == "", result.error
                self._ingested.append(result.id)
            elif self._ingested:
                client.delete([self._ingested.popleft()])
            code = "OK"
        except grpc.RpcError as exc:
            code = exc.code().name
        with self._lock:
            self.codes[code] += 1
            self.latencies.append(time.monotonic() - begin)


def capacity(address: str, seconds: float = 5, concurrency: int = 8) -> float:
    """Calls of the mix per second that a closed loop of `concurrency` callers gets."""
    mix = Mix(address, seed=1)
    stop = time.monotonic() + seconds

    def caller(_: int) -> None:
        with SearchClient(address) as client:
            while time.monotonic() < stop:
                mix.call(client)
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(caller, range(concurrency)))
    return sum(mix.codes.values()) / seconds


def soak(address: str, pids: dict[str, int], rate: float, seconds: float, warmup_s: float,
         seed: int = 0) -> dict:
    """Open-loop mixed load at `rate` calls/s for `seconds`; see the module doc."""
    mix = Mix(address, seed)
    memory: dict[str, list[tuple[float, int]]] = {name: [] for name in pids}
    started = time.monotonic()

    def sample() -> None:
        while time.monotonic() - started < seconds:
            for name, pid in pids.items():
                memory[name].append((time.monotonic() - started, rss(pid)))
            time.sleep(1)

    sampler = threading.Thread(target=sample)
    sampler.start()
    with SearchClient(address, timeout_s=30) as client, ThreadPoolExecutor(64) as pool:
        n = 0
        while (now := time.monotonic() - started) < seconds:
            due = n / rate
            if due > now:
                time.sleep(due - now)
            pool.submit(mix.call, client)
            n += 1
    sampler.join()
    growth = {}
    for name, samples in memory.items():
        after = [m for t, m in samples if t >= warmup_s]
        growth[name] = {"rss_after_warmup_mb": after[0] / 2**20, "rss_end_mb": after[-1] / 2**20,
                        "growth_pct": 100 * (after[-1] - after[0]) / after[0]}
    return {"seconds": seconds, "rate_per_s": rate, "calls": sum(mix.codes.values()),
            "codes": dict(mix.codes), "errors": sum(v for k, v in mix.codes.items() if k != "OK"),
            "p50_ms": 1000 * float(np.percentile(mix.latencies, 50)),
            "p99_ms": 1000 * float(np.percentile(mix.latencies, 99)), "memory": growth}


def main() -> None:
    from bench.harness import TEST_MODEL, start_embedder, start_search

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--warmup-s", type=float, default=60)
    p.add_argument("--load", type=float, default=0.8, help="fraction of measured capacity")
    p.add_argument("--model", default=str(TEST_MODEL))
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        embedder = start_embedder(Path(tmp), "--model", args.model).wait_ready(600)
        search = start_search(Path(tmp), embedder.address).wait_ready()
        try:
            with SearchClient(search.address) as client:
                list(client.ingest(IngestItem(j, f"seed-{i}") for i, j in enumerate(make_jpegs(64))))
            measured = capacity(search.address)
            result = soak(search.address, {"embedder": embedder.process.pid,
                                           "search": search.process.pid},
                          rate=args.load * measured, seconds=60 * args.minutes,
                          warmup_s=args.warmup_s)
            result["capacity_per_s"] = measured
        finally:
            search.stop()
            embedder.stop()
    emit(result, args.out)


if __name__ == "__main__":
    main()
