"""Reading a JPEG's header without decoding it: size, precision, colour
components, coding process, orientation and whether the scan is complete.

The GPU decoder (device_images.py) takes only the JPEGs it decodes as the
CPU path would see them: 8-bit baseline or extended Huffman coding, three
YCbCr components, no Adobe colour transform marker, upright (orientation 1
in EXIF and in XMP, where Pillow also looks) and complete: an EOI marker
after the first scan starts. A truncated file has none; bytes after it
(camera trailers) both decoders ignore. Everything else goes to Pillow on
the CPU.

Untrusted bytes only ever make it return None (or a header the GPU does not
take), and the scan is bounded: a header with more than `_MAX_MARKERS`
markers before its first scan, or an EXIF directory longer than
`_MAX_IFD_ENTRIES`, is left to Pillow, so no input costs more than a few
hundred Python steps.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_HUFFMAN_SEQUENTIAL = {0xC0, 0xC1}  # baseline, extended: what nvJPEG decodes on the GPU
_SOS, _EOI = 0xDA, b"\xff\xd9"
_MAX_MARKERS = 128  # real headers have a few dozen at most (ICC profiles span several)
_MAX_IFD_ENTRIES = 256
_ORIENTATION_TAG = 0x0112
_UNKNOWN = 0  # an orientation we could not read: not upright as far as we know
_FILL = re.compile(rb"\xff{1,8}")
_XMP = b"http://ns.adobe.com/xap/1.0/\x00"
_XMP_ORIENTATION = re.compile(rb'tiff:Orientation(?:="|>)([0-9])')


@dataclass(frozen=True)
class JpegHeader:
    width: int
    height: int
    precision: int  # bits per sample
    components: int
    rgb_ids: bool  # components named R, G, B: stored as RGB, not YCbCr
    sof: int  # the frame marker: 0xC0 baseline, 0xC2 progressive, ...
    orientation: int  # 1 upright; 0 unreadable
    adobe: bool  # an Adobe APP14 segment (colour transform may differ)
    complete: bool  # an EOI marker follows the start of the first scan

    @property
    def device_decodable(self) -> bool:
        return (self.complete and self.precision == 8 and self.components == 3
                and not self.rgb_ids and self.sof in _HUFFMAN_SEQUENTIAL
                and self.orientation == 1 and not self.adobe
                and self.width > 0 and self.height > 0)


def _exif_orientation(tiff: bytes) -> int | None:
    """The orientation tag of IFD0 in an EXIF TIFF block: None when absent,
    0 when the directory is cut off or too long to read."""
    order = {b"II": "little", b"MM": "big"}.get(tiff[:2])
    if order is None or len(tiff) < 8:
        return None
    ifd = int.from_bytes(tiff[4:8], order)
    if ifd + 2 > len(tiff):
        return _UNKNOWN
    count = int.from_bytes(tiff[ifd:ifd + 2], order)
    if count > _MAX_IFD_ENTRIES or ifd + 2 + 12 * count > len(tiff):
        return _UNKNOWN
    for entry in range(ifd + 2, ifd + 2 + 12 * count, 12):
        if int.from_bytes(tiff[entry:entry + 2], order) == _ORIENTATION_TAG:
            return int.from_bytes(tiff[entry + 8:entry + 10], order)
    return None


def read_header(data: bytes) -> JpegHeader | None:
    """The header of a JPEG, or None when `data` is not one, its markers
    before the first scan are malformed, or there are too many of them."""
    if not data.startswith(b"\xff\xd8"):
        return None
    exif = xmp = None
    adobe, frame, pos, end = False, None, 2, len(data)
    for _ in range(_MAX_MARKERS):
        fill = _FILL.match(data, pos)  # a marker, after at most a few fill bytes
        if fill is None or fill.end() >= end or data[fill.end()] == 0xFF:
            return None
        pos = fill.end() - 1
        if pos + 4 > end:
            return None
        marker = data[pos + 1]
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if length < 2 or marker == 0xD9:
            return None
        if marker == _SOS:
            if frame is None:
                return None
            orientation = exif if exif is not None else xmp if xmp is not None else 1
            return JpegHeader(**frame, orientation=orientation, adobe=adobe,
                              complete=data.rfind(_EOI) > pos)
        segment = data[pos + 4:pos + 2 + length]
        if marker == 0xE1 and segment.startswith(b"Exif\x00\x00") and exif is None:
            exif = _exif_orientation(segment[6:])
        elif marker == 0xE1 and segment.startswith(_XMP) and xmp is None:
            found = _XMP_ORIENTATION.search(segment)
            xmp = int(found.group(1)) if found else None
        elif marker == 0xEE and segment.startswith(b"Adobe"):
            adobe = True
        elif marker in _SOF and frame is None:
            if len(segment) < 6:
                return None
            components = segment[5]
            ids = tuple(segment[6 + 3 * i] for i in range(min(components, 3))
                        if 6 + 3 * i < len(segment))
            frame = dict(width=int.from_bytes(segment[3:5], "big"),
                         height=int.from_bytes(segment[1:3], "big"), precision=segment[0],
                         components=components, rgb_ids=ids == (82, 71, 66), sof=marker)
        pos += 2 + length
    return None
