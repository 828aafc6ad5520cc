"""Start the services as real processes on free loopback ports, for tests."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

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
                 port: int | None = None) -> None:
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = log_path
        full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", module, "--host", "127.0.0.1", "--port", str(self.port), *args],
                cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = 120) -> "Service":
        try:
            wait_serving(self.address, timeout_s, alive=lambda: self.process.poll() is None)
        except Exception as exc:
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


def start_embedder(tmp: Path, *args: str, port: int | None = None) -> Service:
    return Service("embedder_service", ["--model", str(TEST_MODEL), "--preprocess-workers", "2",
                                        "--torch-threads", "1", *args],
                   tmp / f"embedder-{free_port()}.log", port=port)


def start_search(tmp: Path, embedder: str, *args: str) -> Service:
    return Service("search_service", ["--embedder", embedder, "--data-dir", str(tmp / "data"), *args],
                   tmp / f"search-{free_port()}.log")
