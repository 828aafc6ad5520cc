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
    computes them: shortest edge resized, centre crop, zero padding outside.
    Images of one size are resized in one call."""
    crop_h, crop_w = pre.crop_size if pre.do_center_crop else images[0].shape[1:]
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


class DeviceJpegDecoder:
    """Batched nvJPEG decode plus `resize_crop`, callable from several
    threads: each thread works on its own CUDA stream, so decoding overlaps
    the model's forward passes."""

    def __init__(self, pre: Preprocessor, device: torch.device) -> None:
        if device.type != "cuda":
            raise DeviceDecodeUnavailable(f"GPU JPEG decoding needs a CUDA device, not {device}")
        if pre.resample not in _MODES:
            raise DeviceDecodeUnavailable(
                f"the checkpoint resizes with {Image.Resampling(pre.resample).name}; "
                "the GPU path resizes only with BICUBIC or BILINEAR")
        try:
            from torchvision.io import ImageReadMode, decode_jpeg  # noqa: PLC0415 - optional
        except Exception as exc:  # noqa: BLE001 - ImportError, or a CUDA build mismatch
            raise DeviceDecodeUnavailable(
                f"torchvision with nvJPEG is not usable ({type(exc).__name__}: {exc}); install "
                "the torchvision build that matches torch") from exc
        self._decode, self._rgb = decode_jpeg, ImageReadMode.RGB
        self._pre, self._device = pre, device
        self._local = threading.local()

    def accepts(self, data: bytes, max_pixels: int) -> bool:
        """Whether `data` is a JPEG this decoder turns into the same picture as
        Pillow would, within the pixel limits the CPU path enforces."""
        header = read_header(data)
        return (header is not None and header.device_decodable
                and header.width * header.height <= max_pixels
                and self._pre.resized_pixels(header.width, header.height) <= max_pixels)

    def crops(self, jpegs: Sequence[bytes]) -> torch.Tensor:
        """(N, 3, H, W) uint8 crops on the device, ready once this returns.
        Raises whatever nvJPEG raises on data it cannot decode."""
        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = self._local.stream = torch.cuda.Stream(self._device)
        data = [torch.frombuffer(bytearray(jpeg), dtype=torch.uint8) for jpeg in jpegs]
        with torch.inference_mode(), torch.cuda.stream(stream):
            images = self._decode(data, mode=self._rgb, device=self._device)
            out = resize_crop(images, self._pre)
        stream.synchronize()
        return out
