"""The network between the search service and the embedder is cut and
restored: the embedder runs in a network namespace of its own, reached
over a veth pair that the test takes down and brings up again (needs root,
as on our build machines; without it this test fails, it is not skipped)."""
from __future__ import annotations

import os
import subprocess
import time

import pytest

from tests.services import SearchLoad, eventually, start_embedder, start_search

TIMEOUT_S = 2.0  # the search service's --embedder-timeout-s here


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@pytest.fixture
def netns():
    """A namespace whose only link is a veth pair to 10.201.N.1 (host) / .2 (namespace)."""
    n = os.getpid() % 250
    name, host_if, ns_if = f"imgsearch-{n}", f"vh-is{n}", f"vn-is{n}"
    ip("netns", "add", name)
    try:
        ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        ip("link", "set", ns_if, "netns", name)
        ip("addr", "add", f"10.201.{n}.1/30", "dev", host_if)
        ip("link", "set", host_if, "up")
        for args in (("addr", "add", f"10.201.{n}.2/30", "dev", ns_if), ("link", "set", ns_if, "up"),
                     ("link", "set", "lo", "up")):
            ip("netns", "exec", name, "ip", *args)
        yield name, host_if, f"10.201.{n}.2"
    finally:
        ip("netns", "del", name)  # takes the veth pair with it


def test_network_cut_and_restored(netns, tmp_path):
    name, host_if, address = netns
    embedder = start_embedder(tmp_path, host=address, prefix=["ip", "netns", "exec", name]).wait_ready()
    search = start_search(tmp_path, embedder.address, "--embedder-timeout-s", str(TIMEOUT_S)).wait_ready()
    try:
        with SearchLoad(search.address) as load:
            eventually(lambda: load.count("OK") >= 5, 30)
            ip("link", "set", host_if, "down")
            cut = time.monotonic()
            # Cut long enough for calls started in it to run into the timeout.
            eventually(lambda: load.count("UNAVAILABLE", since=cut + 0.1,
                                          until=time.monotonic() - TIMEOUT_S) >= 2, 60)
            ip("link", "set", host_if, "up")
            restored = time.monotonic()
            eventually(lambda: load.count("OK", since=restored + 5) >= 3, 60)
    finally:
        assert search.stop() == 0
        embedder.stop()
    outcomes = load.outcomes
    before = {code for when, code, took, _ in outcomes if when + took < cut}
    during = [(code, took) for when, code, took, _ in outcomes if cut + 0.1 < when < restored - TIMEOUT_S]
    after = [code for when, code, _, _ in outcomes if when > restored + 5]
    assert before == {"OK"}
    assert during and {code for code, _ in during} == {"UNAVAILABLE"}, during[:5]
    assert max(took for _, took in during) < TIMEOUT_S + 1  # bounded by the embedder timeout
    assert after and set(after) == {"OK"}, after[:10]
