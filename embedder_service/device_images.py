"""JPEG decoding, resize and centre crop on the GPU.

Decoding and resizing a 500x375 JPEG costs close to 4 ms of CPU in Pillow,
which caps a 16-core host near 2,000 images/s while the GPU could encode
14,000. Here nvJPEG (through torchvision) decodes a request's JPEGs as one
batch on the device, and torch resizes them there with the antialiased
bicubic (or bilinear) filter that matches Pillow's. The CPU only reads
headers.

Not bit-identical to the CPU path: nvJPEG's IDCT and chroma upsampling and
the float resize differ from libjpeg-turbo and Pillow's fixed-point resize
by a few levels on some pixels. docs/benchmarks.md reports the measured pixel
difference and the embedding cosine against the CPU path; the tolerance is
a cosine of at least 0.999.
"""
from __future__ import annotations

import io
import threading
from collections import defaultdict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from embedder_service.jpeg import read_header
from embedder_service.preprocess import Preprocessor, _resize_output_size

_MODES = {int(Image.Resampling.BICUBIC): "bicubic", int(Image.Resampling.BILINEAR): "bilinear"}


class DeviceDecodeUnavailable(RuntimeError):
    """This machine or checkpoint cannot decode on the device; the message says why."""


def resize_crop(images: Sequence[torch.Tensor], pre: Preprocessor) -> torch.Tensor:
    """(N, 3, H, W) uint8 crops from (3, h, w) uint8 images, as `pre.crop`
    computes them: shortest edge resized, centre crop (always: the caller
    checks `pre.do_center_crop`), zero padding outside. Images of one size
    are resized in one call."""
    crop_h, crop_w = pre.crop_size
    out = torch.zeros((len(images), 3, crop_h, crop_w), dtype=torch.uint8, device=images[0].device)
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, image in enumerate(images):
        groups[tuple(image.shape[1:])].append(i)
    for (height, width), index in groups.items():
        batch = torch.stack([images[i] for i in index])
        if pre.do_resize:
            new_h, new_w = _resize_output_size(height, width, pre.size)
            if (new_h, new_w) != (height, width):
                resized = F.interpolate(batch.float(), size=(new_h, new_w), mode=_MODES[pre.resample],
                                        antialias=True, align_corners=False)
                batch = resized.round_().clamp_(0, 255).to(torch.uint8)
        height, width = batch.shape[2:]
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
        rows, cols = min(crop_h, height), min(crop_w, width)
        out[index, :, max(-top, 0):max(-top, 0) + rows, max(-left, 0):max(-left, 0) + cols] = \
            batch[:, :, max(top, 0):max(top, 0) + rows, max(left, 0):max(left, 0) + cols]
    return out


def pixel_groups(pixels: Sequence[int], budget: int) -> list[slice]:
    """Consecutive runs of images holding at most `budget` pixels each (an
    image larger than the budget alone)."""
    groups, start, total = [], 0, 0
    for i, count in enumerate(pixels):
        if total and total + count > budget:
            groups.append(slice(start, i))
            start, total = i, 0
        total += count
    return groups + [slice(start, len(pixels))]


class DeviceJpegDecoder:
    """Batched nvJPEG decode plus `resize_crop`, callable from several
    threads. torchvision decodes on its own stream behind a process-wide
    lock; the resize and crop run on the calling thread's stream, so one
    thread resizes while another decodes, and both overlap the model's
    forward passes. A request's JPEGs are decoded in groups of at most
    `batch_pixels` pixels, which bounds the GPU memory one call takes."""

    def __init__(self, pre: Preprocessor, device: torch.device,
                 batch_pixels: int = 64_000_000) -> None:
        if device.type != "cuda":
            raise DeviceDecodeUnavailable(f"GPU JPEG decoding needs a CUDA device, not {device}")
        if pre.resample not in _MODES or not pre.do_center_crop:
            raise DeviceDecodeUnavailable(
                f"the checkpoint resizes with {Image.Resampling(pre.resample).name}, centre crop "
                f"{'on' if pre.do_center_crop else 'off'}; the GPU path needs BICUBIC or BILINEAR "
                "and a centre crop")
        try:
            from torchvision.io import ImageReadMode, decode_jpeg  # noqa: PLC0415 - optional
        except Exception as exc:  # noqa: BLE001 - ImportError, or a CUDA build mismatch
            raise DeviceDecodeUnavailable(
                f"torchvision with nvJPEG is not usable ({type(exc).__name__}: {exc}); install "
                "the torchvision build that matches torch") from exc
        self._decode, self._rgb = decode_jpeg, ImageReadMode.RGB
        self._pre, self._device, self._batch_pixels = pre, device, batch_pixels
        self._local = threading.local()
        probe = io.BytesIO()
        Image.new("RGB", (64, 48), (128, 64, 32)).save(probe, "JPEG")
        try:  # a torchvision without nvJPEG fails here, not on the first request
            self.crops([probe.getvalue()], [64 * 48])
        except Exception as exc:  # noqa: BLE001
            raise DeviceDecodeUnavailable(
                f"nvJPEG cannot decode a test image ({type(exc).__name__}: {exc})") from exc

    def pixels(self, data: bytes, max_pixels: int) -> int:
        """The pixel count of `data` if this decoder turns it into the same
        picture as Pillow would, within the limits the CPU path enforces;
        else 0."""
        header = read_header(data)
        if header is None or not header.device_decodable:
            return 0
        pixels = header.width * header.height
        if pixels > max_pixels or self._pre.resized_pixels(header.width, header.height) > max_pixels:
            return 0
        return pixels

    def crops(self, jpegs: Sequence[bytes], pixels: Sequence[int]) -> torch.Tensor:
        """(N, 3, H, W) uint8 crops on the device, ready once this returns.
        Raises whatever nvJPEG raises on data it cannot decode."""
        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = self._local.stream = torch.cuda.Stream(self._device)
        with torch.inference_mode(), torch.cuda.stream(stream):
            out = []
            for group in pixel_groups(pixels, self._batch_pixels):
                data = [torch.frombuffer(bytearray(jpeg), dtype=torch.uint8) for jpeg in jpegs[group]]
                out.append(resize_crop(self._decode(data, mode=self._rgb, device=self._device),
                                       self._pre))
            crops = out[0] if len(out) == 1 else torch.cat(out)
        stream.synchronize()
        return crops
