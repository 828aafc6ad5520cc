"""Image decoding and CLIP preprocessing, pixel-for-pixel like transformers.

Pillow + numpy only: importing this module pulls in neither torch nor
transformers, so it is cheap to run in worker threads or processes.

`decode_image` turns untrusted bytes into an RGB `PIL.Image` (or raises
`ImageDecodeError` with a plain-words reason). `Preprocessor` turns that image
into the float32 (3, H, W) `pixel_values` the checkpoint's own slow (PIL)
`CLIPImageProcessor` would give. It replicates, step by step, what
transformers 5.x (`PilBackend`, `image_transforms`) does:

1. `convert_to_rgb`: images with an alpha band or a `transparency` entry
   (palette / grayscale / RGB colour key) are alpha-composited onto WHITE,
   everything else goes through `Image.convert("RGB")`.
2. resize with PIL (`Image.resize(..., reducing_gap=None)`, uint8 in, uint8
   out) so the shortest edge is `size["shortest_edge"]`, the long edge being
   `int(shortest * long / short)` (truncated, as `get_resize_output_image_size`
   with `default_to_square=False`).
3. centre crop with top/left = `(orig - crop) // 2` (floor); when the image is
   smaller than the crop the outside is zero (black) padding, as transformers'
   numpy `center_crop` pads with zeros.
4. rescale: `float32(float64(v) * rescale_factor)`; normalise in float32:
   `(x - float32(mean)) / float32(std)`.

Steps 1-3 run in PIL; step 4 is a per-channel 256-entry lookup table built
with exactly transformers' arithmetic, so the output is bit-identical to the
reference processor and costs one gather over the cropped pixels.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageOps

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ImageDecodeError",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "Preprocessor",
    "convert_to_rgb",
    "decode_image",
]

DEFAULT_MAX_PIXELS = 50_000_000

# transformers.image_utils.OPENAI_CLIP_MEAN / OPENAI_CLIP_STD
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Formats decode_image accepts. Restricting Image.open to these keeps
# Pillow's other plugins (EPS, which shells out to Ghostscript, PSD, ICNS,
# ...) away from untrusted bytes. The JPEG entry also opens the
# multi-picture (MPO) JPEGs many phone cameras write.
_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "DIB", "TIFF", "GIF")


class ImageDecodeError(ValueError):
    """The bytes are not an image this service can use; the message says why."""


def _mpx(pixels: int) -> str:
    return f"{pixels / 1e6:.3g} Mpx"


def _declared_size_unchecked(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the header, skipping Pillow's own bomb check.

    Only used to word the error message when Pillow itself refused the image
    as a decompression bomb (it raises before we can see `im.size`). Plugin
    factories read the header only.
    """
    try:
        Image.init()
        prefix = data[:16]
        for fmt in _FORMATS:
            factory, accept = Image.OPEN.get(fmt, (None, None))
            if factory is None or (accept is not None and not accept(prefix)):
                continue
            try:
                return tuple(factory(io.BytesIO(data), "").size)  # type: ignore[return-value]
            except Exception:  # noqa: BLE001 - best effort, for the message only
                continue
    except Exception:  # noqa: BLE001
        return None
    return None


def _too_big_message(width: int, height: int, max_pixels: int) -> str:
    return (f"image is {width}x{height} = {_mpx(width * height)}, above the "
            f"{_mpx(max_pixels)} limit")


# What decoding a pixel costs, against baseline JPEG (about 5 ns a pixel on
# one core, as BMP, TIFF and GIF), measured with Pillow: WebP and 8-bit PNG
# take 6 to 13 times as long (zlib and VP8L are slow per pixel), 16-bit PNG
# twice that again. So a 50 Mpx limit for JPEG is 25 Mpx for WebP and PNG and
# 12.5 Mpx for 16-bit PNG: every image allowed decodes in about a second.
_COST = {"WEBP": 2, "PNG": 2}
# A progressive JPEG is decoded once per scan: each scan over the whole image
# costs about a tenth of a baseline decode of a photograph (0.5-0.8 ns a
# pixel a scan; bench/decode_cost.py, docs/benchmarks.md). Encoders write about 10 scans; a crafted
# file repeats one refinement scan thousands of times, 26 bytes each, so the
# scans are counted from the bytes (every 0xFFDA is a start-of-scan marker:
# entropy-coded data stuffs each 0xFF with 0x00) and capped, as
# libjpeg-turbo's scan limit does.
MAX_JPEG_SCANS = 100
_PIXELS_PER_SCAN = 10  # scans that cost one baseline decode
# Samples wider than a byte (TIFF's 16-bit, 32-bit integer and float modes)
# are read and converted at their width: bytes a pixel, against RGB's one.
_MODE_COST = {"F": 4, "I": 4, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}


