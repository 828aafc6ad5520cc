"""embedder_service.preprocess: decoding untrusted bytes, and pixel parity with
the checkpoint's own slow (PIL) transformers CLIPImageProcessor.

Parity cases run on real photographs (tests/fixtures/photos/, see its
README.md) and on in-memory re-encodings of them in every supported format and
pixel mode. The reference is always `processor(images=img, return_tensors="np")`
on the image as Pillow opens it, turned upright by `ImageOps.exif_transpose`.

The decode tests need only Pillow + numpy; the parity tests skip without
transformers.
"""

from __future__ import annotations

import functools
import io
import json
import struct
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run from anywhere, without installing the package
    sys.path.insert(0, str(ROOT))

from embedder_service.preprocess import (  # noqa: E402
    ImageDecodeError,
    Preprocessor,
    convert_to_rgb,
    declared_cost,
    decode_image,
)
from tests.inputs import (CASES, PHOTO_NAMES, bomb_png, case_data, encode, photo, scan_bomb,  # noqa: E402
                          photo_bytes, png_chunk, png_from_rows, with_exif_orientation)

# Max abs difference allowed between our pixel values and the processor's,
# in normalised units. We replicate transformers' arithmetic exactly (same PIL
# resize on uint8, same float64 rescale -> float32, same float32 normalise),
# and measure 0.0 on every case. 1e-5 leaves room only for float32 operation
# reordering in a future transformers (values are within about [-1.8, 2.2],
# so a few float32 ulps are < 1e-6) while staying ~1400x smaller than one
# uint8 grey level, which is 1 / 255 / std >= 0.0142 after normalisation: any
# pixel that decodes, resizes, crops or composites differently fails.
PARITY_ATOL = 1e-5
ONE_GREY_LEVEL = 1 / 255 / max(0.26862954, 0.26130258, 0.27577711)
assert PARITY_ATOL < ONE_GREY_LEVEL / 100

# Processor settings under test: the CLIPImageProcessor defaults (224 px,
# OpenAI mean/std = openai/clip-vit-base-patch32) and a 64-px one.
CONFIGS = {
    "clip224": {},
    "clip64": {"size": {"shortest_edge": 64}, "crop_size": {"height": 64, "width": 64}},
}

MEASURED: dict[str, float] = {}  # case -> max abs diff, printed with `pytest -rP`


# --------------------------------------------------------------------------
# helpers


def _reference_class():
    pytest.importorskip("transformers")
    try:  # transformers 5.x: the slow PIL processor has its own class
        from transformers import CLIPImageProcessorPil as cls
    except ImportError:  # 4.x: CLIPImageProcessor is the slow one
        from transformers import CLIPImageProcessor as cls
    return cls


@functools.lru_cache(maxsize=None)
def _processors(config_name: str):
    reference = _reference_class()(**CONFIGS[config_name])
    return reference, Preprocessor.from_processor(reference)


def _reference_pixels(reference, image: Image.Image) -> np.ndarray:
    out = reference(images=image, return_tensors="np")["pixel_values"]
    return np.asarray(out)[0]


# --------------------------------------------------------------------------
# parity


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_clip_image_processor(case, config):
    reference, pre = _processors(config)
    data, ref_image = case_data(case)
    if ref_image is None:
        with Image.open(io.BytesIO(data)) as opened:
            ref_image = ImageOps.exif_transpose(opened)

    decoded = decode_image(data)
    assert decoded.mode == "RGB"
    assert decoded.size == ref_image.size

    ours = pre(decoded)
    expected = _reference_pixels(reference, ref_image)
    assert ours.dtype == np.float32 and ours.shape == expected.shape
    assert ours.shape == (3, *pre.crop_size)
    diff = float(np.abs(ours - expected.astype(np.float32)).max())
    MEASURED[f"{config}/{case}"] = diff
    print(f"{config}/{case}: max abs diff {diff:.3g}")
    assert diff <= PARITY_ATOL, f"{case}: max abs diff {diff} > {PARITY_ATOL}"


