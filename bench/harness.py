"""Real processes of the services and of a Milvus server on free loopback
ports, and their metrics: for the benchmarks and the tests (tests/services.py
re-exports these)."""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc

from imagesearch.health import wait_serving

ROOT = Path(__file__).resolve().parent.parent
TEST_MODEL = ROOT / "tests" / "fixtures" / "shapes-clip"


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
                cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)  # a group of its own, for kill_group

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
        return stop_process(self.process, timeout_s)

    def kill_group(self) -> None:
        """`kill -9` of the process and every process it started (--workers), at once."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


def answers_within(ask, refusal: type[Exception], process: subprocess.Popen,
                   timeout_s: float) -> bool:
    """Whether `ask()` returns without `refusal` within `timeout_s`, asked
    once a second while `process` runs: for servers whose readiness shows
    only in their answers."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        try:
            ask()
            return True
        except refusal:
            time.sleep(1)  # the poll interval
    return False


def stop_process(process: subprocess.Popen, timeout_s: float = 30) -> int:
    """SIGTERM, then SIGKILL after `timeout_s`; the exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


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

        def answers() -> None:
            client = MilvusClient(uri=self.uri, timeout=5)
            client.list_collections()
            client.close()
        if not answers_within(answers, MilvusException, self.process, timeout_s):
            self.stop()
            raise RuntimeError(f"Milvus server at {self.uri} not ready after {timeout_s} s; log "
                               "tail:\n" + self.log_path.read_text(errors="replace")[-3000:])
        return self

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
