"""The benchmark suite: real services, real load, the tutorial loop beside.

    python -m bench.suite --profile gpu   # on a CUDA machine
    python -m bench.suite --profile cpu   # batched vs unbatched on a CPU box

Every run uses CLIP ViT-B/32 with random weights (bench/random_clip.py) and
photo-like 500x375 JPEGs (bench/photos.py), starts the services as separate
processes on loopback, and appends a section with device, command, commit
and date to docs/benchmarks.md (raw JSON beside it with --json).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from bench import loadgen
from bench.harness import ROOT, TEST_MODEL, MilvusServer, Service, metric, scrape
from bench.naive import naive_loop
from bench.photos import make_jpegs, unique
from bench.random_clip import write as write_random_clip
from bench.report import guarded
from embedder_service.device_images import DeviceJpegDecoder
from embedder_service.model import ClipEncoder
from embedder_service.preprocess import decode_image


class MemorySampler:
    """Peak RSS and GPU memory of one process while a block runs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def gpu_mb(self) -> float:
        try:
            out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                                  "--format=csv,noheader,nounits"], capture_output=True, text=True,
                                 timeout=10).stdout
        except (OSError, subprocess.TimeoutExpired):
            return 0.0
        return sum(float(m) for p, m in (l.split(",") for l in out.splitlines() if "," in l)
                   if int(p) == self.pid)

    @staticmethod
    def gpu_total_mb() -> float:
        """Memory used on the whole GPU (per-process figures can be hidden in VMs)."""
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10).stdout
            return float(out.split()[0])
        except (OSError, subprocess.TimeoutExpired, IndexError, ValueError):
            return 0.0

    def sample(self) -> dict:
        return {"rss_mb": round(self.rss_mb(), 1), "gpu_mb": round(self.gpu_mb(), 1),
                "gpu_total_mb": round(self.gpu_total_mb(), 1)}

    def peak_during(self, fn):
        peak = {"rss_mb": 0.0, "gpu_mb": 0.0, "gpu_total_mb": 0.0}
        stop = threading.Event()

        def poll():
            while not stop.is_set():
                now = self.sample()
                for key in peak:
                    peak[key] = max(peak[key], now[key])
                stop.wait(0.5)

        thread = threading.Thread(target=poll)
        thread.start()
        try:
            result = fn()
        finally:
            stop.set()
            thread.join()
        return result, peak


def numerics(model_dir: str, jpegs: list[bytes], device: str) -> dict:
    """Cosine between float16 (bfloat16 on CPU) and float32 embeddings of the same images."""
    half = "float16" if device == "cuda" else "bfloat16"
    full, low = ClipEncoder(model_dir, device, "float32"), ClipEncoder(model_dir, device, half)
    crops = np.stack([full.preprocessor.crop(decode_image(j)) for j in jpegs])
    cos = (full.encode_images([crops]) * low.encode_images([crops])).sum(axis=1)
    texts = loadgen.QUERIES
    tcos = (full.encode_texts(texts) * low.encode_texts(texts)).sum(axis=1)
    return {"dtype": half, "image_cos_min": round(float(cos.min()), 5),
            "text_cos_min": round(float(tcos.min()), 5)}


def model_alone(model_dir: str, device: str, batch: int = 256) -> dict:
    """The ceiling: the encoder with no server, no decoding (random crops);
    one text with CUDA graphs (the default on CUDA) and eagerly."""
    encoder = ClipEncoder(model_dir, device, batch_size=batch)
    crops = np.random.default_rng(0).integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8)
    texts = (loadgen.QUERIES * batch)[:batch]

    def per_second(fn, items: int, reps: int = 10) -> float:
        fn()
        started = time.perf_counter()
        for _ in range(reps):
            fn()
        return round(items * reps / (time.perf_counter() - started), 1)

    def single_text_ms(enc: ClipEncoder) -> float:
        times = []
        for _ in range(200):
            started = time.perf_counter()
            enc.encode_texts(["a white dog"])
            times.append((time.perf_counter() - started) * 1000)
        return round(float(np.percentile(times, 50)), 3)

    eager = ClipEncoder(model_dir, device, batch_size=batch, cuda_graphs=False)
    return {"batch": batch, "images_per_s": per_second(lambda: encoder.encode_images([crops]), batch),
            "texts_per_s": per_second(lambda: encoder.encode_texts(texts), batch),
            "texts_per_s_eager": per_second(lambda: eager.encode_texts(texts), batch),
            "cuda_graphs": encoder.text_graphs is not None,
            "single_text_ms_p50": single_text_ms(encoder),
            "single_text_ms_p50_eager": single_text_ms(eager)}


