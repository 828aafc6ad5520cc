"""Start-up failures are loud and say what to do; a collection never mixes models."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from imagesearch.client import IngestItem, IngestResult, SearchClient
from imagesearch.health import status
from imagesearch.serving import DEPENDENCIES, LIVENESS
from tests.services import (ROOT, TEST_MODEL, Service, eventually, free_port, photo,
                            start_embedder, start_search)


def test_embedder_refuses_a_model_it_cannot_load(tmp_path):
    """A directory with no checkpoint in it, refused before torch loads
    (tests/unit/test_model.py: what transformers refuses)."""
    (tmp_path / "empty").mkdir()
    started = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "embedder_service", "--model", str(tmp_path / "empty")],
                         capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert run.returncode == 2
    assert time.monotonic() - started < 3
    assert "cannot load CLIP checkpoint" in run.stderr and "What to do" in run.stderr
    assert "listening" not in run.stderr  # never serves some other model instead


def test_a_mistyped_model_directory_says_no_such_directory(tmp_path):
    """Found before torch and transformers load: in well under 3 s."""
    started = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "embedder_service", "--model", "./no/such/dir"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert run.returncode == 2
    assert time.monotonic() - started < 3
    assert "no such directory: ./no/such/dir" in run.stderr
    assert "Repo id" not in run.stderr and "loading model" not in run.stderr


def test_gpu_decoding_without_a_gpu_is_a_start_up_error():
    """With --device cpu a flag contradiction, found before torch loads."""
    started = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "embedder_service", "--model", str(TEST_MODEL),
                          "--device", "cpu", "--image-decode", "gpu", "--port", str(free_port())],
                         capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert run.returncode == 2, run.stderr
    assert time.monotonic() - started < 3
    assert "--image-decode gpu: GPU JPEG decoding needs a CUDA device" in run.stderr
    assert "loading model" not in run.stderr


def test_collection_of_another_model_is_failed_precondition(tmp_path, embedder_service, embedder):
    """A collection written by another model (same dimension, other weights)
    is refused, with a message naming both models."""
    info = embedder.model_info()
    (tmp_path / "data").mkdir()
    # In a process of its own: Milvus Lite holds its file lock until exit.
    create = ("from search_service.domain import ModelIdentity\n"
              "from search_service.store import MilvusStore\n"
              f"MilvusStore({str(tmp_path / 'data' / 'milvus.db')!r}).create('images', "
              f"ModelIdentity('other/clip', '0123456789abcdef', {info.model.dim}))")
    subprocess.run([sys.executable, "-c", create], check=True, cwd=ROOT, timeout=120)

    service = start_search(tmp_path, embedder_service.address).wait_ready()
    try:
        with SearchClient(service.address) as client:
            with pytest.raises(grpc.RpcError) as error:
                client.search_text("a photo of a red circle")
            assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            for needle in ("'other/clip'", "0123456789abcdef", info.model.fingerprint, "another collection"):
                assert needle in error.value.details()
            # The mismatch is per collection: another one works.
            [result] = client.ingest([IngestItem(photo(), "x")], collection="fresh")
            assert result.status == IngestResult.STATUS_INSERTED
            assert client.stats().model.name == "other/clip"
        # Reported at start-up too (retried if Milvus Lite was slow to load it).
        eventually(lambda: "holds" in service.log(), 30)
    finally:
        assert service.stop() == 0


def test_search_service_starts_before_the_embedder_and_recovers(tmp_path):
    """Started first, the search service is ready (it can serve what needs no
    embedder), reports the embedder down under "dependencies", answers
    searches UNAVAILABLE naming the embedder, and serves them within seconds
    of the embedder coming up."""
    port = free_port()
    search = start_search(tmp_path, f"127.0.0.1:{port}").wait_ready(service=LIVENESS)
    try:
        with SearchClient(search.address) as client:
            assert status(search.address) == "SERVING"
            assert status(search.address, service=DEPENDENCIES) == "NOT_SERVING"
            with pytest.raises(grpc.RpcError) as error:
                client.search_text("a photo of a red circle")
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE
            assert f"embedder at 127.0.0.1:{port} is unavailable" in error.value.details()
            embedder = start_embedder(tmp_path, port=port).wait_ready()
            try:
                # followed within one check interval
                search.wait_ready(timeout_s=5, service=DEPENDENCIES)
                assert client.search_text("a photo of a red circle") == []
            finally:
                assert embedder.stop() == 0
    finally:
        assert search.stop() == 0


def test_sigterm_while_loading_exits_at_once_even_as_pid_1(tmp_path):
    """In a PID namespace of its own the embedder is PID 1, as in a container
    without an init: it ignores signals it has no handler for. SIGTERM while
    the model loads must still end it, before it ever serves."""
    log = tmp_path / "embedder.log"
    with open(log, "wb") as out:
        wrapper = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--kill-child=SIGKILL", sys.executable, "-m",
             "embedder_service", "--model", str(TEST_MODEL), "--port", str(free_port()),
             "--metrics-port", "0"], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        children = Path(f"/proc/{wrapper.pid}/task/{wrapper.pid}/children")
        eventually(lambda: children.read_text().strip(), 30)
        embedder = int(children.read_text().split()[0])
        eventually(lambda: "loading model" in log.read_text(), 60)
        os.kill(embedder, signal.SIGTERM)
        wrapper.wait(10)  # unshare ends with its child
        assert "listening" not in log.read_text(), log.read_text()
    finally:
        wrapper.kill()
        wrapper.wait()


@pytest.mark.parametrize("module, flags, needle", [
    ("embedder_service", ["--tls-cert", "server.pem"], "--tls-cert and --tls-key go together"),
    ("embedder_service", ["--tls-cert", "no.pem", "--tls-key", "no.key"],
     "cannot read the TLS key no.key"),
    ("search_service", ["--tls-client-ca", "ca.pem"], "--tls-client-ca needs them"),
    ("search_service", ["--embedder-tls-ca", "no-ca.pem"], "cannot read the CA no-ca.pem"),
    ("embedder_service", ["--port", "50123", "--health-port", "50123"],
     "--health-port and --port are both 50123"),
    ("search_service", ["--metrics-port", "9102", "--health-port", "9102"],
     "--metrics-port and --health-port are both 9102"),
    ("search_service", ["--health-port", "70000"], "--health-port 70000 is not a port"),
])
def test_a_flag_mistake_exits_2_before_anything_loads(tmp_path, module, flags, needle):
    """Found before the model or Milvus is touched, in well under 3 s
    (torch is not even imported yet), on one line, with exit status 2."""
    started = time.monotonic()
    own = ["--data-dir", str(tmp_path)] if module == "search_service" else ["--model", str(TEST_MODEL)]
    run = subprocess.run([sys.executable, "-m", module, *own, *flags], capture_output=True,
                         text=True, timeout=60, cwd=tmp_path)
    assert run.returncode == 2, run.stderr
    assert time.monotonic() - started < 3
    assert needle in run.stderr and "loading model" not in run.stderr
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize("days, exits", [(-1, True), (5, False)])
def test_certificate_expiry_is_checked_at_start(tmp_path, days, exits):
    """An expired certificate stops start-up (exit 2); one that expires
    within 14 days starts with a warning."""
    import datetime

    import trustme
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = trustme.CA().issue_cert("127.0.0.1", not_before=now - datetime.timedelta(days=30),
                                   not_after=now + datetime.timedelta(days=days))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    embedder = start_embedder(tmp_path, "--tls-cert", str(tmp_path / "cert.pem"),
                              "--tls-key", str(tmp_path / "key.pem"))
    try:
        if exits:
            assert embedder.process.wait(30) == 2
            assert "has expired: renew it" in embedder.log()
        else:
            eventually(lambda: "loading model" in embedder.log(), 60)
            assert "expires in 5.0 days: renew it" in embedder.log()
    finally:
        embedder.stop()


def test_no_network_and_no_offline_flag_fails_fast_with_one_message(tmp_path):
    """A hub id that is not in the cache, on a machine without a network
    (here a network namespace of its own, with no interface up: nothing
    leaves the machine) and without HF_HUB_OFFLINE: one clear message before
    torch and transformers load, not a minute of retry warnings."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    started = time.monotonic()
    run = subprocess.run(["unshare", "--net", sys.executable, "-m", "embedder_service",
                          "--model", "some-org/clip-not-cached"], capture_output=True, text=True,
                         timeout=120, cwd=ROOT, env={**env, "HF_HOME": str(tmp_path / "hf")})
    assert run.returncode == 2, run.stderr
    assert time.monotonic() - started < 5
    assert "loading model" not in run.stderr
    assert "some-org/clip-not-cached is not in the Hugging Face cache" in run.stderr
    assert "HF_HUB_OFFLINE=1" in run.stderr and "Retrying" not in run.stderr


