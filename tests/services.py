"""Start the services as real processes on free loopback ports, for tests."""
from __future__ import annotations

import asyncio
import functools
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Callable

import grpc
import numpy as np
import pytest
import yaml
from PIL import Image

from imagesearch.health import wait_serving

ROOT = Path(__file__).resolve().parent.parent
TEST_MODEL = ROOT / "tests" / "fixtures" / "shapes-clip"


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    """One service process (`python -m MODULE ARGS`), logging to a file."""

    def __init__(self, module: str, args: list[str], log_path: Path, env: dict | None = None,
                 port: int | None = None, host: str = "127.0.0.1",
                 prefix: list[str] | None = None) -> None:
        """`prefix` runs the process through another command, e.g. `ip netns exec NS`."""
        self.port = port or free_port()
        self.address = f"{host}:{self.port}"
        self.metrics_port = free_port()
        self.health_port = free_port()  # plaintext health only, as the manifests' probes use
        self.metrics_url = f"http://{host}:{self.metrics_port}/metrics"
        self.log_path = log_path
        full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(
                [*(prefix or []), sys.executable, "-m", module, "--host", host, "--port", str(self.port),
                 "--metrics-port", str(self.metrics_port), "--health-port", str(self.health_port),
                 *args],
                cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = 120, service: str = "",
                   credentials: grpc.ChannelCredentials | None = None) -> "Service":
        """Wait for health SERVING: overall by default, or e.g. "liveness"."""
        try:
            wait_serving(self.address, timeout_s, alive=lambda: self.process.poll() is None,
                         service=service, credentials=credentials)
        except Exception as exc:
            self.process.kill()  # a server that never got ready must not outlive the test
            self.process.wait()
            raise RuntimeError(f"{exc}; log:\n{self.log()}") from exc
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout_s: float = 30) -> int:
        """SIGTERM and wait; the exit code (0 for a clean shutdown)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


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


def scrape(service: "Service") -> dict[str, float]:
    """The service's metrics as {'name{label="v",...}': value}."""
    return scrape_url(service.metrics_url)


def scrape_url(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


def metric(samples: dict[str, float], name: str, **labels: str) -> float:
    """The sum of `name` over the samples whose labels include `labels`."""
    total = 0.0
    for key, value in samples.items():
        base, _, rest = key.partition("{")
        found = dict(re.findall(r'(\w+)="([^"]*)"', rest))
        if base == name and labels.items() <= found.items():
            total += value
    return total


def imgsearch(server: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the `imgsearch` CLI against `server`."""
    return subprocess.run([sys.executable, "-m", "imagesearch.cli", "--server", server, *args],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)


def start_embedder(tmp: Path, *args: str, port: int | None = None, env: dict | None = None,
                   **where) -> Service:
    """`where`: `host` and `prefix`, as for Service."""
    return Service("embedder_service", ["--model", str(TEST_MODEL), "--preprocess-workers", "2",
                                        "--torch-threads", "1", *args],
                   tmp / f"embedder-{free_port()}.log", port=port, env=env, **where)


def start_search(tmp: Path, embedder: str, *args: str, env: dict | None = None) -> Service:
    return Service("search_service", ["--embedder", embedder, "--data-dir", str(tmp / "data"), *args],
                   tmp / f"search-{free_port()}.log", env=env)


class MilvusServer:
    """A real Milvus standalone server (PyPI `milvus`: the Milvus binary with
    embedded etcd) on a free proxy port and a temporary data directory. Its
    other ports are picked free by `milvus-server` itself."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log_path = data_dir / "milvus-server.log"
        exe = Path(sys.executable).parent / "milvus-server"
        if not exe.exists():  # installed with --target (bench/gpu_run.sh): on PATH
            exe = Path(shutil.which("milvus-server") or exe)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [str(exe), "--data", str(data_dir), "--proxy-port", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def kill(self) -> None:
        """SIGKILL the server: no flush, no goodbye."""
        for pid in self._binaries():
            os.kill(pid, signal.SIGKILL)
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        while self._binaries():  # the binary is a grandchild: no wait() for it, so poll
            time.sleep(0.1)

    def restart(self) -> "MilvusServer":
        """Start the binary again on the same data directory and port. The
        `milvus-server` wrapper would move to another port while the old one
        lingers in TIME_WAIT, so this runs the binary as the wrapper does,
        with the configuration the wrapper wrote."""
        binary = self.data_dir / "bin" / "milvus"
        env = {**os.environ, "DEPLOY_MODE": "STANDALONE", "METRICS_PORT": str(free_port()),
               "MILVUS_RUN_DIR": str(self.data_dir / "run"),
               "LD_LIBRARY_PATH": f"{binary.parent}:{os.environ.get('LD_LIBRARY_PATH', '')}"}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([str(binary), "run", "standalone"], cwd=self.data_dir,
                                            env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        return self

    def wait_ready(self, timeout_s: float = 240) -> "MilvusServer":
        """Block until the server answers; fail loudly (never skip) if it does not."""
        from pymilvus import MilvusClient, MilvusException

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                client = MilvusClient(uri=self.uri, timeout=5)
                client.list_collections()
                client.close()
                return self
            except MilvusException:  # readiness shows only in answers: poll
                time.sleep(1)
        self.stop()
        raise RuntimeError(f"Milvus server at {self.uri} not ready after {timeout_s} s; log tail:\n"
                           + self.log_path.read_text(errors="replace")[-3000:])

    def _binaries(self) -> list[int]:
        """Pids of the Milvus binary the wrapper started: it runs from under the
        data directory and outlives a signal to the wrapper's process group."""
        marker = str(self.data_dir / "bin" / "milvus").encode()
        pids = []
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                if cmdline.read_bytes().startswith(marker):
                    pids.append(int(cmdline.parent.name))
            except OSError:
                pass
        return pids

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self._binaries():
                os.kill(pid, sig)
            deadline = time.monotonic() + 30
            while self._binaries() and time.monotonic() < deadline:  # grandchildren: poll
                time.sleep(0.5)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
