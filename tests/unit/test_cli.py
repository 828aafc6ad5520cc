"""The client side: installs and runs without torch or Milvus; folder walk; grid."""
from __future__ import annotations

import re
import subprocess
import sys
import tomllib

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from PIL import Image

from imagesearch import errors
from imagesearch.cli import _hint, build_parser, find_images, with_port
from imagesearch.grid import write_grid
from tests.services import ROOT


SERVER_ONLY = ("torch", "transformers", "pymilvus", "milvus_lite", "prometheus_client",
               "grpc_reflection")


def _without_server_packages(code: str) -> subprocess.CompletedProcess:
    """Run `code` in a Python where the server-only packages cannot be imported."""
    block = f"import sys; sys.modules.update(dict.fromkeys({SERVER_ONLY!r})); "
    return subprocess.run([sys.executable, "-c", block + code], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)


def test_client_needs_no_server_package():
    """The base install (client, CLI) needs neither torch nor Milvus nor the
    server runtime: importing the client registers no Prometheus metrics in
    the caller's own registry. (It reads google.rpc error details, for its
    typed errors: googleapis-common-protos is a client dependency.)"""
    base = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {d.split(">")[0].split("=")[0].split("<")[0] for d in base}
    assert not names & {"torch", "transformers", "pymilvus", "prometheus-client",
                        "grpcio-reflection"}, names
    run = _without_server_packages("import imagesearch.cli as cli, imagesearch.client; "
                                   "sys.exit(cli.main(['health', '127.0.0.1:1']))")
    assert run.returncode == 1 and run.stdout.strip() == "UNREACHABLE", run.stderr


def test_service_commands_without_their_extra_say_what_to_install():
    run = _without_server_packages("from imagesearch.launch import embedder; embedder()")
    assert run.returncode == 2
    assert "imgsearch-embedder needs the embedder extra" in run.stderr
    assert "pip install 'imagesearch[embedder]'" in run.stderr


def test_find_images_is_recursive_and_case_blind(tmp_path):
    for name in ("a/b/one.JPEG", "a/two.png", "three.WebP", "four.gif", "five.TIFF", "six.bmp",
                 "notes.txt", "a/b/c/seven.jpg"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert sorted(p.name for p in find_images(tmp_path)) == sorted(
        ["one.JPEG", "two.png", "three.WebP", "four.gif", "five.TIFF", "six.bmp", "seven.jpg"])


def test_grid_layout_and_unreadable_uris(tmp_path):
    red = tmp_path / "red.png"
    Image.new("RGB", (40, 90), (255, 0, 0)).save(red)
    out = write_grid([str(red)] * 6 + ["/nowhere/missing.jpg"], tmp_path / "grid.png")
    with Image.open(out) as grid:
        assert grid.size == (750, 300)  # 5 columns of 150, 2 rows
        assert grid.getpixel((75, 75)) == (255, 0, 0)
        assert grid.getpixel((150 + 75, 150 + 75)) != (255, 0, 0)  # the placeholder cell
        assert grid.getpixel((3 * 150 + 75, 150 + 75)) == (255, 255, 255)  # empty cell


class _Failed(grpc.RpcError):
    """A failed call as grpc gives it: for the mapping alone (no server can
    send an arbitrary message with a given reason on demand)."""

    def __init__(self, code, message, *details):
        self._code, self._message = code, message
        status = status_pb2.Status(code=code.value[0], message=message)
        for detail in details:
            status.details.add().Pack(detail)
        self._trailing = (("grpc-status-details-bin", status.SerializeToString()),) if details else ()

    def code(self):
        return self._code

    def details(self):
        return self._message

    def trailing_metadata(self):
        return self._trailing


def _info(reason):
    return error_details_pb2.ErrorInfo(reason=reason, domain="imagesearch")


@pytest.mark.parametrize("reason, kind, hint", [
    ("EMBEDDER_UNAVAILABLE", errors.EmbedderUnavailable, "its embedder does not answer"),
    ("MILVUS_UNAVAILABLE", errors.MilvusUnavailable, "Milvus does not answer"),
    ("", errors.Unavailable, "no search service answers"),
])
def test_errors_and_hints_follow_code_and_reason_not_wording(reason, kind, hint):
    """The CLI picked its hints by the first words of the servers' messages.
    Now the error's type comes from the status code and the ErrorInfo
    reason: reworded messages keep their hints."""
    details = [_info(reason)] if reason else []
    for words in ("embedder at h:1 is unavailable: ...", "Milvus at x is unavailable", "reworded"):
        error = errors.from_rpc_error(_Failed(grpc.StatusCode.UNAVAILABLE, words, *details))
        assert type(error) is kind and error.reason == reason and error.details() == words
        assert hint in _hint(error, "h:2")


def test_field_violations_and_model_mismatch_are_typed():
    bad = error_details_pb2.BadRequest(field_violations=[
        error_details_pb2.BadRequest.FieldViolation(field="top_k", description="too big")])
    error = errors.from_rpc_error(_Failed(grpc.StatusCode.INVALID_ARGUMENT, "x",
                                          _info("INVALID_ARGUMENT"), bad))
    assert isinstance(error, errors.InvalidArgument) and error.field_violations == (("top_k", "too big"),)
    error = errors.from_rpc_error(_Failed(grpc.StatusCode.FAILED_PRECONDITION, "x",
                                          _info("MODEL_MISMATCH")))
    assert isinstance(error, errors.ModelMismatch) and isinstance(error, errors.FailedPrecondition)
    assert isinstance(error, grpc.RpcError) and error.code() == grpc.StatusCode.FAILED_PRECONDITION
    other = error_details_pb2.ErrorInfo(reason="MODEL_MISMATCH", domain="example.com")
    assert type(errors.from_rpc_error(_Failed(grpc.StatusCode.FAILED_PRECONDITION, "x", other))) \
        is errors.FailedPrecondition  # another domain's reasons are not ours


def test_subcommand_help_leads_with_its_own_options_and_ends_with_examples():
    text = build_parser().commands["search"].format_help()
    options = text[text.index("\noptions:"):]  # past the usage line
    assert options.index("  --min-score") < options.index("connection (also accepted before") \
        < options.index("  --tls-ca") < options.index("examples:\n  imgsearch search a white dog")
    run = subprocess.run([sys.executable, "-m", "imagesearch.cli", "--version"], capture_output=True,
                         text=True, timeout=60, cwd=ROOT)
    assert run.returncode == 0 and re.fullmatch(r"imgsearch \S+\n", run.stdout), run.stdout


@pytest.mark.parametrize("server, dialled", [
    ("localhost", "localhost:50052"), ("10.0.0.1", "10.0.0.1:50052"), ("[::1]", "[::1]:50052"),
    ("h:7", "h:7"), ("[::1]:7", "[::1]:7"), ("unix:/run/s.sock", "unix:/run/s.sock"),
    ("dns:///search:7", "dns:///search:7")])
def test_a_server_without_a_port_gets_the_search_services(server, dialled):
    assert with_port(server) == dialled  # gRPC's own default would be 443