def device_decode(model_dir: str, jpegs: list[bytes]) -> dict:
    """nvJPEG plus the device resize against the CPU path (pixels and float16
    vectors of the same photos), and the decoder's own rate in 32-image calls."""
    encoder = ClipEncoder(model_dir, "cuda", cuda_graphs=False)
    decoder = DeviceJpegDecoder(encoder.preprocessor, encoder.device)
    photos = [p.read_bytes() for p in sorted((ROOT / "tests" / "fixtures" / "photos").glob("*.jpg"))]
    trailers = [unique(j, i) for i, j in enumerate(jpegs[:8])]  # bytes after the end marker
    sample = [j for j in photos + jpegs[:64] + trailers if decoder.pixels(j, 50_000_000)]
    on_cpu = np.stack([encoder.preprocessor.crop(decode_image(j)) for j in sample])
    on_gpu = decoder.crops(sample, [decoder.pixels(j, 50_000_000) for j in sample])
    diff = np.abs(on_gpu.permute(0, 2, 3, 1).cpu().numpy().astype(int) - on_cpu.astype(int))
    cos = (encoder.encode_images([on_cpu]) * encoder.encode_images([on_gpu])).sum(axis=1)
    calls = [jpegs[i:i + 32] for i in range(0, len(jpegs), 32)] * 4
    decode = lambda call: decoder.crops(call, [decoder.pixels(j, 50_000_000) for j in call])
    rates = {}
    for threads in (1, 2, 4):
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(decode, calls[:threads]))  # each thread's stream
            started = time.perf_counter()
            list(pool.map(decode, calls))
            rates[str(threads)] = round(32 * len(calls) / (time.perf_counter() - started), 1)
    return {"images": len(sample), "pixel_mean_abs_diff": round(float(diff.mean()), 4),
            "pixel_max_abs_diff": int(diff.max()),
            "pixels_differing": round(float((diff > 0).mean()), 4),
            "vector_cos_min": round(float(cos.min()), 5),
            "decoder_images_per_s_by_threads": rates}


def _cpu_s(stat: Path) -> float:
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> dict:
    """CPU seconds of a process and its children (--workers; Milvus Lite runs
    inside a search process), and of their main threads (the event loops)."""
    from bench.ingest_cpu import tree
    total = loops = 0.0
    for each in tree(pid):
        try:
            total += _cpu_s(Path(f"/proc/{each}/stat"))
            loops += _cpu_s(Path(f"/proc/{each}/task/{each}/stat"))
        except OSError:  # gone meanwhile
            pass
    return {"total": total, "event_loop": loops}


def ingest(searches: list[Service], jpegs: list[bytes], seconds: float, streams: int) -> dict:
    """Ingest through one or more search-service replicas (on one port), with
    where the search processes spent their CPU per image and the mean Milvus
    call time: what to look at when ingest trails EncodeImage."""
    before = [(cpu_seconds(s.process.pid), scrape(s)) for s in searches]
    result = loadgen.run(server=searches[0].address, target="Ingest", concurrency=streams,
                         batch=256, procs=4, duration_s=seconds, jpegs=jpegs, warmup_s=0)
    images = max(result["requests"] * 256, 1)
    cpu = {"total": 0.0, "event_loop": 0.0}
    calls: dict = {}
    for search, (cpu0, metrics0) in zip(searches, before):
        cpu1, metrics1 = cpu_seconds(search.process.pid), scrape(search)
        for key in cpu:
            cpu[key] += cpu1[key] - cpu0[key]
        for op in ("upsert", "get"):
            for part in ("count", "sum"):
                name = f"search_milvus_call_seconds_{part}"
                calls.setdefault(op, {}).setdefault(part, 0.0)
                calls[op][part] += metric(metrics1, name, operation=op) - metric(metrics0, name, operation=op)
    result["replicas"] = len(searches)
    result["search_cpu_us_per_image"] = {k: round(v * 1e6 / images) for k, v in cpu.items()}
    result["milvus_call_ms"] = {op: round(1000 * c["sum"] / c["count"], 1) if c["count"] else None
                                for op, c in calls.items()}
    return result