def test_defaults_match_clip_image_processor_defaults():
    reference, pre = _processors("clip224")
    assert Preprocessor().to_config() == pre.to_config()
    assert pre.crop_size == (224, 224)
    assert pre.resample == int(Image.Resampling.BICUBIC)


@pytest.mark.parametrize("settings", [
    {"do_center_crop": False},
    {"do_resize": False},  # small image: the crop pads with zeros
    {"do_resize": False, "crop_size": {"height": 300, "width": 100}},  # pad one side, crop the other
    {"do_normalize": False},
    {"do_rescale": False},
    {"size": {"shortest_edge": 71}, "crop_size": {"height": 63, "width": 65}},
    {"size": {"shortest_edge": 64, "longest_edge": 80}, "crop_size": {"height": 64, "width": 64}},
    {"size": {"height": 50, "width": 90}, "crop_size": {"height": 40, "width": 40}},
    {"resample": int(Image.Resampling.BILINEAR), "image_mean": 0.5, "image_std": 0.5},
], ids=lambda s: json.dumps(s, sort_keys=True))
@pytest.mark.parametrize("name", ["chelsea_small.jpg", "astronaut_tall.jpg"])
def test_parity_with_other_settings(settings, name):
    reference = _reference_class()(**settings)
    pre = Preprocessor.from_processor(reference)
    image = decode_image(photo_bytes(name))
    ours = pre(image)
    expected = _reference_pixels(reference, image)
    assert ours.shape == expected.shape
    assert float(np.abs(ours - expected.astype(np.float32)).max()) <= PARITY_ATOL


def test_from_pretrained_legacy_openai_config(tmp_path):
    # openai/clip-vit-base-patch32's preprocessor_config.json: int sizes.
    config = {
        "crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 224,
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    pre = Preprocessor.from_pretrained(tmp_path)
    assert pre.size == {"shortest_edge": 224} and pre.crop_size == (224, 224)
    assert Preprocessor.from_pretrained(tmp_path / "preprocessor_config.json").to_config() \
        == pre.to_config()

    reference = _reference_class().from_pretrained(str(tmp_path))
    assert Preprocessor.from_processor(reference).to_config() == pre.to_config()
    image = decode_image(photo_bytes("rocket.jpg"))
    assert np.abs(pre(image) - _reference_pixels(reference, image)).max() <= PARITY_ATOL


def test_from_pretrained_saved_by_transformers(tmp_path):
    reference, _ = _processors("clip64")
    reference.save_pretrained(str(tmp_path))
    pre = Preprocessor.from_pretrained(str(tmp_path))
    assert pre.crop_size == (64, 64) and pre.size == {"shortest_edge": 64}
    image = decode_image(photo_bytes("coffee_wide.jpg"))
    assert np.abs(pre(image) - _reference_pixels(reference, image)).max() <= PARITY_ATOL


def test_from_pretrained_missing_config_is_oserror(tmp_path):
    with pytest.raises(OSError, match="preprocessor_config.json"):
        Preprocessor.from_pretrained(tmp_path)


def test_stacked_images_match_processor_batch():
    reference, pre = _processors("clip224")
    images = [decode_image(photo_bytes(n)) for n in PHOTO_NAMES]
    ours = np.stack([pre(im) for im in images])
    assert ours.shape == (len(images), 3, 224, 224) and ours.dtype == np.float32
    expected = np.asarray(reference(images=images, return_tensors="np")["pixel_values"])
    assert np.abs(ours - expected).max() <= PARITY_ATOL


def test_crop_through_lut_is_the_pixel_values():
    """The service ships uint8 crops and applies `lut` on the device: same values."""
    _, pre = _processors("clip224")
    for name in PHOTO_NAMES:
        image = decode_image(photo_bytes(name))
        crop = pre.crop(image)
        via_lut = np.stack([pre.lut[c][crop[:, :, c]] for c in range(3)])
        assert crop.dtype == np.uint8 and np.array_equal(via_lut, pre(image))


def test_preprocessor_does_not_modify_its_input():
    _, pre = _processors("clip64")
    image = photo("coffee_wide.jpg")
    before = np.asarray(image).copy()
    pre(image)
    assert image.size == (599, 400) and np.array_equal(np.asarray(image), before)


# --------------------------------------------------------------------------
# decoding (no transformers needed)


def test_exif_orientation_6_is_rotated_upright():
    stored = photo("astronaut_tall.jpg")  # 301x512
    data = with_exif_orientation(stored, 6)
    decoded = decode_image(data)
    with Image.open(io.BytesIO(data)) as im:  # the pixels as stored, not rotated
        assert im.size == (301, 512)
        manual = im.convert("RGB").transpose(Image.Transpose.ROTATE_270)  # 90 degrees clockwise
    assert decoded.size == (512, 301)
    assert np.array_equal(np.asarray(decoded), np.asarray(manual))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_matches_pillow(orientation):
    data = with_exif_orientation(photo("chelsea_small.jpg"), orientation)
    with Image.open(io.BytesIO(data)) as im:
        expected = ImageOps.exif_transpose(im).convert("RGB")
    decoded = decode_image(data)
    assert decoded.size == ((100, 150) if orientation >= 5 else (150, 100))
    assert np.array_equal(np.asarray(decoded), np.asarray(expected))


def test_animated_gif_gives_the_first_frame():
    data, _ = case_data("gif:animated")
    decoded = np.asarray(decode_image(data), dtype=np.float32)
    first = np.asarray(photo("chelsea_small.jpg").resize((150, 100)), dtype=np.float32)
    second = np.asarray(photo("coffee_wide.jpg").resize((150, 100)), dtype=np.float32)
    assert np.abs(decoded - first).mean() < 10  # GIF quantisation only
    assert np.abs(decoded - second).mean() > 30


def test_rgba_is_composited_on_white():
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))  # fully transparent dark pixels
    rgba.putpixel((0, 0), (10, 20, 30, 255))
    decoded = np.asarray(decode_image(encode(rgba, "PNG")))
    assert tuple(decoded[0, 0]) == (10, 20, 30)
    assert tuple(decoded[1, 1]) == (255, 255, 255)
    # and Preprocessor does the same on an RGBA image given directly
    assert np.array_equal(np.asarray(convert_to_rgb(rgba)), decoded)


