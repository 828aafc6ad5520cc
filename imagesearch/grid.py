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


def write_grid(uris: Sequence[str], out: str | Path) -> Path:
    """Write the grid of `uris` (local image paths) to `out`; return its path."""
    if not uris:
        raise ValueError("no images to put in a grid")
    rows = math.ceil(len(uris) / COLUMNS)
    grid = Image.new("RGB", (THUMB * COLUMNS, THUMB * rows), (255, 255, 255))
    for i, uri in enumerate(uris):
        grid.paste(_thumbnail(uri), ((i % COLUMNS) * THUMB, (i // COLUMNS) * THUMB))
    out = Path(out)
    grid.save(out)
    return out
