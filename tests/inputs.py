"""Inputs the tests share: image files of every kind the embedder must
decode like transformers does (CASES), hostile ones (bombs, corrupt bytes),
and hypothesis strategies for damaged images and filters."""
from __future__ import annotations

import functools
import io
import struct
import zlib

import numpy as np
from hypothesis import strategies as st
from PIL import Image

from imagesearch.v1 import search_pb2
from tests.services import ROOT

PHOTOS_DIR = ROOT / "tests" / "fixtures" / "photos"
PHOTO_NAMES = ["coffee_wide.jpg", "astronaut_tall.jpg", "chelsea_small.jpg",
               "camera_gray.jpg", "rocket.jpg"]

CORRUPT = b"\xff\xd8\xff\xe0 this is not really a jpeg"


@functools.lru_cache(maxsize=None)
def photo_bytes(name: str) -> bytes:
    return (PHOTOS_DIR / name).read_bytes()


def photo(name: str) -> Image.Image:
    with Image.open(io.BytesIO(photo_bytes(name))) as im:
        im.load()
        return im.copy()


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **params)
    return buf.getvalue()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (struct.pack(">I", len(payload)) + kind + payload
            + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))


def png_from_rows(width: int, height: int, bit_depth: int, color_type: int, rows) -> bytes:
    """A PNG written by hand: `rows` yields each row's raw bytes (filter 0 is
    prepended), compressed as a stream so huge images need little memory."""
    comp = zlib.compressobj(9)
    parts, pending = [], []
    for row in rows:
        pending.append(b"\x00" + row)
        if len(pending) >= 1024:
            parts.append(comp.compress(b"".join(pending)))
            pending = []
    parts.append(comp.compress(b"".join(pending)))
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
            + png_chunk(b"IDAT", b"".join(parts)) + png_chunk(b"IEND", b""))


@functools.lru_cache(maxsize=None)
def bomb_png(width: int, height: int) -> bytes:
    """A valid 1-bit grayscale PNG of zeros: ~110 KB for 30000x30000, which
    would be 900 MB once decoded (2.7 GB as RGB)."""
    row = bytes((width + 7) // 8)
    return png_from_rows(width, height, 1, 0, (row for _ in range(height)))


def scan_bomb(side: int, scans: int) -> bytes:
    """A progressive JPEG whose last refinement scan is repeated `scans`
    times more: each copy is a few bytes, and each is a pass over the image."""
    data = encode(Image.new("RGB", (side, side), (200, 100, 50)), "JPEG", progressive=True)
    end = data.rindex(b"\xff\xd9")
    last_scan = data[data.rindex(b"\xff\xda"):end]
    return data[:end] + last_scan * scans + b"\xff\xd9"


def with_exif_orientation(image: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, "JPEG", quality=90, exif=exif.tobytes())


def _noise_low_byte(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint16)


# --------------------------------------------------------------------------
# parity cases: name -> () -> (bytes, reference image or None)
# None means: the image as Pillow opens it, made upright by exif_transpose.


def _sized(name: str, width: int, height: int):
    def build():
        src = photo(name).convert("RGB").resize((width, height), Image.Resampling.LANCZOS)
        return encode(src, "PNG", compress_level=1), None
    return build


def _rgba_gradient():
    rgb = photo("coffee_wide.jpg")
    alpha = np.tile(np.linspace(0, 255, rgb.width).round().astype(np.uint8), (rgb.height, 1))
    rgba = rgb.copy()
    rgba.putalpha(Image.fromarray(alpha))
    return encode(rgba, "PNG", compress_level=1), None


def _la_gradient():
    gray = photo("camera_gray.jpg")
    alpha = np.tile(np.linspace(255, 0, gray.height).round().astype(np.uint8)[:, None],
                    (1, gray.width))
    la = Image.merge("LA", (gray, Image.fromarray(alpha)))
    return encode(la, "PNG", compress_level=1), None


def _palette(transparency: bool, fmt: str):
    def build():
        p = photo("astronaut_tall.jpg").quantize(colors=64, method=Image.Quantize.MEDIANCUT)
        params = {}
        if transparency:  # the background colour at the top-left turns transparent
            params["transparency"] = p.getpixel((0, 0))
        data = encode(p, fmt, **params)
        with Image.open(io.BytesIO(data)) as im:
            assert im.mode == "P"
            assert ("transparency" in im.info) == transparency
        return data, None
    return build


def _gray_transparency():
    gray = photo("camera_gray.jpg")
    return encode(gray, "PNG", transparency=gray.getpixel((0, 0)), compress_level=1), None


def _rgb_colour_key():
    rgb = photo("chelsea_small.jpg")
    return encode(rgb, "PNG", transparency=rgb.getpixel((0, 0))), None


def _bilevel():
    return encode(photo("camera_gray.jpg").convert("1"), "PNG"), None


def _cmyk_jpeg():
    data = encode(photo("coffee_wide.jpg").convert("CMYK"), "JPEG", quality=90)
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode == "CMYK"
    return data, None


def _png16_gray():
    # high byte = the photo, low byte = noise: the 8-bit photo is the reference,
    # since Pillow's own I;16 -> RGB conversion clips everything above 255.
    gray = np.asarray(photo("camera_gray.jpg"))
    a16 = (gray.astype(np.uint16) << 8) | _noise_low_byte(gray.shape)
    data = encode(Image.fromarray(a16), "PNG", compress_level=1)
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode.startswith("I;16") or im.mode == "I", im.mode
    return data, Image.fromarray(gray)


def _png16_rgb():
    # Pillow reads 16-bit RGB as 8-bit RGB (high byte): reference = the photo.
    rgb = np.asarray(photo("chelsea_small.jpg"))
    a16 = (rgb.astype(np.uint16) << 8) | _noise_low_byte(rgb.shape, seed=1)
    rows = (a16[y].astype(">u2").tobytes() for y in range(a16.shape[0]))
    data = png_from_rows(a16.shape[1], a16.shape[0], 16, 2, rows)
    return data, Image.fromarray(rgb)


def _exif(orientation: int):
    def build():
        return with_exif_orientation(photo("astronaut_tall.jpg"), orientation), None
    return build


def _animated_gif():
    frames = [photo(n).convert("RGB").resize((150, 100)) for n in
              ("chelsea_small.jpg", "coffee_wide.jpg", "rocket.jpg")]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:],
                  duration=100, loop=0)
    with Image.open(io.BytesIO(data)) as im:
        assert im.n_frames == 3 and im.is_animated
    return data, None