def test_16_bit_gray_png_keeps_the_high_byte():
    data, reference_image = case_data("png:16-bit-gray")
    assert np.array_equal(np.asarray(decode_image(data)),
                          np.asarray(reference_image.convert("RGB")))


def test_16_bit_rgb_png_keeps_the_high_byte():
    data, reference_image = case_data("png:16-bit-RGB")
    assert np.array_equal(np.asarray(decode_image(data)), np.asarray(reference_image))


@pytest.mark.parametrize("case", ["jpeg:CMYK", "png:P-transparency", "png:LA-alpha-gradient",
                                  "png:1-bilevel", "tiff:gray", "webp:lossy", "bmp"])
def test_decoded_images_are_rgb_and_detached(case):
    data, _ = case_data(case)
    image = decode_image(data)
    assert image.mode == "RGB"
    image.load()  # still usable: not tied to the closed source file
    assert np.asarray(image).shape == (image.height, image.width, 3)


def test_max_pixels_limit():
    data = photo_bytes("coffee_wide.jpg")  # 599x400 = 239,600 px
    assert decode_image(data, max_pixels=599 * 400).size == (599, 400)
    with pytest.raises(ImageDecodeError, match=r"599x400 = 0\.24 Mpx, above the 0\.1 Mpx limit"):
        decode_image(data, max_pixels=100_000)


# --------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("data, message", [
    (b"", "empty image bytes"),
    (np.random.default_rng(0).bytes(2000), "not a recognised image format"),
    (b"This is a text file, not a photo.\n" * 20, "not a recognised image format"),
    (b"P6\n2 2\n255\n" + bytes(12), "not a recognised image format"),  # PPM: not accepted
    (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "not a recognised image format"),
], ids=["empty", "random", "text", "ppm", "eps"])
def test_garbage_is_rejected(data, message):
    with pytest.raises(ImageDecodeError, match=message) as info:
        decode_image(data)
    assert isinstance(info.value, ValueError)


