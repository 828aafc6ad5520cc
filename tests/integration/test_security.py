"""TLS on both endpoints, mutual TLS from the search service to the embedder,
and bearer tokens on the search API: each with its positive and negative
cases, on real processes. The certificates are made here (trustme)."""
from __future__ import annotations

import os
import socket
import ssl
from pathlib import Path

import grpc
import pytest
import trustme
from cryptography import x509

from imagesearch.client import EmbedderClient, SearchClient, Security
from imagesearch.health import status
from imagesearch.serving import DEPENDENCIES
from imagesearch.security import channel_credentials
from tests.services import (container_env, eventually, imgsearch, metric, rendered_overlay, scrape,
                            start_embedder, start_search, status_of)

TOKENS = ("first-token-3f9a", "second-token-77c1")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1, a client certificate, and
    a second CA that trusts none of them; all as PEM files."""
    root = tmp_path_factory.mktemp("pki")
    ca, stranger = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("search-service")
    files = {"ca": ca.cert_pem, "stranger_ca": stranger.cert_pem,
             "server_cert": server.cert_chain_pems[0], "server_key": server.private_key_pem,
             "client_cert": client.cert_chain_pems[0], "client_key": client.private_key_pem}
    paths = {}
    for name, blob in files.items():
        paths[name] = str(root / f"{name}.pem")
        blob.write_to_path(paths[name])
    return paths


@pytest.fixture(scope="module")
def secure_system(pki, tmp_path_factory):
    """An embedder that requires client certificates, and a search service that
    serves TLS, presents its client certificate and requires a token (one
    from the environment, one from a file)."""
    tmp = tmp_path_factory.mktemp("secure")
    (tmp / "tokens").write_text(f"\n{TOKENS[1]}\n")
    embedder = start_embedder(tmp, "--tls-cert", pki["server_cert"], "--tls-key", pki["server_key"],
                              "--tls-client-ca", pki["ca"])
    embedder.wait_ready(credentials=channel_credentials(pki["ca"], pki["client_cert"],
                                                        pki["client_key"]))
    search = start_search(tmp, embedder.address, "--tls-cert", pki["server_cert"],
                          "--tls-key", pki["server_key"], "--embedder-tls-ca", pki["ca"],
                          "--embedder-tls-cert", pki["client_cert"],
                          "--embedder-tls-key", pki["client_key"],
                          "--auth-token-file", str(tmp / "tokens"),
                          env={"SEARCH_AUTH_TOKEN": TOKENS[0]})
    search.wait_ready(credentials=channel_credentials(pki["ca"]))
    yield embedder, search
    assert search.stop() == 0 and embedder.stop() == 0
    for token in TOKENS:  # never logged
        assert token not in search.log() and token not in embedder.log()


@pytest.mark.parametrize("token", TOKENS)
def test_tls_and_a_valid_token_work(pki, secure_system, token):
    _, search = secure_system
    with SearchClient(search.address, security=Security(tls_ca=pki["ca"], token=token)) as client:
        assert client.search_text("a photo of a red circle", top_k=3) == []  # empty, but answered
        assert client.stats().collection == "images"


@pytest.mark.parametrize("token", ["", "wrong-token", TOKENS[0] + "x", TOKENS[0][:-1]])
def test_missing_or_wrong_token_is_unauthenticated(pki, secure_system, token):
    _, search = secure_system
    with SearchClient(search.address, security=Security(tls_ca=pki["ca"], token=token)) as client:
        for call in (lambda: client.search_text("a red circle"), client.stats,
                     lambda: list(client.ingest([]))):
            error = status_of(call)
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "authorization: Bearer TOKEN" in error.details()


def test_a_token_needs_the_bearer_scheme(pki, secure_system):
    _, search = secure_system
    with grpc.secure_channel(search.address, channel_credentials(pki["ca"])) as channel:
        from imagesearch.v1 import search_pb2, search_pb2_grpc
        stub = search_pb2_grpc.ImageSearchServiceStub(channel)
        error = status_of(lambda: stub.GetStats(search_pb2.GetStatsRequest(), timeout=10,
                                                metadata=(("authorization", f"Basic {TOKENS[0]}"),)))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED


def test_health_needs_no_token(pki, secure_system):
    _, search = secure_system
    assert status(search.address, credentials=channel_credentials(pki["ca"])) == "SERVING"


def test_plaintext_or_an_untrusted_ca_cannot_connect(pki, secure_system):
    embedder, search = secure_system
    for address in (search.address, embedder.address):
        assert status(address) == "UNREACHABLE"  # plaintext to a TLS port
        assert status(address, credentials=channel_credentials(pki["stranger_ca"])) == "UNREACHABLE"
    with SearchClient(search.address, timeout_s=5,
                      security=Security(tls_ca=pki["stranger_ca"], token=TOKENS[0])) as client:
        assert status_of(client.stats).code() == grpc.StatusCode.UNAVAILABLE


def test_probes_reach_plaintext_health_while_the_service_port_is_tls_only(secure_system):
    """The tls overlay, checked against the real services started with TLS:
    every probe of each Deployment targets the port its *_HEALTH_PORT sets,
    not the TLS service port, and no Service exposes it; on the live
    processes that port answers each probe's health name in plaintext while
    the service port refuses plaintext."""
    live = dict(zip(("embedder", "search"), secure_system))
    objects = rendered_overlay("tls")
    deployments = [o for o in objects if o["kind"] == "Deployment"]
    assert {d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
            for d in deployments} == set(live)
    for deployment in deployments:
        pod = deployment["spec"]["template"]
        component = pod["metadata"]["labels"]["app.kubernetes.io/component"]
        container = pod["spec"]["containers"][0]
        env = container_env(objects, container)
        prefix = component.upper() + "_"
        health, main = int(env[prefix + "HEALTH_PORT"]), int(env[prefix + "PORT"])
        assert env.get(prefix + "TLS_CERT") and health != main, env
        named = {p["name"]: p["containerPort"] for p in container["ports"] if "name" in p}
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = container[kind]["grpc"]
            assert named.get(probe["port"], probe["port"]) == health, (component, kind, probe)
            assert status(f"127.0.0.1:{live[component].health_port}",
                          service=probe.get("service", "")) == "SERVING", (component, kind)
        assert status(live[component].address) == "UNREACHABLE"  # plaintext to the TLS port
        for service in (o for o in objects if o["kind"] == "Service"
                        and o["spec"].get("selector", {}).get("app.kubernetes.io/component") == component):
            exposed = {named.get(p.get("targetPort"), p.get("targetPort", p["port"]))
                       for p in service["spec"]["ports"]}
            assert health not in exposed, service["metadata"]["name"]


def test_embedder_refuses_a_client_without_a_certificate(pki, secure_system, tmp_path):
    embedder, _ = secure_system
    with EmbedderClient(embedder.address, timeout_s=5, security=Security(tls_ca=pki["ca"])) as client:
        assert status_of(client.model_info).code() == grpc.StatusCode.UNAVAILABLE
    with EmbedderClient(embedder.address, timeout_s=5, security=Security(
            tls_ca=pki["ca"], tls_cert=pki["client_cert"], tls_key=pki["client_key"])) as client:
        assert client.model_info().model.dim > 0
    # A search service without a client certificate reports the embedder down, and says why.
    search = start_search(tmp_path, embedder.address, "--embedder-tls-ca", pki["ca"])
    try:
        search.wait_ready(service="liveness")
        with SearchClient(search.address, timeout_s=10) as client:
            error = status_of(lambda: client.search_text("a red circle"))
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert f"embedder at {embedder.address} is unavailable" in error.details()
        assert status(search.address, service=DEPENDENCIES) == "NOT_SERVING"
    finally:
        assert search.stop() == 0


def test_cli_with_tls_and_a_token_from_the_environment(pki, secure_system):
    _, search = secure_system
    run = imgsearch(search.address, "--tls-ca", pki["ca"], "stats")
    assert run.returncode == 1 and "UNAUTHENTICATED" in run.stderr and "IMGSEARCH_TOKEN" in run.stderr
    env = {**os.environ, "IMGSEARCH_TOKEN": TOKENS[1]}
    run = imgsearch(search.address, "--tls-ca", pki["ca"], "stats", env=env)
    assert run.returncode == 0 and "collection images" in run.stdout, run.stderr
    run = imgsearch(search.address, "--tls-ca", pki["ca"], "health")
    assert run.returncode == 0 and "SERVING" in run.stdout


def test_tokens_never_reach_a_command_line(secure_system):
    _, search = secure_system
    cmdline = open(f"/proc/{search.process.pid}/cmdline", "rb").read().decode()
    assert not any(token in cmdline for token in TOKENS)


@pytest.mark.parametrize("method", ["SearchByText", "GetStats", "Ingest"])
def test_garbage_is_refused_by_auth_first_then_as_malformed(pki, secure_system, method):
    """Bytes that are no request: UNAUTHENTICATED without a token, whatever
    they are; INVALID_ARGUMENT with one; each call counted in the metrics."""
    _, search = secure_system
    garbage = b"\x0a\x05abc"  # a string field cut short: not parseable
    path = f"/imagesearch.v1.ImageSearchService/{method}"
    before = metric(scrape(search), "grpc_server_handled_total", grpc_method=method)
    with grpc.secure_channel(search.address, channel_credentials(pki["ca"])) as channel:
        if method == "Ingest":
            call = channel.stream_stream(path, request_serializer=None, response_deserializer=None)
            send = lambda **kw: list(call(iter([garbage]), timeout=10, **kw))  # noqa: E731
        else:
            call = channel.unary_unary(path, request_serializer=None, response_deserializer=None)
            send = lambda **kw: call(garbage, timeout=10, **kw)  # noqa: E731
        assert status_of(send).code() == grpc.StatusCode.UNAUTHENTICATED
        error = status_of(lambda: send(metadata=(("authorization", f"Bearer {TOKENS[0]}"),)))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        assert "not a valid message" in error.details()
    after = metric(scrape(search), "grpc_server_handled_total", grpc_method=method)
    assert after - before == 2
    assert "Traceback" not in search.log()


def _listening_tcp_ports(pid: int) -> set[int]:
    """TCP ports process `pid` listens on, from /proc."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd) if fd.is_symlink() else ""
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_no_listening_socket_of_the_search_process_serves_milvus(secure_system, tmp_path):
    """Milvus Lite runs inside the search process: it must not be reachable
    around the token. The process listens on its API, health and metrics
    ports only (none speaks Milvus), and Lite's Unix socket sits in a 0700
    folder."""
    from pymilvus import MilvusClient, MilvusException
    _, search = secure_system
    ports = _listening_tcp_ports(search.process.pid)
    assert ports == {search.port, search.metrics_port, search.health_port}, ports
    for port in ports:
        with pytest.raises(MilvusException):
            MilvusClient(uri=f"http://127.0.0.1:{port}", timeout=3).list_collections()
    folder = next(Path(search.log_path.parent).rglob(".milvus-lite"))
    assert folder.stat().st_mode & 0o777 == 0o700