def jpeg_scans(data: bytes) -> int:
    """Start-of-scan markers in a JPEG's bytes (1 for a baseline JPEG)."""
    return data.count(b"\xff\xda")


def decode_cost(image: Image.Image, data: bytes) -> int:
    """What decoding `image` (opened, not loaded, from `data`) costs, in
    pixels of baseline JPEG: its declared pixels times its format's weight,
    times its scans' for JPEG and its sample width's for TIFF.
    ImageDecodeError for a JPEG of more than MAX_JPEG_SCANS scans."""
    width, height = image.size
    weight = _COST.get(image.format or "", 1)
    if image.format == "PNG" and data[24:25] == b"\x10":  # IHDR bit depth 16
        weight *= 2
    elif image.format in ("JPEG", "MPO"):
        scans = jpeg_scans(data)
        if scans > MAX_JPEG_SCANS:
            raise ImageDecodeError(
                f"JPEG has {scans} scans, over the limit of {MAX_JPEG_SCANS} (encoders write "
                "about 10; thousands are a decoding bomb): re-encode it as a baseline JPEG")
        weight = max(1, -(-scans // _PIXELS_PER_SCAN))
    elif image.format == "TIFF":
        weight = _MODE_COST.get(image.mode, 1)
    return width * height * weight


def declared_cost(data: bytes) -> int:
    """decode_cost from the header alone, for admission; 0 when the header
    cannot be read or the image is refused for its cost (the decode then
    fails at once, at no cost)."""
    try:
        with Image.open(io.BytesIO(data), formats=_FORMATS) as image:
            return decode_cost(image, data)
    except Exception:  # noqa: BLE001 - unreadable, or a bomb Pillow refuses: costs nothing
        return 0


def convert_to_rgb(image: Image.Image) -> Image.Image:
    """RGB exactly as transformers 5.x `image_transforms.convert_to_rgb`.

    Transparency (an "A" band, or `info["transparency"]` on P/L/RGB images)
    is composited onto white; anything else is `image.convert("RGB")`.
    An RGB image without transparency is returned as is (no copy).
    """
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode == "RGB":
        return image
    return image.convert("RGB")


def _to_8bit(image: Image.Image) -> Image.Image:
    """High-bit-depth single-channel images to 8-bit "L".

    Pillow's own I;16 -> RGB/L conversion clips every value above 255 to
    white, which would turn a 16-bit grayscale PNG into a blank picture. We
    keep the high byte instead, which is also what Pillow does for 16-bit
    RGB/RGBA PNGs (decoded as 8-bit RGB/RGBA from the most significant byte).

    Every step works in place on one copy of the samples at their own width
    (float32 or int32, never float64), so a float TIFF costs its own size
    twice plus a byte a pixel, not several float64 copies.
    """
    mode = image.mode
    if mode.startswith("I;16"):
        arr = np.asarray(image).astype(np.uint16, copy=False)
        return Image.fromarray((arr >> 8).astype(np.uint8))
    if mode == "I":
        arr = np.array(image)  # int32, writable
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            # Most "I" images come from 16-bit sources: treat as 0..65535.
            np.clip(arr, 0, 65535, out=arr)
            np.right_shift(arr, 8, out=arr)
        return Image.fromarray(arr.astype(np.uint8))
    if mode == "F":
        arr = np.array(image, dtype=np.float32)  # writable
        finite = np.isfinite(arr)
        if finite.any() and arr.min(where=finite, initial=np.inf) >= 0.0 \
                and arr.max(where=finite, initial=-np.inf) <= 1.0:
            np.multiply(arr, 255.0, out=arr)
        del finite
        np.nan_to_num(arr, copy=False, nan=0.0, posinf=255.0, neginf=0.0)
        np.rint(arr, out=arr)
        np.clip(arr, 0, 255, out=arr)
        return Image.fromarray(arr.astype(np.uint8))
    return image


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode untrusted image bytes to an RGB `PIL.Image.Image`.

    Accepts JPEG (incl. CMYK and MPO), PNG (incl. 16-bit, palette, alpha),
    WebP, BMP, TIFF and GIF (first frame of an animation). The declared size
    is checked against `max_pixels` from the header, before any pixel is
    decoded, and so is its decode cost (`decode_cost`); the image is then fully loaded (so truncated files fail here),
    turned upright by its EXIF orientation, and converted to RGB as the CLIP
    processor does (transparency composited onto white).

    Raises `ImageDecodeError` (a ValueError) with a reason in plain words.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageDecodeError(f"image data must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise ImageDecodeError("empty image bytes")

    try:
        image = Image.open(io.BytesIO(data), formats=_FORMATS)
    except Image.DecompressionBombError as exc:
        # Pillow refuses > 2 * Image.MAX_IMAGE_PIXELS in open() itself.
        size = _declared_size_unchecked(data)
        if size is not None:
            raise ImageDecodeError(_too_big_message(size[0], size[1], max_pixels)) from exc
        m = re.search(r"\((\d+) pixels\)", str(exc))
        declared = f" = {_mpx(int(m.group(1)))}" if m else ""
        raise ImageDecodeError(f"image is too large{declared}, above the "
                               f"{_mpx(max_pixels)} limit") from exc
    except Image.UnidentifiedImageError as exc:
        raise ImageDecodeError(
            f"not a recognised image format (first bytes {data[:16]!r}); "
            f"supported: JPEG, PNG, WebP, BMP, TIFF, GIF") from exc
    except Exception as exc:  # noqa: BLE001 - a broken header in a known format
        raise ImageDecodeError(f"truncated or corrupt image header: {exc}") from exc

    try:
        width, height = image.size
        if width <= 0 or height <= 0:
            raise ImageDecodeError(f"image has no pixels ({width}x{height})")
        if width * height > max_pixels:
            raise ImageDecodeError(_too_big_message(width, height, max_pixels))
        cost = decode_cost(image, data)
        if cost > max_pixels:
            weight = cost // (width * height)
            kind = f"{image.format} of mode {image.mode}" if image.format == "TIFF" else image.format
            raise ImageDecodeError(
                f"image is a {width}x{height} {kind} = {_mpx(width * height)}; "
                f"{kind} costs {weight}x baseline JPEG to decode, so its limit is "
                f"{_mpx(max_pixels // weight)}: send a smaller image or a baseline JPEG")

        try:
            image.load()
        except MemoryError as exc:
            raise ImageDecodeError(f"image is too large to decode ({width}x{height})") from exc
        except Exception as exc:  # noqa: BLE001 - OSError, SyntaxError, struct.error, ...
            raise ImageDecodeError(f"truncated or corrupt image: {exc}") from exc

        try:
            upright = ImageOps.exif_transpose(image)
        except Exception:  # noqa: BLE001 - broken EXIF: keep the stored orientation
            upright = image
        if upright is None:  # pragma: no cover - only with in_place=True
            upright = image

        try:
            rgb = convert_to_rgb(_to_8bit(upright))
            if rgb is image:  # detach from the file object
                rgb = rgb.copy()
        except Exception as exc:  # noqa: BLE001
            raise ImageDecodeError(
                f"cannot convert {image.format} image with pixel mode {image.mode!r} "
                f"to RGB: {exc}") from exc
        return rgb
    finally:
        image.close()


# --------------------------------------------------------------------------
# Preprocessor


def _size_dict(value: Any, default_to_square: bool, name: str) -> dict[str, int]:
    """transformers' get_size_dict: int / (h, w) / dict / SizeDict -> dict."""
    if value is None:
        raise ValueError(f"{name} is required")
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an int, a (height, width) pair or a dict, got {value!r}")
    if isinstance(value, int):
        return ({"height": value, "width": value} if default_to_square
                else {"shortest_edge": value})
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} as a sequence must be (height, width), got {value!r}")
        return {"height": int(value[0]), "width": int(value[1])}
    if not isinstance(value, Mapping):
        try:  # transformers 5.x SizeDict (a dataclass that supports dict())
            value = dict(value)
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"cannot read {name} {value!r}") from exc
    return {str(k): int(v) for k, v in value.items() if v is not None}


def _resample(value: Any) -> int:
    if value is None:
        return int(Image.Resampling.BICUBIC)
    if isinstance(value, int):  # PILImageResampling / Image.Resampling are IntEnums
        return int(Image.Resampling(int(value)))
    # torchvision InterpolationMode (value "bicubic") or a plain name
    name = str(getattr(value, "value", value)).split(".")[-1].upper()
    try:
        return int(Image.Resampling[name])
    except KeyError as exc:
        raise ValueError(f"unknown resample filter {value!r}") from exc


def _per_channel(value: float | Iterable[float], name: str) -> tuple[float, float, float]:
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    values = tuple(float(v) for v in value)
    if len(values) != 3:
        raise ValueError(f"{name} must have 3 values (RGB), got {values}")
    return values  # type: ignore[return-value]


def _resize_output_size(height: int, width: int, size: Mapping[str, int]) -> tuple[int, int]:
    """(height, width) after resize, as transformers' PilBackend.resize computes it."""
    shortest, longest = size.get("shortest_edge"), size.get("longest_edge")
    if shortest and longest:
        # image_transforms.get_size_with_aspect_ratio
        raw_size = None
        target = shortest
        min_original, max_original = float(min(height, width)), float(max(height, width))
        if max_original / min_original * target > longest:
            raw_size = longest * min_original / max_original
            target = int(round(raw_size))
        if (height <= width and height == target) or (width <= height and width == target):
            return height, width
        if width < height:
            ow = target
            oh = int(raw_size * height / width) if raw_size is not None else int(target * height / width)
            return oh, ow
        oh = target
        ow = int(raw_size * width / height) if raw_size is not None else int(target * width / height)
        return oh, ow
    if shortest:
        # image_transforms.get_resize_output_image_size(default_to_square=False)
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = shortest, int(shortest * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)
    if size.get("height") and size.get("width"):
        return int(size["height"]), int(size["width"])
    raise ValueError(f"unsupported resize size {dict(size)}: expected shortest_edge "
                     "(optionally with longest_edge) or height and width")


class Preprocessor:
    """CLIP image preprocessing with the checkpoint's settings, no torch.

    `pre(image)` -> float32 (3, H, W); `pre.crop(image)` -> the uint8 (H, W, 3)
    crop that `lut` maps to the same values.
    Identical output to the slow (PIL) `CLIPImageProcessor` with the same
    settings. `crop_size` is the (height, width) of the output when
    `do_center_crop` is on.
    """

    def __init__(
        self,
        *,
        do_resize: bool = True,
        size: Any = None,
        resample: Any = Image.Resampling.BICUBIC,
        do_center_crop: bool = True,
        crop_size: Any = None,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: float | Sequence[float] = OPENAI_CLIP_MEAN,
        image_std: float | Sequence[float] = OPENAI_CLIP_STD,
        do_convert_rgb: bool = True,
        default_to_square: bool = False,
    ) -> None:
        self.do_resize = bool(do_resize)
        self.size = _size_dict({"shortest_edge": 224} if size is None else size,
                               default_to_square, "size")
        self.resample = _resample(resample)
        self.do_center_crop = bool(do_center_crop)
        crop = _size_dict({"height": 224, "width": 224} if crop_size is None else crop_size,
                          True, "crop_size")
        if "height" not in crop or "width" not in crop:
            raise ValueError(f"crop_size must have height and width, got {crop}")
        self.crop_size: tuple[int, int] = (int(crop["height"]), int(crop["width"]))
        self.do_rescale = bool(do_rescale)
        self.rescale_factor = float(rescale_factor)
        self.do_normalize = bool(do_normalize)
        self.image_mean = _per_channel(image_mean, "image_mean")
        self.image_std = _per_channel(image_std, "image_std")
        # Always on in practice: the model needs 3 channels. Kept for repr.
        self.do_convert_rgb = bool(do_convert_rgb)
        if self.do_resize:
            _resize_output_size(100, 100, self.size)  # validate now, not per image
        self.lut = self._build_lut()

    # -- construction ---------------------------------------------------------

    _CONFIG_KEYS = ("do_resize", "size", "resample", "do_center_crop", "crop_size",
                    "do_rescale", "rescale_factor", "do_normalize", "image_mean",
                    "image_std", "do_convert_rgb", "default_to_square")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "Preprocessor":
        """From a `preprocessor_config.json` dict (old int sizes or new dicts)."""
        if config.get("do_pad"):
            raise ValueError("do_pad is not supported by this CLIP preprocessor")
        kwargs = {k: config[k] for k in cls._CONFIG_KEYS if config.get(k) is not None}
        return cls(**kwargs)

    @classmethod
    def from_pretrained(cls, path_or_name: str | os.PathLike, local_files_only: bool = False,
                        revision: str | None = None) -> "Preprocessor":
        """From a checkpoint directory, a `preprocessor_config.json` path, or
        (only then importing transformers) a hub id resolved by transformers
        (from the cache alone with `local_files_only`)."""
        path = os.fspath(path_or_name)
        if os.path.isdir(path):
            path = os.path.join(path, "preprocessor_config.json")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"no preprocessor_config.json in {os.fspath(path_or_name)}")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as fh:
                config = json.load(fh)
            if not isinstance(config, dict):
                raise ValueError(f"{path} is not a JSON object")
            return cls.from_config(config)
        # Not a local path: let transformers find it (hub id / HF cache).
        from transformers import AutoImageProcessor  # noqa: PLC0415 - lazy on purpose

        return cls.from_processor(AutoImageProcessor.from_pretrained(
            path, local_files_only=local_files_only, revision=revision))

    @classmethod
    def from_processor(cls, processor: Any) -> "Preprocessor":
        """From a transformers image processor (or a CLIPProcessor holding one)."""
        processor = getattr(processor, "image_processor", processor)
        if getattr(processor, "do_pad", None):
            raise ValueError("do_pad is not supported by this CLIP preprocessor")
        kwargs = {}
        for key in cls._CONFIG_KEYS:
            value = getattr(processor, key, None)
            if value is not None:
                kwargs[key] = value
        return cls(**kwargs)

    def to_config(self) -> dict[str, Any]:
        return {
            "do_resize": self.do_resize, "size": dict(self.size), "resample": self.resample,
            "do_center_crop": self.do_center_crop,
            "crop_size": {"height": self.crop_size[0], "width": self.crop_size[1]},
            "do_rescale": self.do_rescale, "rescale_factor": self.rescale_factor,
            "do_normalize": self.do_normalize, "image_mean": list(self.image_mean),
            "image_std": list(self.image_std), "do_convert_rgb": self.do_convert_rgb,
        }

    def __repr__(self) -> str:
        return f"Preprocessor({self.to_config()})"

    # -- the work -------------------------------------------------------------

    def _build_lut(self) -> np.ndarray:
        """(3, 256) float32: uint8 value -> output value, per channel, computed
        with transformers' exact dtype sequence (image_transforms.rescale /
        normalize)."""
        values = np.arange(256, dtype=np.uint8)
        lut = np.empty((3, 256), dtype=np.float32)
        for c in range(3):
            x: np.ndarray = values
            if self.do_rescale:
                x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
            if self.do_normalize:
                if not np.issubdtype(x.dtype, np.floating):
                    x = x.astype(np.float32)
                mean = np.array(self.image_mean, dtype=x.dtype)[c]
                std = np.array(self.image_std, dtype=x.dtype)[c]
                x = (x - mean) / std
            lut[c] = x.astype(np.float32)
        return lut

    def resized_pixels(self, width: int, height: int) -> int:
        """Pixels of the image after the resize step, before the crop: a
        200000x1 image is tiny on disk but resizes to billions of pixels."""
        if not self.do_resize:
            return width * height
        new_h, new_w = _resize_output_size(height, width, self.size)
        return new_h * new_w

    def crop(self, image: Image.Image) -> np.ndarray:
        """Resized and cropped (H, W, 3) uint8: the pixels before rescale and
        normalise, which `lut[c][value]` maps to the model's input."""
        image = convert_to_rgb(image)
        if self.do_resize:
            new_h, new_w = _resize_output_size(image.height, image.width, self.size)
            image = image.resize((new_w, new_h), resample=self.resample, reducing_gap=None)
        if self.do_center_crop:
            crop_h, crop_w = self.crop_size
            top = (image.height - crop_h) // 2
            left = (image.width - crop_w) // 2
            if (top, left, crop_h, crop_w) != (0, 0, image.height, image.width):
                # Outside the image PIL fills with 0, as transformers' zero padding.
                image = image.crop((left, top, left + crop_w, top + crop_h))
        return np.asarray(image)

    def _apply_lut(self, hwc: np.ndarray, out: np.ndarray) -> np.ndarray:
        for c in range(3):
            np.take(self.lut[c], hwc[:, :, c], out=out[c], mode="clip")
        return out

    def __call__(self, image: Image.Image) -> np.ndarray:
        """float32 (3, H, W) pixel values for one PIL image."""
        hwc = self.crop(image)
        out = np.empty((3, hwc.shape[0], hwc.shape[1]), dtype=np.float32)
        return self._apply_lut(hwc, out)
