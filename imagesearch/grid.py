"""The tutorial's result picture: 150x150 thumbnails, 5 per row, best first."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

THUMB = 150
COLUMNS = 5


def _thumbnail(uri: str) -> Image.Image:
    try:
        with Image.open(uri) as image:
            return ImageOps.exif_transpose(image).convert("RGB").resize((THUMB, THUMB))
    except (OSError, UnidentifiedImageError, ValueError):
        # The uri is the caller's: it may not be a readable local file here.
        placeholder = Image.new("RGB", (THUMB, THUMB), (128, 128, 128))
        ImageDraw.Draw(placeholder).text((6, 6), "not readable:\n" + Path(uri).name[:20],
                                         fill=(255, 255, 255))
        return placeholder


def _label(tile: Image.Image, text: str) -> None:
    """`text` in white on a dark band across the tile's top."""
    draw = ImageDraw.Draw(tile)
    draw.rectangle((0, 0, THUMB, 14), fill=(0, 0, 0))
    draw.text((3, 2), text, fill=(255, 255, 255))


def write_grid(uris: Sequence[str], out: str | Path, labels: Sequence[str] | None = None) -> Path:
    """Write the grid of `uris` (local image paths) to `out`, each tile with
    its label (e.g. rank and score) when `labels` are given; return its path."""
    if not uris:
        raise ValueError("no images to put in a grid")
    rows = math.ceil(len(uris) / COLUMNS)
    grid = Image.new("RGB", (THUMB * COLUMNS, THUMB * rows), (255, 255, 255))
    for i, uri in enumerate(uris):
        tile = _thumbnail(uri)
        if labels:
            _label(tile, labels[i])
        grid.paste(tile, ((i % COLUMNS) * THUMB, (i // COLUMNS) * THUMB))
    out = Path(out)
    grid.save(out)
    return out