def test_a_rewritten_token_file_takes_effect_without_a_restart(tmp_path, embedder_service):
    """Rotation: a token added to the file works within seconds, and one
    removed from it stops working; the process is never restarted."""
    tokens = tmp_path / "tokens"
    tokens.write_text("old-token-1111\n")
    search = start_search(tmp_path, embedder_service.address, "--auth-token-file",
                          str(tokens)).wait_ready()

    def accepted(token: str) -> bool:
        with SearchClient(search.address, timeout_s=10, security=Security(token=token)) as client:
            try:
                client.stats("no_such")
            except grpc.RpcError as exc:  # NOT_FOUND once past authentication
                return exc.code() != grpc.StatusCode.UNAUTHENTICATED
            raise AssertionError("a collection that does not exist was found")
    try:
        assert accepted("old-token-1111") and not accepted("new-token-2222")
        tokens.write_text("old-token-1111\nnew-token-2222\n")
        eventually(lambda: accepted("new-token-2222"), 10)
        tokens.write_text("new-token-2222\n")
        eventually(lambda: not accepted("old-token-1111"), 10)
        assert accepted("new-token-2222")
        assert "token file" in search.log() and "2222" not in search.log()
    finally:
        assert search.stop() == 0


def _served_serial(port: int, ca: str) -> int:
    """The serial number of the certificate a TLS handshake with the port gets."""
    context = ssl.create_default_context(cafile=ca)
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True)).serial_number