def test_a_second_service_on_the_same_lite_file_leaves_the_first_alone(tmp_path, embedder_service):
    """Milvus Lite has one owner: a second search service on the same data
    directory stops (exit 2) and the first one's socket keeps working."""
    first = start_search(tmp_path, embedder_service.address).wait_ready(service=DEPENDENCIES)
    try:
        second = start_search(tmp_path, embedder_service.address)
        assert second.process.wait(60) == 2
        assert "served by another running process" in second.log()
        assert (tmp_path / "data" / ".milvus-lite" / "milvus.sock").exists()  # not unlinked
        with SearchClient(first.address) as client:
            [result] = client.ingest([IngestItem(photo(3), "after")])
            assert result.status == IngestResult.STATUS_INSERTED
            assert client.stats().count == 1
    finally:
        assert first.stop() == 0


NO_LITE = {"PYTHONPATH": str(ROOT / "tests" / "fixtures" / "no-lite")}


def test_the_search_extra_resolves_without_milvus_lite(tmp_path):
    """What `pip install '.[search]'` would install, resolved by pip itself
    (against the package index, with this project's constraints)."""
    report = tmp_path / "report.json"
    run = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet",
                          "--ignore-installed", "--report", str(report), "-c", "constraints.txt",
                          ".[search]"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    names = {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}
    assert "pymilvus" in names and not names & {"milvus-lite", "torch"}, sorted(names)


