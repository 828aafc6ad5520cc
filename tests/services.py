"""Start the services as real processes on free loopback ports, for tests."""
from __future__ import annotations

import asyncio
import functools
import io
import shutil
import subprocess
import sys
import threading
import time
from typing import Callable

import grpc
import numpy as np
import pytest
import yaml
from PIL import Image

# The process harness lives in bench/ (benchmarks use it too, and must
# not import tests); re-exported here so that tests import from one module.
from bench.harness import (ROOT, TEST_MODEL, MilvusServer, Service, free_port,  # noqa: F401
                           metric, scrape, scrape_url, start_embedder, start_search)

EVAL_PER_LABEL = 10  # images per label in the session's evaluation set (conftest.py)
# For what the Milvus backend does not change (the CLI's own parsing and
# output, its error messages): the session's search service on Milvus Lite
# only, instead of once per backend.
LITE_ONLY = pytest.mark.parametrize("search_service", ["lite"], indirect=True)


def eventually(predicate: Callable[[], bool], timeout_s: float, interval_s: float = 0.05) -> None:
    """Wait until `predicate()` holds; fail after `timeout_s`. For state that
    no event announces (a log line, a metric, a row count): it polls."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"not true after {timeout_s} s: {predicate}"
        time.sleep(interval_s)  # the poll interval: there is no event to wait on


async def until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Let other tasks run until `predicate()` holds: for state inside one
    event loop that announces itself by no event (a queue's length)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        assert loop.time() < deadline, f"not true after {timeout_s} s: {predicate}"
        await asyncio.sleep(0)  # a turn of the loop, not a timed wait


async def turns(count: int = 20) -> None:
    """Give every other task `count` turns of the loop: for tests that a
    blocked task stays blocked (nothing announces that something did not happen)."""
    for _ in range(count):
        await asyncio.sleep(0)


@functools.cache
def rendered_overlay(overlay: str) -> tuple[dict, ...]:
    """deploy/k8s/overlays/OVERLAY as `kubectl kustomize` renders it for `apply`."""
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is not installed: it renders the kustomize overlays (apt: kubectl)"
    out = subprocess.run([kubectl, "kustomize", str(ROOT / "deploy" / "k8s" / "overlays" / overlay)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


def container_env(objects: tuple[dict, ...], container: dict) -> dict[str, str]:
    """The environment a container gets: its ConfigMaps (envFrom), then `env` values."""
    maps = {o["metadata"]["name"]: o.get("data", {}) for o in objects if o["kind"] == "ConfigMap"}
    env = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(maps[source["configMapRef"]["name"]])
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return env


def photo(seed: int = 0) -> bytes:
    """A small random JPEG, different for each seed."""
    pixels = np.random.default_rng(seed).integers(0, 255, (80, 120, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG")
    return out.getvalue()


def status_of(call, *args) -> grpc.RpcError:
    """The error a call that must fail raises."""
    with pytest.raises(grpc.RpcError) as info:
        call(*args)
    return info.value


class Load:
    """Threads that run `targets`, each looping until `_stop` is set, from
    `with` until its end."""

    def __init__(self, *targets: Callable[[], None]) -> None:
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=target) for target in targets]

    def __enter__(self):
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)


class SearchLoad(Load):
    """Threads that search back to back, from `with` until its end. Each
    outcome is kept as (start time, status name, seconds, details)."""

    def __init__(self, address: str, threads: int = 2, collection: str = "") -> None:
        super().__init__(*[self._run] * threads)
        self.outcomes: list[tuple[float, str, float, str]] = []
        self._address, self._collection = address, collection

    def count(self, code: str, since: float = 0.0, until: float = float("inf")) -> int:
        """Calls that started in (since, until) and ended with `code`."""
        return sum(1 for when, got, _, _ in list(self.outcomes)
                   if got == code and since < when < until)

    def _run(self) -> None:
        from imagesearch.client import SearchClient
        with SearchClient(self._address, timeout_s=30) as client:
            while not self._stop.is_set():
                started, code, details = time.monotonic(), "OK", ""
                try:
                    client.search_text("a photo of a red circle", top_k=3, collection=self._collection)
                except grpc.RpcError as exc:
                    code, details = exc.code().name, exc.details()
                self.outcomes.append((started, code, time.monotonic() - started, details))
                self._stop.wait(0.05)  # paces the load; not a synchronisation


def imgsearch(server: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the `imgsearch` CLI against `server`."""
    return subprocess.run([sys.executable, "-m", "imagesearch.cli", "--server", server, *args],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
