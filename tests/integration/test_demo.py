"""The README's run command, scripts/demo.sh, as a new user meets it: real
processes throughout (the install step is skipped: .venv exists here)."""
from __future__ import annotations

import os
import socket
import subprocess
import threading
import time

from tests.services import ROOT, photo


def _demo(tmp_path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "scripts/demo.sh"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "SKIP_INSTALL": "1",
                                            "WORK": str(tmp_path / "demo"), **env})


def test_the_demo_stops_at_once_when_the_embedder_dies_at_start(tmp_path):
    (tmp_path / "no-checkpoint").mkdir()
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "one.jpg").write_bytes(photo(1))
    started = time.monotonic()
    run = _demo(tmp_path, MODEL=str(tmp_path / "no-checkpoint"), IMAGES=str(tmp_path / "images"))
    assert run.returncode != 0
    assert time.monotonic() - started < 30
    assert "the embedder exited while starting" in run.stderr
    assert "cannot load CLIP checkpoint" in run.stderr  # the embedder's own error


class _Listener:
    """Something else on a port: counts the connections it gets."""

    def __init__(self, port: int) -> None:
        self.socket = socket.socket()
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.socket.bind(("127.0.0.1", port))
        except OSError:  # some process has it already: taken, as the test wants
            self.socket = socket.socket()
            self.socket.bind(("127.0.0.1", 0))
        self.socket.listen()
        self.socket.settimeout(0.2)
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                self.socket.accept()[0].close()
                self.connections += 1
            except OSError:  # the timeout: look at the stop flag again
                pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.socket.close()


def test_the_demo_leaves_another_instance_on_the_default_ports_alone(tmp_path):
    """Something already listens on the default gRPC and metrics ports: the
    demo runs on ports of its own, succeeds, and never connects to it."""
    others = [_Listener(port) for port in (50051, 50052, 9101, 9102)]
    try:
        run = _demo(tmp_path)
    finally:
        for other in others:
            other.close()
    assert run.returncode == 0, run.stdout + run.stderr
    assert "240 images: 240 inserted" in run.stdout
    assert (tmp_path / "demo" / "results.png").exists()
    assert [other.connections for other in others] == [0, 0, 0, 0]
