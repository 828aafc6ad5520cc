"""Photo-like benchmark JPEGs: ~500x375 crops of the real photographs in
tests/fixtures/photos, each with its own crop, flip and colour balance, so
decoding costs what a real photo costs (not flat colour, not noise)."""
from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

PHOTOS = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "photos"
SIZE = (500, 375)


def make_jpegs(count: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    sources = [ImageOps.exif_transpose(Image.open(p)).convert("RGB") for p in sorted(PHOTOS.glob("*.jpg"))]
    out = []
    for _ in range(count):
        src = sources[rng.integers(len(sources))]
        scale = rng.uniform(0.5, 1.0)
        w, h = int(src.width * scale), int(src.height * scale)
        x, y = rng.integers(0, src.width - w + 1), rng.integers(0, src.height - h + 1)
        image = src.crop((x, y, x + w, y + h)).resize(SIZE, Image.BICUBIC)
        if rng.random() < 0.5:
            image = ImageOps.mirror(image)
        image = ImageEnhance.Color(image).enhance(rng.uniform(0.6, 1.4))
        image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.8, 1.2))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def unique(jpeg: bytes, n: int) -> bytes:
    """The same picture with other bytes (a trailer after the JPEG end marker,
    which decoders ignore): a new image id for ingest, the same decode cost."""
    return jpeg + b"\0" + n.to_bytes(8, "little")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--count", type=int, default=64)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for i, data in enumerate(make_jpegs(args.count)):
        (args.out / f"{i:05d}.jpg").write_bytes(data)
