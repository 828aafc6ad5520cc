"""Make the small real photographs under tests/fixtures/photos/ (run once).

The sources are public-domain / CC0 photographs that ship inside the
scikit-image wheel (skimage/data/, not the pooch-downloaded extras); see
tests/fixtures/photos/README.md for each one's origin and licence. The tests
never need scikit-image: they read the JPEGs this script wrote and which are
committed.

Where the photos are read from, first that works:
  --wheel PATH      a scikit-image wheel (.whl), e.g. from
                    `pip download scikit-image==0.26.0 --no-deps -d /tmp/skw`
  --data-dir DIR    a directory holding astronaut.png, coffee.png, ...
  an installed scikit-image (found without importing it)

    python tools/make_test_photos.py --wheel /tmp/skw/scikit_image-0.26.0-*.whl

Only Pillow is needed. Output is deterministic for a given Pillow/libjpeg.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import sys
import zipfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "tests" / "fixtures" / "photos"

MAX_FILE_BYTES = 100_000
MAX_TOTAL_BYTES = 500_000


def _wide(src: Image.Image) -> Image.Image:
    # 599x400: the resized long edge (int(224 * 599 / 400) = 335) is odd,
    # so the centre crop offset is a rounded-down half.
    return src.convert("RGB").crop((0, 0, 599, 400))


def _tall(src: Image.Image) -> Image.Image:
    # 301x512 portrait crop around the astronaut's face.
    return src.convert("RGB").crop((106, 0, 407, 512))


def _small(src: Image.Image) -> Image.Image:
    # 150x100: shorter than the 224 crop, so preprocessing upsamples.
    return src.convert("RGB").resize((150, 100), Image.Resampling.LANCZOS)


def _gray(src: Image.Image) -> Image.Image:
    # 512x400 single-channel ("L") JPEG.
    return src.convert("L").crop((0, 56, 512, 456))


def _rocket(src: Image.Image) -> Image.Image:
    # 640x427, re-encoded smaller.
    return src.convert("RGB")


# output name -> (source file in skimage/data, transform, JPEG quality)
PHOTOS = {
    "coffee_wide.jpg": ("coffee.png", _wide, 80),
    "astronaut_tall.jpg": ("astronaut.png", _tall, 85),
    "chelsea_small.jpg": ("chelsea.png", _small, 90),
    "camera_gray.jpg": ("camera.png", _gray, 85),
    "rocket.jpg": ("rocket.jpg", _rocket, 75),
}


def _reader(args: argparse.Namespace):
    if args.wheel:
        zf = zipfile.ZipFile(args.wheel)
        return lambda name: zf.read(f"skimage/data/{name}")
    if args.data_dir:
        base = Path(args.data_dir)
        return lambda name: (base / name).read_bytes()
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("scikit-image not found: pass --wheel or --data-dir "
                 "(pip download scikit-image==0.26.0 --no-deps -d /tmp/skw)")
    base = Path(list(spec.submodule_search_locations)[0]) / "data"
    return lambda name: (base / name).read_bytes()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheel", help="scikit-image wheel to read skimage/data/ from")
    parser.add_argument("--data-dir", help="directory with the skimage/data files")
    parser.add_argument("--out", default=str(OUT_DIR), help="output directory")
    args = parser.parse_args(argv)
    read = _reader(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    total = 0
    for name, (source, transform, quality) in PHOTOS.items():
        raw = read(source)
        with Image.open(io.BytesIO(raw)) as src:
            photo = transform(src)
        buf = io.BytesIO()
        photo.save(buf, "JPEG", quality=quality, optimize=True)
        data = buf.getvalue()
        if len(data) > MAX_FILE_BYTES:
            sys.exit(f"{name} is {len(data)} bytes, above {MAX_FILE_BYTES}: lower its quality")
        (out / name).write_bytes(data)
        total += len(data)
        print(f"{name}: {photo.width}x{photo.height} {photo.mode}, {len(data)} bytes "
              f"(from {source}, sha256 {hashlib.sha256(raw).hexdigest()[:16]})")
    if total > MAX_TOTAL_BYTES:
        sys.exit(f"photos total {total} bytes, above {MAX_TOTAL_BYTES}")
    print(f"total {total} bytes in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
