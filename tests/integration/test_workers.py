"""`--workers N`: N search processes on one port under a supervising parent.

Real processes on the Milvus Lite backend: the parent serves the Lite file
on its private socket and the workers connect to it. Which worker answered
a call shows in the parent's `search_worker_rpcs_total{worker_pid}`."""
from __future__ import annotations

import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest

from imagesearch.client import IngestItem, IngestResult, SearchClient
from imagesearch.health import status
from tests.services import ROOT, eventually, metric, photo, scrape, start_search

STARTED = re.compile(r"worker (\d+) started \(pid (\d+)\)")


def workers_of(service) -> dict[int, int]:
    """{slot: pid} of the workers the parent started, the latest per slot."""
    return {int(slot): int(pid) for slot, pid in STARTED.findall(service.log())}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by the parent) is not serving.
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"


def start_workers(tmp_path: Path, embedder: str, count: int, *args: str):
    service = start_search(tmp_path, embedder, "--workers", str(count), *args)
    # Health on the shared port answers from whichever worker the kernel
    # picks, so each worker's own "listening" line is what says all are up.
    eventually(lambda: service.log().count("search listening on") >= count
               or service.process.poll() is not None, 120)
    return service.wait_ready(60)


def images(first: int, count: int) -> list[IngestItem]:
    return [IngestItem(photo(first + i), uri=f"file:///w/{first + i}.jpg") for i in range(count)]


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory, embedder_service):
    service = start_workers(tmp_path_factory.mktemp("workers"), embedder_service.address, 2)
    yield service
    assert service.stop() == 0, service.log()


def test_two_workers_serve_ingest_and_search_on_one_port(two_workers):
    pids = workers_of(two_workers)
    assert len(pids) == 2 and all(alive(pid) for pid in pids.values()), two_workers.log()
    # Both are children of the parent, which serves no API calls itself.
    for pid in pids.values():
        ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        assert ppid == two_workers.process.pid

    with SearchClient(two_workers.address, timeout_s=60) as client:
        results = list(client.ingest(images(0, 12)))
        assert [r.status for r in results] == [IngestResult.STATUS_INSERTED] * 12
        assert client.stats().count == 12
        assert len(client.search_text("a photo", top_k=5)) == 5

    # Each new connection goes to one worker (SO_REUSEPORT hashes it); keep
    # connecting until each worker has answered calls.
    def both_answered() -> bool:
        with SearchClient(two_workers.address, timeout_s=30) as client:
            assert client.stats().count == 12  # every worker sees every row
        per_worker = scrape(two_workers)
        return all(metric(per_worker, "search_worker_rpcs_total", worker_pid=str(pid)) > 0
                   for pid in pids.values())
    eventually(both_answered, 60, interval_s=0)

    samples = scrape(two_workers)
    assert metric(samples, "search_workers") == 2
    assert metric(samples, "imagesearch_build_info", server="search") == 1
    assert metric(samples, "search_dependency_up", dependency="milvus") == 1
    # The workers' counters are summed, each image counted once by whichever stored it.
    assert metric(samples, "search_images_ingested_total", status="inserted") == 12
    # --health-port works with workers: each binds it too.
    assert status(f"127.0.0.1:{two_workers.health_port}") == "SERVING"
    # Creating the collection logged no traceback: the parent's Lite server
    # is quiet about AllocTimestamp, which it lacks and pymilvus copes without.
    assert "Traceback" not in two_workers.log(), two_workers.log()


