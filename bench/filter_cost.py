"""What a metadata filter costs Milvus, by its size, on Milvus Lite and a server.

    python -m bench.filter_cost --rows 2000

Fills one collection per backend with `--rows` random vectors (metadata
`label` = one of 24 values) through the search service's own store, then
times searches whose filter has K keys x V values of B bytes each (the
expression the service builds), from a small one to the largest the
per-key limits allow. Prints JSON: expression bytes and median / max
seconds per search, per backend.
"""
from __future__ import annotations

import argparse
import hashlib
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.report import emit
from imagesearch.v1 import search_pb2
from search_service import filters
from search_service.errors import ServiceError
from search_service.domain import ModelIdentity
from search_service.store import MilvusStore, Row

# (keys, values per key, bytes per value): up to what the per-key limits
# allowed before the total was capped at 64 values.
SHAPES = [(1, 1, 16), (1, 24, 16), (2, 32, 16), (1, 256, 64), (4, 256, 256), (16, 256, 64),
          (16, 256, 1024)]


def _filter(keys: int, values: int, size: int) -> search_pb2.Filter:
    return search_pb2.Filter(metadata={
        f"k{k}" if k else "label": search_pb2.AnyOf(values=[f"{v:0{size}d}" for v in range(values)])
        for k in range(keys)})


def measure(store: MilvusStore, rows: int, repeats: int) -> list[dict]:
    rng = np.random.default_rng(0)
    store.create("bench_filter", ModelIdentity("bench", "0", 64))
    vectors = rng.standard_normal((rows, 64)).astype(np.float32)
    store.write("bench_filter", [Row(id=hashlib.sha256(str(i).encode()).hexdigest(),
                                     vector=v.tolist(), uri=f"{i}", metadata={"label": f"{i % 24}"})
                                 for i, v in enumerate(vectors)])
    out = []
    for keys, values, size in SHAPES:
        expr = filters.build(_filter(keys, values, size))
        row = {"keys": keys, "values_per_key": values, "value_bytes": size,
               "expression_bytes": len(expr.encode())}
        times = []
        try:
            for _ in range(repeats):
                started = time.perf_counter()
                store.search("bench_filter", vectors[0].tolist(), 10, expr=expr)
                times.append(time.perf_counter() - started)
            row.update(median_s=round(statistics.median(times), 4), max_s=round(max(times), 4))
        except ServiceError as exc:  # Milvus refused the expression
            row["error"] = str(exc)[:300]
        out.append(row)
        print(out[-1], flush=True)
    return out


def main() -> None:
    from bench.harness import MilvusServer

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args()
    filters.MAX_VALUES = max(k * v for k, v, _ in SHAPES)  # measures past the service's limit
    result = {"rows": args.rows}
    with tempfile.TemporaryDirectory() as tmp:
        lite = MilvusStore(str(Path(tmp) / "milvus.db"), timeout_s=120)
        result["lite"] = measure(lite, args.rows, args.repeats)
        lite.close()
        (Path(tmp) / "server").mkdir()
        server = MilvusServer(Path(tmp) / "server").wait_ready()
        try:
            store = MilvusStore(server.uri, timeout_s=120)
            result["server"] = measure(store, args.rows, args.repeats)
            store.close()
        finally:
            server.stop()
    emit(result, args.out)


if __name__ == "__main__":
    main()