def test_not_bytes_is_rejected():
    with pytest.raises(ImageDecodeError, match="must be bytes"):
        decode_image("photo.jpg")  # type: ignore[arg-type]


def test_truncated_jpeg_is_rejected():
    data = photo_bytes("coffee_wide.jpg")
    with pytest.raises(ImageDecodeError, match="truncated or corrupt image"):
        decode_image(data[: len(data) // 2])


def test_truncated_png_is_rejected():
    data = encode(photo("chelsea_small.jpg"), "PNG")
    with pytest.raises(ImageDecodeError, match="truncated or corrupt image"):
        decode_image(data[: len(data) // 2])


def test_corrupt_png_data_is_rejected():
    ihdr = struct.pack(">IIBBBBB", 64, 64, 8, 2, 0, 0, 0)
    data = (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
            + png_chunk(b"IDAT", b"not a zlib stream at all" * 4) + png_chunk(b"IEND", b""))
    with pytest.raises(ImageDecodeError, match="truncated or corrupt image"):
        decode_image(data)


BOMBS = [
    # (width, height, expected message); 900 Mpx is also past Pillow's own
    # hard limit (2 x MAX_IMAGE_PIXELS), 100 Mpx past its warning, 64 Mpx
    # under both: only our check stops that one.
    (30000, 30000, r"image is 30000x30000 = 900 Mpx, above the 50 Mpx limit"),
    (10000, 10000, r"image is 10000x10000 = 100 Mpx, above the 50 Mpx limit"),
    (8000, 8000, r"image is 8000x8000 = 64 Mpx, above the 50 Mpx limit"),
]


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("width, height, message", BOMBS, ids=lambda v: str(v)[:12])
def test_decompression_bomb_is_rejected_before_decoding(width, height, message):
    data = bomb_png(width, height)
    assert len(data) < 200_000  # tiny file...
    tracemalloc.start()
    try:
        with pytest.raises(ImageDecodeError, match=message):
            decode_image(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 50 * 2**20, f"peak Python allocation {peak / 2**20:.1f} MB"


def test_decompression_bombs_do_not_allocate_and_no_torch(tmp_path):
    """In a fresh interpreter (Pillow's pixel buffers are outside tracemalloc's
    view): peak RSS grows < 50 MB while rejecting every bomb, and importing the
    module pulls in neither torch nor transformers."""
    paths = []
    for width, height, _ in BOMBS:
        path = tmp_path / f"bomb_{width}x{height}.png"
        path.write_bytes(bomb_png(width, height))
        paths.append(str(path))
    script = textwrap.dedent("""
        import json, resource, sys, warnings
        warnings.simplefilter("ignore")
        from embedder_service.preprocess import ImageDecodeError, decode_image
        heavy = sorted(m for m in ("torch", "transformers") if m in sys.modules)
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
        blobs = [open(p, "rb").read() for p in sys.argv[1:]]
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
        errors = []
        for blob in blobs:
            try:
                decode_image(blob)
                errors.append(None)
            except ImageDecodeError as exc:
                errors.append(str(exc))
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
        print(json.dumps({"heavy": heavy, "grew": after - before, "errors": errors}))
    """)
    done = subprocess.run([sys.executable, "-c", script, *paths], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["heavy"] == []
    assert all(e and "limit" in e for e in result["errors"]), result["errors"]
    assert result["grew"] < 50 * 2**20, f"peak RSS grew {result['grew'] / 2**20:.1f} MB"


def test_huge_image_under_a_raised_limit_still_decodes_header_first():
    # A 3000x3000 1-bit PNG: rejected at 1 Mpx, decoded when allowed.
    data = bomb_png(3000, 3000)
    with pytest.raises(ImageDecodeError, match="3000x3000 = 9 Mpx, above the 1 Mpx limit"):
        decode_image(data, max_pixels=1_000_000)
    image = decode_image(data, max_pixels=18_000_000)  # a PNG costs 2 pixels a pixel
    assert image.size == (3000, 3000) and image.mode == "RGB"


def test_decode_cost_is_per_format_and_checked_from_the_header():
    """WebP and PNG cost double, 16-bit PNG four times: under the pixel limit
    but over its format's cost, an image is refused before decoding."""
    png8 = bomb_png(3000, 3000)
    png16 = png_from_rows(1000, 1000, 16, 0, (bytes(2000) for _ in range(1000)))
    jpeg = encode(Image.new("RGB", (3000, 3000)), "JPEG")
    webp = encode(Image.new("RGB", (3000, 3000)), "WEBP", lossless=True)
    assert [declared_cost(d) for d in (jpeg, png8, webp, png16)] == [
        9_000_000, 18_000_000, 18_000_000, 4_000_000]
    assert declared_cost(b"not an image") == 0
    assert decode_image(jpeg, max_pixels=10_000_000).size == (3000, 3000)
    for data in (png8, webp):
        with pytest.raises(ImageDecodeError, match="costs 2x baseline JPEG to decode, so its "
                                                   "limit is 5 Mpx"):
            decode_image(data, max_pixels=10_000_000)
    with pytest.raises(ImageDecodeError, match="PNG costs 4x"):
        decode_image(png16, max_pixels=3_000_000)


def test_a_jpeg_of_thousands_of_scans_is_refused_from_its_bytes():
    """A 5,000-scan JPEG decoded for ~80 s at 49 Mpx while admission counted
    it as a baseline JPEG. Now scans are counted from the bytes: over
    MAX_JPEG_SCANS the image is refused before decoding, and below that each
    ten scans cost one more baseline decode."""
    bomb = scan_bomb(64, 5000)
    with pytest.raises(ImageDecodeError, match="JPEG has 5010 scans, over the limit of 100"):
        decode_image(bomb)
    assert declared_cost(bomb) == 0  # refused, so admitted at no cost: the decode fails at once
    normal = encode(Image.new("RGB", (1000, 1000)), "JPEG", progressive=True)  # 10 scans
    assert declared_cost(normal) == 1_000_000
    assert declared_cost(scan_bomb(1000, 40)) == 5_000_000  # 50 scans: 5 baseline decodes
    with pytest.raises(ImageDecodeError, match="JPEG costs 5x baseline JPEG to decode"):
        decode_image(scan_bomb(1000, 40), max_pixels=4_000_000)
    assert decode_image(scan_bomb(100, 40)).size == (100, 100)


def _float_tiff(side: int) -> bytes:
    ramp = np.linspace(0.0, 1.0, side * side, dtype=np.float32).reshape(side, side)
    return encode(Image.fromarray(ramp, mode="F"), "TIFF", compression="tiff_adobe_deflate")


def test_wide_sample_tiffs_cost_their_width_and_convert_without_float64_copies():
    """A 311 KB float TIFF of 49 Mpx took +1.88 GB and 6 s: admission costed
    every TIFF mode as 8-bit RGB, and the conversion made float64 copies.
    Float and 32-bit integer TIFFs now cost 4x, 16-bit 2x; the conversion
    works in place on one float32 copy."""
    big = _float_tiff(4000)  # 16 Mpx x 4 = 64 Mpx of baseline JPEG
    assert declared_cost(big) == 64_000_000
    with pytest.raises(ImageDecodeError, match="TIFF of mode F costs 4x baseline JPEG"):
        decode_image(big)
    ints = encode(Image.fromarray(np.full((100, 100), 70000, dtype=np.int32), mode="I"), "TIFF")
    assert declared_cost(ints) == 40_000
    assert decode_image(ints).getpixel((0, 0)) == (255, 255, 255)  # 65535 >> 8

    side = 1500
    data = _float_tiff(side)
    tracemalloc.start()
    try:
        image = decode_image(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # numpy's and Python's allocations are traced, Pillow's are not: the
    # samples as bytes (Pillow's array interface, 4 bytes a pixel), one
    # writable float32 copy (4) and a mask (1). It was 32 bytes a pixel.
    assert peak < 10 * side * side, f"{peak / side / side:.1f} bytes a pixel"
    assert image.getpixel((0, 0)) == (0, 0, 0) and image.getpixel((side - 1, side - 1)) == (255,) * 3
