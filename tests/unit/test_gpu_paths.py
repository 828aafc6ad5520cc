"""The parts of the GPU fast paths that run on any device: JPEG header
reading (which images the GPU decoder takes), the device resize and crop
against Pillow's, and bucketed text encoding against the eager path.
nvJPEG itself and CUDA graph capture need a GPU: bench/suite.py --profile
gpu measures their parity there (docs/benchmarks.md)."""
from __future__ import annotations

import io
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from PIL import Image

from bench.photos import make_jpegs
from embedder_service.device_images import (DeviceDecodeUnavailable, DeviceJpegDecoder, pixel_groups,
                                             resize_crop)
from embedder_service.jpeg import JpegHeader, read_header
from embedder_service.model import ClipEncoder
from embedder_service.preprocess import Preprocessor, decode_image
from embedder_service.text_graphs import TextGraphs
from tests.services import ROOT, TEST_MODEL

PHOTOS = [p.read_bytes() for p in sorted((ROOT / "tests" / "fixtures" / "photos").glob("*.jpg"))]


def _jpeg(mode: str = "RGB", size=(64, 48), **save) -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, 90 if mode == "L" else (90,) * len(mode)).save(out, "JPEG", **save)
    return out.getvalue()


def test_header_of_a_plain_photo():
    header = read_header(_jpeg(size=(500, 375)))
    assert (header.width, header.height, header.components) == (500, 375, 3)
    assert header.sof == 0xC0 and header.complete and header.device_decodable


@pytest.mark.parametrize("data, why", [
    (_jpeg(progressive=True), "progressive"),
    (_jpeg("L"), "grayscale"),
    (_jpeg("CMYK"), "CMYK (Adobe marker, 4 components)"),
    (_jpeg()[:-10], "truncated"),
])
def test_jpegs_the_gpu_does_not_take(data, why):
    header = read_header(data)
    assert header is not None and not header.device_decodable, why


def test_bytes_after_the_end_marker_do_not_matter():
    """Camera trailers, or bench/photos.unique's: Pillow ignores them, so may the GPU."""
    data = _jpeg(size=(500, 375))
    assert read_header(data + b"\0" + (7).to_bytes(8, "little")).device_decodable
    assert not read_header(data[:-2] + b"\0" * 16).device_decodable  # no end marker at all


def test_exif_orientation_is_read():
    exif = Image.Exif()
    exif[0x0112] = 6
    header = read_header(_jpeg(exif=exif.tobytes()))
    assert header.orientation == 6 and not header.device_decodable
    exif[0x0112] = 1
    assert read_header(_jpeg(exif=exif.tobytes())).device_decodable


def _patch_frame(data: bytes, offset: int, value: bytes) -> bytes:
    """`data` with the bytes at `offset` into the SOF0 segment replaced."""
    at = data.index(b"\xff\xc0") + 4 + offset
    return data[:at] + value + data[at + len(value):]


def test_precision_and_rgb_coding_are_read():
    data = _jpeg()
    assert read_header(data).precision == 8 and not read_header(data).rgb_ids
    assert not read_header(_patch_frame(data, 0, b"\x0c")).device_decodable  # 12-bit
    rgb = _patch_frame(_patch_frame(_patch_frame(data, 6, b"R"), 9, b"G"), 12, b"B")
    assert read_header(rgb).rgb_ids and not read_header(rgb).device_decodable


def test_xmp_orientation_counts_when_exif_has_none():
    """Pillow's exif_transpose falls back to XMP's tiff:Orientation."""
    xmp = b"http://ns.adobe.com/xap/1.0/\x00<x:xmpmeta><rdf:Description tiff:Orientation=\"6\"/>"
    data = _jpeg()
    with_xmp = data[:2] + b"\xff\xe1" + (len(xmp) + 2).to_bytes(2, "big") + xmp + data[2:]
    assert read_header(with_xmp).orientation == 6 and not read_header(with_xmp).device_decodable


def test_hostile_headers_cost_little():
    """Runs of fill bytes, thousands of empty segments, an endless EXIF
    directory: each is left to Pillow, without a long Python loop on the
    event loop."""
    exif = b"Exif\x00\x00II*\x00\x08\x00\x00\x00" + (5000).to_bytes(2, "little") + b"\x00" * 60000
    endless_ifd = b"\xff\xd8\xff\xe1" + (len(exif) + 2).to_bytes(2, "big") + exif + _jpeg()[2:]
    for data in (b"\xff\xd8" + b"\xff" * 20_000_000, b"\xff\xd8" + b"\xff\xfe\x00\x02" * 5_000_000,
                 endless_ifd):
        started = time.perf_counter()
        header = read_header(data)
        assert header is None or not header.device_decodable
        assert time.perf_counter() - started < 1.0


