"""The short soak CI runs (bench/soak.py has the long one): mixed search,
image search, ingest and delete at 80% of the measured capacity for 20 s; no
call fails, and neither process's RSS grows 10% over the 10 s after a 10 s
warm-up."""
from __future__ import annotations

from bench.photos import make_jpegs
from bench.soak import capacity, soak
from imagesearch.client import IngestItem, SearchClient
from tests.services import start_embedder, start_search


def test_short_soak(tmp_path):
    embedder = start_embedder(tmp_path).wait_ready()
    search = start_search(tmp_path, embedder.address).wait_ready()
    try:
        with SearchClient(search.address) as client:
            list(client.ingest(IngestItem(j, f"seed-{i}") for i, j in enumerate(make_jpegs(32))))
        rate = 0.8 * capacity(search.address, seconds=4)
        result = soak(search.address, {"embedder": embedder.process.pid, "search": search.process.pid},
                      rate=rate, seconds=20, warmup_s=10)
    finally:
        assert search.stop() == 0 and embedder.stop() == 0
    print(result)
    assert result["calls"] > 0.9 * rate * 20 and result["errors"] == 0, result
    for name, memory in result["memory"].items():
        assert memory["growth_pct"] < 10, (name, memory)
