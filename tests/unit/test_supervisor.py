"""The --workers supervisor's exit status, with stand-in workers (small
Python processes, not search services) so that each case takes seconds:
how a worker ends decides what the parent reports."""
from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

from tests.services import ROOT, eventually

# The supervisor in a process of its own (it installs signal handlers):
# two workers running WORKER, a grace period of 0.5 s.
PARENT = textwrap.dedent("""
    import logging, sys
    from search_service.workers import Supervisor
    logging.basicConfig(level="INFO")
    worker = [sys.executable, "-c", sys.argv[1], sys.argv[2]]
    sys.exit(Supervisor(2, worker, grace_s=0.5).run())
""")
# A stand-in worker: announces itself with a file named by its pid, then
# behaves as BEHAVIOUR says when it gets SIGTERM.
WORKER = textwrap.dedent("""
    import os, signal, sys, time
    folder, behaviour = sys.argv[1].split(":")
    if behaviour == "bad-flags":
        sys.exit(2)
    if behaviour == "ignores-sigterm":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if behaviour == "fails-draining":
        signal.signal(signal.SIGTERM, lambda *_: os._exit(3))
    if behaviour == "drains":
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    open(os.path.join(folder, str(os.getpid())), "w").close()
    while True:
        time.sleep(1)  # a stand-in for serving: it waits for a signal
""")


def _supervise(tmp_path, behaviour: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", PARENT, WORKER, f"{tmp_path}:{behaviour}"],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("behaviour, status, logged", [
    ("drains", 0, "all workers stopped"),
    ("fails-draining", 1, "exited with status 3 while stopping"),
    ("ignores-sigterm", 1, "still running after the grace period: killing it"),
])
def test_sigterm_exit_status_follows_how_the_workers_end(tmp_path, behaviour, status, logged):
    parent = _supervise(tmp_path, behaviour)
    try:
        eventually(lambda: len(list(tmp_path.iterdir())) == 2, 30)  # both workers are up
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(30) == status
        assert logged in parent.stderr.read()
    finally:
        parent.kill()


def test_a_worker_with_a_start_up_error_stops_the_parent_with_2(tmp_path):
    parent = _supervise(tmp_path, "bad-flags")
    try:
        assert parent.wait(30) == 2
        assert "exited with status 2" in parent.stderr.read()
    finally:
        parent.kill()