def test_the_same_images_through_both_workers_are_one_row_each(two_workers):
    """Across workers as across replicas: streams on two workers may both
    say INSERTED for one image, and it is still one row."""
    batch = images(1000, 8)
    outcomes: list[list[int]] = []
    pids = workers_of(two_workers).values()

    def calls() -> list[float]:
        samples = scrape(two_workers)
        return [metric(samples, "search_worker_rpcs_total", worker_pid=str(pid)) for pid in pids]

    def ingest(n: int) -> None:
        # gRPC shares one connection among a process's channels of the same
        # target and options; a message limit of its own gives each stream
        # its own connection, which the kernel gives to either worker.
        with SearchClient(two_workers.address, timeout_s=60, max_message_mb=64 + n) as client:
            outcomes.append([r.status for r in client.ingest(batch)])
    before = calls()
    with SearchClient(two_workers.address, timeout_s=60) as client:
        rows = client.stats().count
    # Rounds of six concurrent streams until both workers have had some
    # (one round, nearly always: each connection goes to either).
    for _ in range(5):
        threads = [threading.Thread(target=ingest, args=(n,)) for n in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        if all(now > then for now, then in zip(calls(), before)):
            break
    assert all(now > then for now, then in zip(calls(), before)), "one worker had every stream"
    assert len(outcomes) % 6 == 0
    assert all(set(statuses) <= {1, 2} for statuses in outcomes), outcomes  # INSERTED or ALREADY_PRESENT
    assert all(any(o[i] == 1 for o in outcomes) for i in range(8))  # each stored by someone
    with SearchClient(two_workers.address, timeout_s=60) as client:
        assert client.stats().count == rows + 8


def test_a_killed_worker_is_replaced_and_the_service_keeps_answering(two_workers):
    before = workers_of(two_workers)
    victim_slot, victim = next(iter(before.items()))
    os.kill(victim, signal.SIGKILL)
    eventually(lambda: f"worker {victim_slot} (pid {victim}) was killed by signal 9" in
               two_workers.log(), 30)
    eventually(lambda: workers_of(two_workers)[victim_slot] != victim, 30)
    replacement = workers_of(two_workers)[victim_slot]
    eventually(lambda: two_workers.log().count("search listening on") >= 3, 60)
    assert alive(replacement) and not alive(victim)
    samples = scrape(two_workers)
    assert metric(samples, "search_workers") == 2
    assert metric(samples, "search_worker_restarts_total") == 1
    # The dead worker's calls are still counted (counters never go back).
    assert metric(samples, "search_worker_rpcs_total", worker_pid=str(victim)) > 0
    for _ in range(10):  # fresh connections: each lands on a live worker
        with SearchClient(two_workers.address, timeout_s=30) as client:
            assert client.stats().count == 20
            assert client.search_text("a photo", top_k=3)
    assert two_workers.process.poll() is None


def test_sigterm_drains_the_workers_and_exits_0(tmp_path, embedder_service):
    service = start_workers(tmp_path, embedder_service.address, 2, "--grace-s", "30")
    pids = list(workers_of(service).values())
    acknowledged = threading.Event()
    results: list = []
    errors: list = []

    def ingest() -> None:
        try:
            with SearchClient(service.address, timeout_s=120) as client:
                for result in client.ingest(images(5000, 300)):
                    results.append(result)
                    acknowledged.set()
        except grpc.RpcError as exc:
            errors.append(exc)
    thread = threading.Thread(target=ingest)
    thread.start()
    assert acknowledged.wait(120), service.log()
    service.process.send_signal(signal.SIGTERM)
    thread.join(120)
    assert service.process.wait(60) == 0, service.log()
    assert not errors, errors
    assert len(results) == 300  # the call in flight finished within the grace period
    assert not any(alive(pid) for pid in pids)
    assert "all workers stopped" in service.log()


def test_a_killed_parent_takes_its_workers_down(tmp_path, embedder_service):
    service = start_workers(tmp_path, embedder_service.address, 2)
    pids = list(workers_of(service).values())
    service.process.kill()
    service.process.wait()
    eventually(lambda: not any(alive(pid) for pid in pids), 60)


def _auto() -> int:
    """What --workers 0 should pick here, worked out independently."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return min(cores, 8)


def test_workers_0_is_one_per_available_core(tmp_path, embedder_service):
    help_text = subprocess.run([sys.executable, "-m", "search_service", "--help"], cwd=ROOT,
                               capture_output=True, text=True, timeout=60).stdout
    assert f"(here: {_auto()})" in " ".join(help_text.split())
    service = start_search(tmp_path, embedder_service.address, "--workers", "0")
    try:
        expected = _auto()
        if expected > 1:
            eventually(lambda: f"search: {expected} workers on" in service.log(), 60)
            eventually(lambda: len(workers_of(service)) == expected, 60)
        service.wait_ready(120)
        if expected == 1:  # one process, no supervisor
            assert "workers on" not in service.log()
    finally:
        assert service.stop() == 0, service.log()


@pytest.mark.parametrize("args, env, message", [
    (["--workers", "-1"], {}, "argument --workers: invalid int value: '-1'"),
    (["--workers", "two"], {}, "invalid int value"),
    ([], {"SEARCH_WORKERS": "-3"}, "SEARCH_WORKERS"),
    (["--workers", "2", "--port", "0"], {}, "needs a fixed --port"),
])
def test_bad_worker_settings_exit_2(tmp_path, args, env, message):
    run = subprocess.run([sys.executable, "-m", "search_service", "--data-dir", str(tmp_path),
                          "--metrics-port", "0", *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, env={**os.environ, **env})
    assert run.returncode == 2, run.stderr
    assert message in run.stderr


def test_a_port_in_use_stops_the_workers_and_the_parent_with_2(tmp_path, embedder_service):
    """A worker that cannot start (exit 2) would fail the same way again:
    the parent stops the others and exits 2 instead of replacing it forever."""
    with socket.socket() as taken:  # no SO_REUSEPORT: nobody may share it
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = subprocess.run([sys.executable, "-m", "search_service", "--host", "127.0.0.1",
                              "--port", str(port), "--workers", "2", "--metrics-port", "0",
                              "--embedder", embedder_service.address,
                              "--data-dir", str(tmp_path)],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert "cannot listen on" in run.stderr
    assert "exited with status 2" in run.stderr
    assert "replacing it" not in run.stderr
