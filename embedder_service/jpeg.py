"""Reading a JPEG's header without decoding it: size, colour components,
coding process and EXIF orientation.

The GPU decoder (device_images.py) takes only the JPEGs it decodes exactly
as the CPU path would see them: baseline or extended Huffman coding, three
components, no Adobe colour transform marker, upright (EXIF orientation 1)
and complete: an EOI marker after the frame header. A truncated file has
none; bytes after it (camera trailers) both decoders ignore. Everything else
goes to Pillow on the CPU. A few microseconds of Python per image; untrusted
bytes only ever make it return None.
"""
from __future__ import annotations

from dataclasses import dataclass

_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_HUFFMAN_SEQUENTIAL = {0xC0, 0xC1}  # baseline, extended: what nvJPEG decodes on the GPU
_ORIENTATION_TAG = 0x0112


@dataclass(frozen=True)
class JpegHeader:
    width: int
    height: int
    components: int
    sof: int  # the frame marker: 0xC0 baseline, 0xC2 progressive, ...
    orientation: int  # EXIF orientation, 1 when absent
    adobe: bool  # an Adobe APP14 segment (colour transform may differ)
    complete: bool  # an EOI marker follows the frame header

    @property
    def device_decodable(self) -> bool:
        return (self.complete and self.components == 3 and self.sof in _HUFFMAN_SEQUENTIAL
                and self.orientation == 1 and not self.adobe and self.width > 0 and self.height > 0)


def _orientation(tiff: bytes) -> int:
    """The orientation tag of IFD0 in an EXIF TIFF block; 1 when unreadable."""
    order = {b"II": "little", b"MM": "big"}.get(tiff[:2])
    if order is None or len(tiff) < 8:
        return 1
    ifd = int.from_bytes(tiff[4:8], order)
    if ifd + 2 > len(tiff):
        return 1
    for i in range(int.from_bytes(tiff[ifd:ifd + 2], order)):
        entry = ifd + 2 + 12 * i
        if entry + 12 > len(tiff):
            break
        if int.from_bytes(tiff[entry:entry + 2], order) == _ORIENTATION_TAG:
            return int.from_bytes(tiff[entry + 8:entry + 10], order)
    return 1


def read_header(data: bytes) -> JpegHeader | None:
    """The header of a JPEG, or None when `data` is not one (or the markers
    before the frame header are malformed)."""
    if not data.startswith(b"\xff\xd8"):
        return None
    orientation, adobe, pos, end = 1, False, 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if length < 2 or marker in (0xD9, 0xDA):  # image or scan before any frame header
            return None
        segment = data[pos + 4:pos + 2 + length]
        if marker == 0xE1 and segment.startswith(b"Exif\x00\x00") and orientation == 1:
            orientation = _orientation(segment[6:])
        elif marker == 0xEE and segment.startswith(b"Adobe"):
            adobe = True
        elif marker in _SOF:
            if len(segment) < 6:
                return None
            return JpegHeader(width=int.from_bytes(segment[3:5], "big"),
                              height=int.from_bytes(segment[1:3], "big"), components=segment[5],
                              sof=marker, orientation=orientation, adobe=adobe,
                              complete=data.rfind(b"\xff\xd9") > pos)
        pos += 2 + length
    return None