def _wait_workers(search: Service, count: int, timeout_s: float = 180) -> None:
    """Until each of `count` workers says it listens (health on the shared
    port reaches any one of them), and the port answers SERVING."""
    deadline = time.monotonic() + timeout_s
    while search.log().count("listening on") < count:
        if time.monotonic() > deadline or search.process.poll() is not None:
            raise RuntimeError(f"search workers did not start:\n{search.log()[-2000:]}")
        time.sleep(0.5)  # start-up announces itself only in the log
    search.wait_ready(120)


def ingest_on_server(embedder: str, work: Path, jpegs: list[bytes], seconds: float,
                     workers: int = 8) -> dict:
    """Ingest into a Milvus standalone server through one search process, then
    through one search deployment of `workers` worker processes sharing its
    port (--workers; gRPC sets SO_REUSEPORT): the scale-out path, which a
    Milvus Lite file (served by one process) cannot take."""
    (work / "milvus-server").mkdir(exist_ok=True)
    server = MilvusServer(work / "milvus-server").wait_ready()
    out = {}
    try:
        for count in dict.fromkeys((1, workers)):
            search = Service("search_service", ["--embedder", embedder, "--milvus-uri", server.uri,
                                                "--collection", f"bench{count}", "--workers",
                                                str(count), "--ingest-batch", "256"],
                             work / f"search-server-workers-{count}.log")
            try:
                _wait_workers(search, count)
                guarded(out, f"workers_{count}",
                        lambda: ingest([search], jpegs, seconds, streams=min(8 * count, 64)))
            finally:
                out[f"exit_code_workers_{count}"] = search.stop()
    finally:
        server.stop()
    return out


def gpu_profile(model: str, work: Path, jpegs: list[bytes], seconds: float,
                compare_cpu_decode: bool = True) -> dict:
    out: dict = {}

    def naive():
        result = naive_loop(model, jpegs[:300], "cuda", torch.float16, str(work / "naive.db"))
        result.pop("vectors")
        return result

    guarded(out, "naive", naive)
    guarded(out, "numerics", lambda: numerics(model, jpegs[:64], "cuda"))
    guarded(out, "model_alone", lambda: model_alone(model, "cuda"))
    guarded(out, "device_decode", lambda: device_decode(model, jpegs))
    torch.cuda.empty_cache()

    def start(decode: str) -> tuple[Service, MemorySampler]:
        embedder = Service("embedder_service", ["--model", model, "--batch-size", "256",
                                                "--preprocess-workers", "14", "--image-decode",
                                                decode, "--max-queue", "100000"],
                           work / f"embedder-{decode}.log")
        embedder.wait_ready(600)
        return embedder, MemorySampler(embedder.process.pid)

    def load(server: str, **kw):
        return lambda: loadgen.run(server=server, duration_s=seconds, jpegs=jpegs, **kw)

    if compare_cpu_decode:  # images only: Pillow in 14 worker processes, as before nvJPEG
        embedder, mem = start("cpu")
        guarded(out, "encode_image_cpu_decode", lambda: mem.peak_during(
            load(embedder.address, target="EncodeImage", concurrency=32, batch=32, procs=4)))
        out["exit_embedder_cpu_decode"] = embedder.stop()

    embedder, mem = start("auto")
    out["image_decode"] = "gpu" if "(nvJPEG)" in embedder.log() else "cpu"
    out["memory_idle"] = mem.sample()
    guarded(out, "encode_image", lambda: mem.peak_during(
        load(embedder.address, target="EncodeImage", concurrency=32, batch=32, procs=4)))
    guarded(out, "encode_text_b32", lambda: mem.peak_during(
        load(embedder.address, target="EncodeText", concurrency=64, batch=32, procs=4)))
    guarded(out, "encode_text_b1", load(embedder.address, target="EncodeText", concurrency=64,
                                        batch=1, procs=4))
    guarded(out, "single_text", load(embedder.address, target="EncodeText", concurrency=1, batch=1))
    search = Service("search_service", ["--embedder", embedder.address, "--data-dir",
                                        str(work / "data"), "--ingest-batch", "256"],
                     work / "search.log")
    search.wait_ready(120)
    guarded(out, "ingest", lambda: ingest([search], jpegs, seconds, streams=8))
    out["exit_search"] = search.stop()
    # The same through --workers on Milvus Lite: the parent serves the Lite
    # file to the workers, so Lite (one process) bounds what they add.
    workers = int(os.environ.get("SEARCH_BENCH_WORKERS", "8"))
    search = Service("search_service", ["--embedder", embedder.address, "--data-dir",
                                        str(work / "data-workers"), "--ingest-batch", "256",
                                        "--workers", str(workers)], work / "search-workers.log")
    guarded(out, f"ingest_lite_workers_{workers}", lambda: (
        _wait_workers(search, workers), ingest([search], jpegs, seconds, streams=8 * workers))[1])
    out["exit_search_workers"] = search.stop()
    if shutil.which("milvus-server"):
        guarded(out, "ingest_milvus_server", lambda: ingest_on_server(
            embedder.address, work, jpegs, seconds, int(os.environ.get("SEARCH_BENCH_WORKERS", "8"))))
    out["exit_embedder"] = embedder.stop()
    return out


