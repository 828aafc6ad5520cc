"""What decoding costs, for the admission weights in embedder_service/preprocess.py.

    python -m bench.decode_cost [--side 2000] [--rounds 3]

Measures, with Pillow alone (no admission check in the way):
- a baseline JPEG, and progressive JPEGs whose last scan is repeated to N
  scans: seconds, and nanoseconds per pixel per scan beyond the baseline;
- the 8-bit conversion of a float TIFF (`_to_8bit`): peak bytes per pixel of
  numpy and Python memory (tracemalloc).
Prints one JSON object; docs/benchmarks.md quotes it with machine and commit.
"""
from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import time
import tracemalloc

import numpy as np
from PIL import Image

from embedder_service.preprocess import _to_8bit, jpeg_scans


def _jpeg(side: int, progressive: bool) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (side, side), (200, 100, 50)).save(out, "JPEG", progressive=progressive)
    return out.getvalue()


def _with_scans(data: bytes, extra: int) -> bytes:
    end = data.rindex(b"\xff\xd9")
    return data[:end] + data[data.rindex(b"\xff\xda"):end] * extra + b"\xff\xd9"


def _decode_s(data: bytes, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        with Image.open(io.BytesIO(data)) as image:
            image.load()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--side", type=int, default=2000, help="image side in pixels")
    parser.add_argument("--rounds", type=int, default=3, help="decodes per case (median)")
    args = parser.parse_args()
    pixels = args.side * args.side
    baseline = _decode_s(_jpeg(args.side, False), args.rounds)
    progressive = _jpeg(args.side, True)
    jpeg = {"baseline_s": round(baseline, 4)}
    for extra in (0, 90, 490):
        data = _with_scans(progressive, extra)
        seconds = _decode_s(data, args.rounds)
        scans = jpeg_scans(data)
        jpeg[f"{scans}_scans_s"] = round(seconds, 4)
        if extra:
            jpeg[f"{scans}_scans_ns_per_pixel_scan"] = round((seconds - baseline) / pixels / scans * 1e9, 3)
    ramp = np.linspace(0, 1, pixels, dtype=np.float32).reshape(args.side, args.side)
    tiff = Image.fromarray(ramp, mode="F")
    tracemalloc.start()
    _to_8bit(tiff)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(json.dumps({"machine": platform.processor() or platform.machine(), "side": args.side,
                      "jpeg": jpeg, "float_tiff_peak_bytes_per_pixel": round(peak / pixels, 2)},
                     indent=2))


if __name__ == "__main__":
    main()