def test_not_jpegs():
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, "PNG")
    for data in (png.getvalue(), b"", b"\xff\xd8", b"\xff\xd8\xff\xda\x00\x02", b"\xff\xd8garbage"):
        assert read_header(data) is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_header_reader_never_raises(tail):
    for data in (tail, b"\xff\xd8" + tail, _jpeg()[:20] + tail):
        header = read_header(data)
        assert header is None or isinstance(header, JpegHeader)  # total: no exception


def test_device_decoder_needs_cuda():
    with pytest.raises(DeviceDecodeUnavailable, match="CUDA"):
        DeviceJpegDecoder(Preprocessor(), torch.device("cpu"))


def test_decode_calls_are_bounded_in_pixels():
    assert pixel_groups([10, 10, 10], 20) == [slice(0, 2), slice(2, 3)]
    assert pixel_groups([50, 5, 5], 20) == [slice(0, 1), slice(1, 3)]  # too big: alone
    assert pixel_groups([5], 20) == [slice(0, 1)]


def _as_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def test_resize_and_crop_match_pillow_within_the_tolerance():
    """The float antialiased resize against Pillow's fixed-point one, on real
    photos of several shapes (one smaller than the crop) and 500x375 photos."""
    pre = Preprocessor()
    images = [decode_image(d) for d in PHOTOS + make_jpegs(8)] + [Image.new("RGB", (100, 60), (9, 200, 30))]
    got = resize_crop([_as_tensor(i) for i in images], pre).permute(0, 2, 3, 1).numpy()
    for image, crop in zip(images, got):
        diff = np.abs(crop.astype(int) - pre.crop(image).astype(int))
        assert diff.mean() < 0.3 and diff.max() <= 8, (image.size, diff.mean(), diff.max())


def test_crop_pads_images_smaller_than_the_crop_with_zeros():
    pre = Preprocessor(do_resize=False)
    image = Image.new("RGB", (100, 60), (9, 200, 30))
    [crop] = resize_crop([_as_tensor(image)], pre).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(crop, pre.crop(image))


def test_device_crops_give_the_same_vectors():
    encoder = ClipEncoder(str(TEST_MODEL), device="cpu")
    images = [decode_image(d) for d in PHOTOS]
    on_cpu = encoder.encode_images([np.stack([encoder.preprocessor.crop(i) for i in images])])
    device = encoder.encode_images([resize_crop([_as_tensor(i) for i in images], encoder.preprocessor)])
    assert (on_cpu * device).sum(axis=1).min() >= 0.999


def test_bucketed_texts_without_mask_match_the_eager_path():
    """What the CUDA graphs run: rows and tokens padded to a bucket, no
    attention mask, executed eagerly here."""
    encoder = ClipEncoder(str(TEST_MODEL), device="cpu", batch_size=8)
    graphs = TextGraphs(encoder._text_vectors, pad_id=encoder.tokenizer.pad_token_id, max_batch=8,
                        max_tokens=encoder.max_text_tokens, device=encoder.device, capture=False)
    texts = ["a red circle", "a photo of a blue square on a white background, drawn by hand",
             "dog", "a " * 100 + "green triangle", "a white dog"]
    for n in (1, 3, 5):
        ids = encoder.tokenizer(texts[:n], padding=True, truncation=True,
                                max_length=encoder.max_text_tokens, return_tensors="pt")["input_ids"]
        assert graphs.padded(ids).shape[0] in graphs.batches and graphs.padded(ids).shape[1] in graphs.lengths
        np.testing.assert_allclose(graphs.run(ids), encoder.encode_texts(texts[:n]), atol=1e-5)


def test_text_buckets():
    graphs = TextGraphs(lambda ids: ids, pad_id=0, max_batch=48, max_tokens=77,
                        device=torch.device("cpu"), capture=False)
    assert graphs.batches == [1, 2, 4, 8, 16, 32, 48]
    assert graphs.lengths == [16, 32, 77]
    assert graphs.padded(torch.ones((33, 17), dtype=torch.long)).shape == (48, 32)