def cpu_profile(model: str, work: Path, jpegs: list[bytes], seconds: float,
                compare_cpu_decode: bool = False) -> dict:
    out: dict = {}
    naive = naive_loop(model, jpegs[:40], "cpu", torch.float32, str(work / "naive.db"))
    naive.pop("vectors")
    out["naive"] = naive
    for name, flags in (("unbatched", ["--batch-size", "1", "--batch-wait-ms", "0"]),
                        ("batched", ["--batch-size", "32"])):
        embedder = Service("embedder_service", ["--model", model, *flags, "--preprocess-workers",
                                                "2", "--max-queue", "100000"],
                           work / f"embedder-{name}.log")
        embedder.wait_ready(600)
        mem = MemorySampler(embedder.process.pid)
        out[f"{name}_memory_idle"] = mem.sample()
        run = lambda **kw: loadgen.run(server=embedder.address, duration_s=seconds, jpegs=jpegs,
                                       warmup_s=3, **kw)
        out[f"{name}_image"], out[f"{name}_memory_load"] = mem.peak_during(
            lambda: run(target="EncodeImage", concurrency=32, batch=1))
        out[f"{name}_text"] = run(target="EncodeText", concurrency=32, batch=1)
        out[f"{name}_exit"] = embedder.stop()
    return out


def device_name(profile: str) -> str:
    if profile == "gpu":
        return f"{torch.cuda.get_device_name(0)}, {os.cpu_count()} CPU cores"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, no GPU"


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=["gpu", "cpu"], required=True)
    parser.add_argument("--seconds", type=float, default=15, help="length of each load run")
    parser.add_argument("--compare-cpu-decode", action=argparse.BooleanOptionalAction, default=True,
                        help="gpu: also run EncodeImage with --image-decode cpu")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--commit", default=None, help="commit to report (default: git HEAD)")
    parser.add_argument("--tokenizer", type=Path, default=TEST_MODEL,
                        help="checkpoint directory to take tokenizer files from")
    parser.add_argument("--work", type=Path, help="keep model, data and service logs here "
                                                   "(default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        model = str(write_random_clip(work / "vit-b32-random", args.tokenizer))
        jpegs = make_jpegs(512)
        profile = gpu_profile if args.profile == "gpu" else cpu_profile
        started = time.time()
        results = profile(model, work, jpegs, args.seconds, args.compare_cpu_decode)
    results["meta"] = {"device": device_name(args.profile), "commit": args.commit or commit(),
                       "date": datetime.date.today().isoformat(), "python": sys.version.split()[0],
                       "torch": torch.__version__, "wall_s": round(time.time() - started),
                       "command": " ".join(["python -m bench.suite", *sys.argv[1:]])}
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