CASES = {
    **{f"photo:{n}": (lambda n=n: (photo_bytes(n), None)) for n in PHOTO_NAMES},
    # sizes: exactly the crop, one pixel over, tall/wide, smaller than the crop,
    # extreme aspect ratios, a single pixel, much larger than the crop
    "size:224x224": _sized("coffee_wide.jpg", 224, 224),
    "size:225x224": _sized("coffee_wide.jpg", 225, 224),
    "size:223x331": _sized("astronaut_tall.jpg", 223, 331),
    "size:63x65": _sized("chelsea_small.jpg", 63, 65),
    "size:900x31": _sized("rocket.jpg", 900, 31),
    "size:31x900": _sized("astronaut_tall.jpg", 31, 900),
    "size:1x1": _sized("coffee_wide.jpg", 1, 1),
    "size:1601x1067": _sized("rocket.jpg", 1601, 1067),
    # pixel modes
    "png:RGBA-alpha-gradient": _rgba_gradient,
    "png:LA-alpha-gradient": _la_gradient,
    "png:P": _palette(False, "PNG"),
    "png:P-transparency": _palette(True, "PNG"),
    "png:L-transparency": _gray_transparency,
    "png:RGB-colour-key": _rgb_colour_key,
    "png:1-bilevel": _bilevel,
    "png:16-bit-gray": _png16_gray,
    "png:16-bit-RGB": _png16_rgb,
    "jpeg:CMYK": _cmyk_jpeg,
    "jpeg:exif-orientation-3": _exif(3),
    "jpeg:exif-orientation-6": _exif(6),
    "jpeg:exif-orientation-8": _exif(8),
    # containers
    "gif:P": _palette(False, "GIF"),
    "gif:P-transparency": _palette(True, "GIF"),
    "gif:animated": _animated_gif,
    "webp:lossy": lambda: (encode(photo("coffee_wide.jpg"), "WEBP", quality=80), None),
    "webp:lossless-RGBA": lambda: (encode(Image.open(io.BytesIO(_rgba_gradient()[0])),
                                          "WEBP", lossless=True), None),
    "bmp": lambda: (encode(photo("rocket.jpg"), "BMP"), None),
    "tiff:lzw": lambda: (encode(photo("astronaut_tall.jpg"), "TIFF", compression="tiff_lzw"), None),
    "tiff:gray": lambda: (encode(photo("camera_gray.jpg"), "TIFF"), None),
}


@functools.lru_cache(maxsize=None)
def case_data(name: str):
    return CASES[name]()


def _seed_files() -> list[bytes]:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    out = []
    for fmt, mode in [("PNG", "RGB"), ("JPEG", "RGB"), ("GIF", "P"), ("WEBP", "RGB"),
                      ("BMP", "RGB"), ("TIFF", "RGB"), ("PNG", "RGBA"), ("PNG", "I;16")]:
        image = Image.fromarray(pixels).convert("RGBA" if mode == "RGBA" else "RGB")
        if mode == "P":
            image = image.convert("P")
        elif mode == "I;16":
            image = Image.fromarray(pixels[..., 0].astype(np.uint16) * 257)
        buffer = io.BytesIO()
        image.save(buffer, format=fmt)
        out.append(buffer.getvalue())
    return out


SEEDS = _seed_files()


@st.composite
def mutated_images(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 8))):
        op = draw(st.sampled_from(["flip", "cut", "splice", "insert"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif op == "cut":
            del data[at:at + draw(st.integers(1, 64))]
        elif op == "splice":
            data[at:at + 4] = draw(st.binary(min_size=4, max_size=4))
        else:
            data[at:at] = draw(st.binary(max_size=32))
    return bytes(data)


texts = st.text(max_size=40)
filters = st.builds(
    lambda metadata, prefix: search_pb2.Filter(
        metadata={k: search_pb2.AnyOf(values=v) for k, v in metadata.items()}, uri_prefix=prefix),
    st.dictionaries(texts, st.lists(texts, max_size=4), max_size=4), texts)
