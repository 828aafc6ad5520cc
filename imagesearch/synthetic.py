"""Deterministic synthetic "coloured shapes" image set.

Why: the tests need labelled images whose correct search results are known,
without downloading a data set. Each image shows one saturated shape on a
muted, slightly noisy background, so a tiny CLIP trained on these images
(``tools/train_test_model.py``) can find them from their captions.

Layout (ImageNet-style, so the same loaders work on real data)::

    OUT_DIR/train/<colour>_<shape>/<n>.JPEG      n = 0 .. per_label-1

The same ``seed`` always yields byte-identical files (with the same Pillow
build). Every image is drawn from its own RNG keyed by (seed, label, n), so
``per_label`` can grow without changing the images already there.

Only Pillow, numpy and the standard library are used: no torch.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# Saturated shape colours, far apart in RGB; backgrounds never use these.
_COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 30),
    "orange": (255, 140, 0),
    "yellow": (245, 225, 20),
    "green": (20, 170, 40),
    "cyan": (0, 215, 225),
    "blue": (25, 50, 225),
    "purple": (155, 35, 215),
    "pink": (255, 110, 200),
}

COLOURS: tuple[str, ...] = tuple(_COLOUR_RGB)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
LABELS: list[str] = [f"{c}_{s}" for c in COLOURS for s in SHAPES]

# Square canvases only: CLIP preprocessing centre-crops, which would cut
# shapes out of non-square images.
_SIZES = (96, 128, 160)
_JPEG_QUALITY = 90


def caption(label: str) -> str:
    """The text query that should find images of ``label``."""
    colour, shape = label.split("_", 1)
    if colour not in _COLOUR_RGB or shape not in SHAPES:
        raise ValueError(f"unknown label: {label!r}")
    return f"a photo of a {colour} {shape}"


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A muted grey with a slight tint, a gentle gradient and pixel noise.

    Kept to mid greys (low saturation, no near-black or near-white) so it is
    never confused with a shape colour, and textured so it is not flat.
    """
    grey = rng.uniform(85, 170)
    tint = rng.uniform(-12, 12, size=3)
    base = grey + tint
    angle = rng.uniform(0, 2 * math.pi)
    ramp = np.linspace(-1.0, 1.0, size)
    gx, gy = np.meshgrid(ramp, ramp)
    gradient = (gx * math.cos(angle) + gy * math.sin(angle)) * rng.uniform(0, 15)
    img = base[None, None, :] + gradient[:, :, None]
    img = img + rng.normal(0, 6, size=(size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _polygon(cx: float, cy: float, r: float, sides: int, rot: float) -> list[tuple[float, float]]:
    return [
        (cx + r * math.cos(rot + 2 * math.pi * k / sides), cy + r * math.sin(rot + 2 * math.pi * k / sides))
        for k in range(sides)
    ]


def render(label: str, rng: np.random.Generator) -> Image.Image:
    """Draw one image of ``label`` using ``rng`` for every random choice."""
    colour, shape = label.split("_", 1)
    size = int(rng.choice(_SIZES))
    img = Image.fromarray(_background(rng, size), "RGB")

    # Circumradius 20-35% of the canvas; the shape always fits inside it.
    r = rng.uniform(0.2, 0.35) * size
    margin = r + 2
    cx = rng.uniform(margin, size - margin)
    cy = rng.uniform(margin, size - margin)
    # Slight per-image colour jitter so the model learns hues, not exact RGB.
    rgb = tuple(int(np.clip(v + rng.integers(-15, 16), 0, 255)) for v in _COLOUR_RGB[colour])

    draw = ImageDraw.Draw(img)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
    elif shape == "square":
        # Mild rotation only, so it still reads as a square, not a diamond.
        rot = math.pi / 4 + rng.uniform(-0.35, 0.35)
        draw.polygon(_polygon(cx, cy, r, 4, rot), fill=rgb)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy, r, 3, rng.uniform(0, 2 * math.pi)), fill=rgb)
    else:
        raise ValueError(f"unknown label: {label!r}")

    # Light noise over everything, so shapes are not perfectly flat either.
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0, 3, size=(size, size, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def generate(out_dir: str | Path, seed: int, per_label: int) -> list[Path]:
    """Write ``per_label`` images for every label under ``out_dir/train``.

    Returns the written paths, label by label in ``LABELS`` order.
    """
    if per_label < 0:
        raise ValueError("per_label must be >= 0")
    root = Path(out_dir) / "train"
    paths: list[Path] = []
    for li, label in enumerate(LABELS):
        label_dir = root / label
        label_dir.mkdir(parents=True, exist_ok=True)
        for n in range(per_label):
            rng = np.random.default_rng([seed, li, n])
            path = label_dir / f"{n}.JPEG"
            render(label, rng).save(path, format="JPEG", quality=_JPEG_QUALITY)
            paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m imagesearch.synthetic",
        description="Generate a deterministic labelled set of coloured-shape images "
        f"({len(COLOURS)} colours x {len(SHAPES)} shapes) as OUT_DIR/train/<label>/<n>.JPEG.",
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", help="directory to write into")
    parser.add_argument("--seed", type=int, default=0, help="RNG seed (default: 0)")
    parser.add_argument("--per-label", type=int, default=10, help="images per label (default: 10)")
    args = parser.parse_args(argv)
    paths = generate(args.out_dir, seed=args.seed, per_label=args.per_label)
    print(f"wrote {len(paths)} images ({len(LABELS)} labels x {args.per_label}) to {Path(args.out_dir) / 'train'} (seed {args.seed})")


if __name__ == "__main__":
    main()