def test_search_without_milvus_lite_serves_a_milvus_server(tmp_path, embedder_service, milvus_server):
    """Without the lite extra: no --milvus-uri is a start-up error that says
    what to install; with a server's URI the service ingests and searches."""
    lonely = start_search(tmp_path, embedder_service.address, env=NO_LITE)
    assert lonely.process.wait(60) == 2
    assert "pip install 'imagesearch[lite]'" in lonely.log()
    search = start_search(tmp_path, embedder_service.address, "--milvus-uri", milvus_server.uri,
                          "--collection", "no_lite", env=NO_LITE).wait_ready()
    assert "Milvus server v2.3.5" in search.log()  # the version it checked
    try:
        with SearchClient(search.address) as client:
            [result] = client.ingest([IngestItem(photo(5), "no-lite")])
            assert result.status == IngestResult.STATUS_INSERTED
            assert [hit.uri for hit in client.search_text("anything", top_k=1)] == ["no-lite"]
    finally:
        assert search.stop() == 0


def test_a_database_named_in_the_uri_holds_writes_and_reads(tmp_path, embedder_service, milvus_server):
    """`--milvus-uri http://host:port/DB`: rows are written to DB, where the
    collection was made and where searches read (writes take their own path
    through pymilvus, which must carry the database too)."""
    from pymilvus import MilvusClient
    admin = MilvusClient(uri=milvus_server.uri)
    admin.create_database("tenant_b")
    search = start_search(tmp_path, embedder_service.address, "--milvus-uri",
                          f"{milvus_server.uri}/tenant_b", "--collection", "in_b").wait_ready()
    try:
        with SearchClient(search.address) as client:
            [result] = client.ingest([IngestItem(photo(6), "in-b")])
            assert result.status == IngestResult.STATUS_INSERTED
            assert [hit.uri for hit in client.search_text("anything", top_k=1)] == ["in-b"]
        assert "in_b" not in admin.list_collections()  # not in the default database
        assert "in_b" in MilvusClient(uri=f"{milvus_server.uri}/tenant_b").list_collections()
    finally:
        assert search.stop() == 0
        admin.close()


def test_a_second_service_on_a_taken_port_exits_2_and_the_first_keeps_it(tmp_path, embedder_service):
    """gRPC would share a port between processes that both ask for
    SO_REUSEPORT, splitting the calls between them; outside --workers our
    servers do not ask, so a second copy on the port stops at start."""
    (tmp_path / "a").mkdir()
    first = start_search(tmp_path / "a", embedder_service.address).wait_ready()
    try:
        second = Service("search_service", ["--embedder", embedder_service.address,
                                            "--data-dir", str(tmp_path / "b")],
                         tmp_path / "second.log", port=first.port)
        assert second.process.wait(60) == 2
        assert f"cannot listen on 127.0.0.1:{first.port}" in second.log()
        with SearchClient(first.address) as client:
            assert client.stats().count == 0  # the first one still answers
    finally:
        assert first.stop() == 0
