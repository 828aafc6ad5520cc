"""Embedder configuration: flags with EMBEDDER_* environment twins, parsed once."""
from __future__ import annotations

import os
from dataclasses import dataclass

from imagesearch.flags import EnvArgumentParser, ServerConfig, boolean, positive_int

DEFAULT_MODEL = "openai/clip-vit-base-patch32"


@dataclass(frozen=True)
class EmbedderConfig(ServerConfig):
    model: str
    model_revision: str
    device: str
    dtype: str
    max_batch_items: int
    batch_size: int
    batch_wait_ms: float
    max_queue: int
    preprocess_workers: int
    preprocess_mode: str
    image_decode: str
    cuda_graphs: bool
    torch_threads: int
    max_image_pixels: int
    max_decode_mpx: int


def build_parser() -> EnvArgumentParser:
    p = EnvArgumentParser(
        prog="python -m embedder_service", env_prefix="EMBEDDER_",
        description="Serve CLIP text and image embeddings over gRPC (imagesearch.v1.EmbedderService). "
                    "Vectors are L2-normalised; texts longer than the model's context are truncated.")
    p.section("model")
    p.env_flag("--model", default=DEFAULT_MODEL,
               help="CLIP checkpoint: a Hugging Face hub id or a local directory written by "
                    "save_pretrained. Offline machines need a local directory (or a filled "
                    "HF cache with HF_HUB_OFFLINE=1)")
    p.env_flag("--model-revision", default="",
               help="for a hub id: the commit (or tag) to load, so a restart or a new pod "
                    "never picks up other weights; empty takes the hub's default branch")
    p.env_flag("--device", default="auto",
               help="torch device: auto (CUDA when present, else CPU), cpu, cuda, cuda:N")
    p.env_flag("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
               help="weights dtype: auto is float16 on CUDA and float32 on CPU")
    p.env_flag("--cuda-graphs", default=True, type=boolean,
               help="on CUDA, replay text encoding from CUDA graphs captured at start-up (one "
                    "per batch and length bucket), so single queries are not launch-bound "
                    "(true or false; ignored on CPU)")
    p.env_flag("--torch-threads", default=0, type=int,
               help="CPU threads torch may use for one forward pass; 0 keeps torch's default "
                    "(all cores). Lower it when other busy processes share the cores")
    p.server_flags(port=50051)
    p.section("batching")
    p.env_flag("--max-batch-items", default=512, type=positive_int,
               help="most texts or images accepted in one request (more: INVALID_ARGUMENT)")
    p.env_flag("--batch-size", default=64, type=positive_int,
               help="most items in one forward pass: concurrent requests are batched together "
                    "up to this; a larger request runs in several passes (1 turns batching off)")
    p.env_flag("--batch-wait-ms", default=0.0, type=float,
               help="how long the oldest queued request may wait for a batch to fill. 0 runs "
                    "as soon as the model is free, adding no latency when idle; under load "
                    "batches still fill while the previous one runs")
    p.env_flag("--max-queue", default=4096, type=positive_int,
               help="most items waiting for the model; beyond it requests get RESOURCE_EXHAUSTED "
                    "at once instead of piling up into timeouts")
    p.section("images")
    p.env_flag("--preprocess-workers", default=os.cpu_count() or 1, type=positive_int,
               help="threads that decode and resize images in parallel")
    p.env_flag("--preprocess-mode", default="auto", choices=["auto", "thread", "process"],
               help="run the preprocess workers as threads, or as processes (no GIL: scales "
                    "further on many cores, costs memory and a copy per image); auto is "
                    "process on CUDA, where decoding is the bottleneck, else thread")
    p.env_flag("--image-decode", default="auto", choices=["auto", "cpu", "gpu"],
               help="where JPEGs are decoded and resized: gpu uses nvJPEG (torchvision) and "
                    "resizes on the device, for baseline RGB JPEGs that need no rotation (the "
                    "rest still go to the CPU workers); cpu is Pillow, pixel-exact with "
                    "transformers. auto is gpu when CUDA and torchvision with nvJPEG are "
                    "present, else cpu")
    p.env_flag("--max-image-pixels", default=50_000_000, type=positive_int,
               help="images declaring more pixels are refused before decoding "
                    "(decompression-bomb guard); formats that cost more to decode get less: "
                    "half for WebP and PNG, a quarter for 16-bit PNG and float or 32-bit "
                    "TIFF; a JPEG costs one baseline decode per 10 scans (over 100: refused)")
    p.env_flag("--max-decode-mpx", default=1000, type=positive_int,
               help="decode work admitted at once, in megapixels of baseline JPEG (WebP and "
                    "PNG count double, and so on by the cost of each image): beyond it "
                    "RESOURCE_EXHAUSTED before any decoding. A request is always admitted when "
                    "nothing else is decoding")
    return p


def parse_config(argv: list[str] | None = None) -> EmbedderConfig:
    return EmbedderConfig(**vars(build_parser().parse_args(argv)))
