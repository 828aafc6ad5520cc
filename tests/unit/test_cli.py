"""The client side: installs and runs without torch or Milvus; folder walk; grid."""
from __future__ import annotations

import subprocess
import sys
import tomllib

from PIL import Image

from imagesearch.cli import find_images
from imagesearch.grid import write_grid
from tests.services import ROOT


def test_client_needs_neither_torch_nor_milvus():
    base = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not [d for d in base if d.split(">")[0].split("=")[0] in ("torch", "transformers", "pymilvus")]
    blocked = ("import sys; sys.modules.update(torch=None, transformers=None, pymilvus=None, "
               "milvus_lite=None); import imagesearch.cli as cli, imagesearch.client; "
               "sys.exit(cli.main(['health', '127.0.0.1:1']))")
    run = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert run.returncode == 1 and run.stdout.strip() == "UNREACHABLE", run.stderr


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
