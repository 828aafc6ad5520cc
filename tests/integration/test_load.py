"""Load-testing the way our users do: Locust, headless for a few seconds,
against both services as real processes, through bench/locustfile.py."""
from __future__ import annotations

import csv
import subprocess
import sys

from imagesearch.client import IngestItem, SearchClient
from tests.services import LITE_ONLY, ROOT, photo

RPCS = ("SearchByText", "SearchByImage", "Ingest", "GetStats", "EncodeText", "EncodeImage")


@LITE_ONLY
def test_locust_runs_every_rpc_of_both_services_without_failures(search_service, embedder_service,
                                                                 tmp_path):
    with SearchClient(search_service.address) as client:  # the users' collection exists
        list(client.ingest([IngestItem(photo(9000), "seed")], collection="locust"))
    run = subprocess.run(
        [sys.executable, "-m", "locust", "-f", "bench/locustfile.py", "--headless", "-u", "4",
         "-r", "4", "-t", "8s", "--host", search_service.address, "--embedder-host",
         embedder_service.address, "--collection", "locust", "--csv", str(tmp_path / "load"),
         "--only-summary"], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    with open(tmp_path / "load_stats.csv", newline="") as table:
        rows = {row["Name"]: row for row in csv.DictReader(table)}
    for name in RPCS:
        assert int(rows[name]["Request Count"]) > 0, (name, rows.get(name))
        assert int(rows[name]["Failure Count"]) == 0, (name, run.stderr[-3000:])