def _install(cert: trustme.LeafCert, cert_path: Path, key_path: Path, key=None) -> None:
    """Replace the files as a Secret volume update does: each one atomically."""
    for blob, path in ((cert.cert_chain_pems[0], cert_path), (key or cert.private_key_pem, key_path)):
        blob.write_to_path(str(path) + ".new")
        os.replace(str(path) + ".new", path)


def test_a_renewed_certificate_is_served_without_a_restart(embedder_service, tmp_path):
    """cert-manager renews certificates in place (day 60 of 90); servers read
    them only at start served the old one until it expired. Now a new
    handshake gets the renewed certificate, and a key that does not match
    its certificate never replaces a working pair."""
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    cert_path, key_path = tmp_path / "tls.crt", tmp_path / "tls.key"
    first, renewed, stranger = (ca.issue_cert("127.0.0.1", "localhost") for _ in range(3))
    _install(first, cert_path, key_path)
    search = start_search(tmp_path, embedder_service.address, "--tls-cert", str(cert_path),
                          "--tls-key", str(key_path))
    ca_path = str(tmp_path / "ca.pem")
    search.wait_ready(credentials=channel_credentials(ca_path))
    serial = {name: x509.load_pem_x509_certificate(cert.cert_chain_pems[0].bytes()).serial_number
              for name, cert in (("first", first), ("renewed", renewed), ("stranger", stranger))}
    try:
        assert _served_serial(search.port, ca_path) == serial["first"]
        _install(renewed, cert_path, key_path)
        eventually(lambda: _served_serial(search.port, ca_path) == serial["renewed"], 30)
        with SearchClient(search.address, security=Security(tls_ca=ca_path)) as client:
            assert client.stats().collection == "images"
        _install(stranger, cert_path, key_path, key=renewed.private_key_pem)  # a mismatched pair
        assert _served_serial(search.port, ca_path) == serial["renewed"]
        eventually(lambda: "is not the key of the certificate" in search.log(), 10)
        assert search.process.poll() is None
    finally:
        assert search.stop() == 0, search.log()
