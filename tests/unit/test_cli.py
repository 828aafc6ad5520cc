"""The client side: installs and runs without torch or Milvus; folder walk; grid."""
from __future__ import annotations

import subprocess
import sys
import tomllib

from PIL import Image

from imagesearch.cli import find_images
from imagesearch.grid import write_grid
from tests.services import ROOT


SERVER_ONLY = ("torch", "transformers", "pymilvus", "milvus_lite", "prometheus_client",
               "grpc_reflection", "google.rpc")


def _without_server_packages(code: str) -> subprocess.CompletedProcess:
    """Run `code` in a Python where the server-only packages cannot be imported."""
    block = f"import sys; sys.modules.update(dict.fromkeys({SERVER_ONLY!r})); "
    return subprocess.run([sys.executable, "-c", block + code], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)


def test_client_needs_no_server_package():
    """The base install (client, CLI) needs neither torch nor Milvus nor the
    server runtime: importing the client registers no Prometheus metrics in
    the caller's own registry."""
    base = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {d.split(">")[0].split("=")[0].split("<")[0] for d in base}
    assert not names & {"torch", "transformers", "pymilvus", "prometheus-client",
                        "grpcio-reflection", "googleapis-common-protos"}, names
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
