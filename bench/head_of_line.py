"""Text latency while large image requests run: does one query wait behind them?

    python -m bench.head_of_line --images-per-request 512 --image-clients 2

Starts an embedder (a random-weight CLIP ViT-B/32 by default, or `--model`),
times `--texts` single-text EncodeText calls one after another on an idle
server, then again while `--image-clients` threads keep sending EncodeImage
requests of `--images-per-request` photos. Prints p50/p99 of both and the
ratio of loaded p99 to idle p50 (the fleet issue's bound: at most 10).
"""
from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np

from bench.photos import make_jpegs
from bench.random_clip import write as write_random_clip
from bench.report import emit
from imagesearch.client import EmbedderClient


def text_latencies(address: str, count: int) -> list[float]:
    with EmbedderClient(address, timeout_s=120) as client:
        out = []
        for i in range(count):
            started = time.perf_counter()
            client.encode_texts([f"a photo of a dog number {i}"])
            out.append(time.perf_counter() - started)
        return out


def summary(seconds: list[float]) -> dict:
    ms = np.array(seconds) * 1000
    return {"calls": len(ms), "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1)}


def main() -> None:
    from bench.harness import start_embedder

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="", help="checkpoint (default: random-weight ViT-B/32)")
    p.add_argument("--texts", type=int, default=40)
    p.add_argument("--images-per-request", type=int, default=512)
    p.add_argument("--image-clients", type=int, default=2)
    p.add_argument("--torch-threads", default="2")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model or write_random_clip(tmp / "vit-b-32-random")
        embedder = start_embedder(tmp, "--model", str(model), "--torch-threads", args.torch_threads,
                                  "--max-batch-items", str(args.images_per_request),
                                  "--max-queue", str(4 * args.images_per_request))
        try:
            embedder.wait_ready(600)
            text_latencies(embedder.address, 5)  # warm-up
            idle = summary(text_latencies(embedder.address, args.texts))
            images = make_jpegs(args.images_per_request)
            stop, image_calls = threading.Event(), []

            def send_images():
                with EmbedderClient(embedder.address, timeout_s=600) as client:
                    while not stop.is_set():
                        started = time.perf_counter()
                        try:
                            client.encode_images(images)
                            image_calls.append(time.perf_counter() - started)
                        except grpc.RpcError as exc:
                            image_calls.append(exc.code().name)
            threads = [threading.Thread(target=send_images) for _ in range(args.image_clients)]
            for thread in threads:
                thread.start()
            time.sleep(2)  # lets the image requests reach the model before texts are timed
            loaded = summary(text_latencies(embedder.address, args.texts))
            stop.set()
            for thread in threads:
                thread.join()
        finally:
            embedder.stop()
    done = [c for c in image_calls if isinstance(c, float)]
    emit({"model": args.model or "random ViT-B/32", "images_per_request": args.images_per_request,
          "image_clients": args.image_clients, "idle_text": idle, "text_under_image_load": loaded,
          "image_requests_completed": len(done),
          "image_request_p50_s": round(float(np.median(done)), 2) if done else None,
          "image_errors": [c for c in image_calls if isinstance(c, str)],
          "loaded_p99_over_idle_p50": round(loaded["p99_ms"] / idle["p50_ms"], 1)}, args.out)


if __name__ == "__main__":
    main()
