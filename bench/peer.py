"""Side by side with a peer: our embedder and search service against Infinity
(PyPI `infinity-emb`, a REST embedding server), in one run, on one machine,
serving the same local checkpoint directory, with the same images.

    python -m bench.peer --seconds 10 --json docs/bench/peer-cpu-2core.json

Infinity lives in its own virtualenv (`.peer/`, see docs/benchmarks.md for
the install line), never in ours; this script only starts its CLI as a
process and talks to it over HTTP, so none of its code is imported here.

Cases, each run on both systems one after the other (ours, then the peer),
so that a change in the machine's load hits both:
- EncodeImage: closed-loop clients sending 32 JPEGs per request (Infinity:
  `POST /embeddings` with `modality: image` and base64 data URIs);
- EncodeText, 64 clients x 1 text (Infinity: `POST /embeddings`);
- one text: one client, one text per request, back to back: p50/p99;
- Ingest and SearchByText: ours only (Infinity has no vector store), the
  peer's rows say so.
Both servers get the same model, dtype, batch size and CPU threads for the
model; the CPU seconds each server process spent per item are recorded, so a
row where we trail shows where the time went. The tutorial's naive loop
(bench/naive.py) runs in the same session for the ratios.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import datetime
import itertools
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np

from bench import loadgen
from bench.harness import ROOT, TEST_MODEL, Service, answers_within, free_port, stop_process
from bench.report import emit, guarded, load_average
from bench.photos import make_jpegs

PEER_NAME = "peer"
NOT_RUN = {
    "Ingest": "n/a: Infinity only embeds; it has no vector store and no ingest API",
    "SearchByText": "n/a: Infinity only embeds; it has no vector store to search",
}


# --- CPU accounting -------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) of a process and its descendants."""
    from bench.ingest_cpu import tree
    total = 0.0
    for each in tree(pid):
        try:
            fields = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):  # gone meanwhile
            pass
    return total


def with_cpu(pids: list[int], fn, warm=None) -> dict:
    """Run one load (after `warm`, unmeasured); add the servers' CPU seconds
    per item during it."""
    if warm is not None:
        warm()
    before = sum(cpu_seconds(p) for p in pids)
    result = fn()
    spent = sum(cpu_seconds(p) for p in pids) - before
    items = result["requests"] * result["batch"]
    result["server_cpu_s"] = round(spent, 2)
    result["server_cpu_ms_per_item"] = round(1000 * spent / items, 3) if items else None
    return result


# --- a small asyncio HTTP/1.1 client for the peer --------------------------

class Http:
    """One keep-alive HTTP/1.1 connection; POST with a prepared body."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader = self.writer = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        await self.writer.drain()
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:] if l)}
        if "content-length" not in headers:
            raise RuntimeError(f"no Content-Length in the peer's answer: {headers}")
        data = await self.reader.readexactly(int(headers["content-length"]))
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return status, data

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None


def text_body(texts: list[str]) -> bytes:
    return json.dumps({"model": PEER_NAME, "input": texts, "encoding_format": "base64"}).encode()


def image_body(jpegs: list[bytes]) -> bytes:
    return json.dumps({"model": PEER_NAME, "modality": "image", "encoding_format": "base64",
                       "input": ["data:image/jpeg;base64," + base64.b64encode(j).decode() for j in jpegs]}
                      ).encode()


async def _http_load(address, bodies, batch, concurrency, duration_s):
    host, port = address.rsplit(":", 1)
    latencies, errors = [], Counter()
    stop_at = time.perf_counter() + duration_s

    async def client(worker: int) -> None:
        http = Http(host, int(port))
        turn = itertools.count(worker)
        while time.perf_counter() < stop_at:
            body = bodies[next(turn) % len(bodies)]
            started = time.perf_counter()
            try:
                status, data = await http.post("/embeddings", body)
                if status != 200:
                    errors[f"HTTP_{status}"] += 1
                    continue
                if len(json.loads(data)["data"]) != batch:
                    errors["WRONG_COUNT"] += 1
                    continue
                latencies.append(time.perf_counter() - started)
            except (OSError, asyncio.IncompleteReadError, RuntimeError) as exc:
                errors[type(exc).__name__] += 1
                await http.close()
        await http.close()

    started = time.perf_counter()
    await asyncio.gather(*(client(w) for w in range(concurrency)))
    return latencies, dict(errors), time.perf_counter() - started


def _http_proc(args):
    return asyncio.run(_http_load(*args))


def http_run(address: str, bodies: list[bytes], batch: int, concurrency: int, duration_s: float,
             procs: int = 1, warmup_s: float = 1.0) -> dict:
    """The peer's counterpart of loadgen.run: closed-loop clients over
    `procs` processes, each sending prepared request bodies back to back."""
    if warmup_s > 0:
        asyncio.run(_http_load(address, bodies, batch, concurrency, warmup_s))
    jobs = [(address, bodies, batch, n, duration_s)
            for n in loadgen.split(concurrency, max(1, min(procs, concurrency)))]
    return loadgen.summarize(loadgen.in_processes(_http_proc, jobs), concurrency, batch)


# --- the two servers ------------------------------------------------------

class Peer:
    """Infinity's CLI (`infinity_emb v2`) as a process on a free port."""

    def __init__(self, command: list[str], model: str, work: Path, batch: int, threads: int,
                 device: str, dtype: str, pythonpath: str | None) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = work / "infinity.log"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1",
               "INFINITY_ANONYMOUS_USAGE_STATS": "0", "OMP_NUM_THREADS": str(threads),
               "MKL_NUM_THREADS": str(threads)}
        if pythonpath is not None:  # its own packages only (e.g. the GPU machine's --target dir)
            env["PYTHONPATH"] = pythonpath
        self.argv = [*command, "v2", "--model-id", model, "--served-model-name", PEER_NAME,
                     "--batch-size", str(batch), "--engine", "torch", "--device", device,
                     "--dtype", dtype, "--no-bettertransformer", "--host", "127.0.0.1",
                     "--port", str(self.port), "--log-level", "warning"]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.argv, cwd=work, env=env, stdout=log,
                                            stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = 300) -> "Peer":
        def answers() -> None:
            with urllib.request.urlopen(f"http://{self.address}/models", timeout=5) as r:
                json.load(r)
        if not answers_within(answers, OSError, self.process, timeout_s):
            self.stop()
            raise RuntimeError(f"Infinity not ready after {timeout_s} s; log tail:\n"
                               + self.log_path.read_text(errors="replace")[-3000:])
        return self

    def stop(self) -> int:
        return stop_process(self.process, 30)


def peer_versions(command: list[str], pythonpath: str | None) -> dict:
    """The peer's own package versions, asked of its interpreter."""
    python = command[0] if command[1:3] == ["-m", "infinity_emb.cli"] else \
        str(Path(command[0]).with_name("python"))
    code = ("import json, importlib.metadata as m, sys\n"
            "out = {'python': sys.version.split()[0]}\n"
            "for p in ('infinity-emb', 'torch', 'transformers', 'tokenizers', 'numpy', 'pillow',"
            " 'fastapi', 'uvicorn', 'huggingface-hub'):\n"
            "    try: out[p] = m.version(p)\n"
            "    except m.PackageNotFoundError: out[p] = None\n"
            "print(json.dumps(out))")
    env = {**os.environ, **({"PYTHONPATH": pythonpath} if pythonpath is not None else {})}
    try:
        return json.loads(subprocess.run([python, "-c", code], capture_output=True, text=True,
                                         env=env, timeout=60).stdout)
    except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
        return {"error": str(exc)}


def our_versions() -> dict:
    import importlib.metadata as m
    out = {"python": sys.version.split()[0]}
    for p in ("torch", "transformers", "tokenizers", "numpy", "pillow", "grpcio", "pymilvus", "milvus-lite"):
        try:
            out[p] = m.version(p)
        except m.PackageNotFoundError:
            out[p] = None
    return out


def same_vectors(ours: str, peer: str, jpegs: list[bytes]) -> dict:
    """Both systems embed the same 8 photos and texts: the minimum cosine
    between their vectors (they serve the same checkpoint, so about 1)."""
    import grpc
    from imagesearch.v1 import embedder_pb2, embedder_pb2_grpc

    texts = loadgen.QUERIES[:8]
    with grpc.insecure_channel(ours, options=[("grpc.max_receive_message_length", 64 << 20)]) as channel:
        stub = embedder_pb2_grpc.EmbedderServiceStub(channel)
        mine = {"image": stub.EncodeImage(embedder_pb2.EncodeImageRequest(images=jpegs[:8])),
                "text": stub.EncodeText(embedder_pb2.EncodeTextRequest(texts=texts))}

    def vectors(response) -> np.ndarray:
        return np.stack([np.frombuffer(e.vector, "<f4") for e in response.embeddings])

    def theirs(body: bytes) -> np.ndarray:
        request = urllib.request.Request(f"http://{peer}/embeddings", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as r:
            return np.stack([np.frombuffer(base64.b64decode(d["embedding"]), "<f4")
                             for d in json.load(r)["data"]])

    out = {}
    for kind, body in (("image", image_body(jpegs[:8])), ("text", text_body(texts))):
        try:
            a, b = vectors(mine[kind]), theirs(body)
            cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
            out[f"{kind}_cos_min"] = round(float(cos.min()), 5)
        except Exception as exc:  # noqa: BLE001 - a benchmark reports, it does not stop
            out[f"{kind}_cos_min"] = f"{type(exc).__name__}: {exc}"
    return out


def run(args) -> dict:
    work = args.work
    jpegs = make_jpegs(args.images)
    out: dict = {"settings": {
        "model": str(args.model), "device": args.device, "dtype": args.dtype,
        "batch_size": args.batch_size, "torch_threads": args.threads,
        "ours_preprocess_workers": args.preprocess_workers, "images": len(jpegs),
        "seconds_per_case": args.seconds, "warmup_s": args.warmup, "image_clients": args.image_clients,
        "image_batch": 32, "text_clients": 64, "client_procs": args.procs}}
    out["load_average_before"] = load_average()

    import torch
    from bench.naive import naive_loop

    def naive():
        result = naive_loop(str(args.model), jpegs[:args.naive_images], args.device,
                            getattr(torch, args.dtype), str(work / "naive.db"))
        result.pop("vectors")
        return result

    guarded(out, "naive", naive)

    ours = Service("embedder_service", [
        "--model", str(args.model), "--device", args.device, "--dtype", args.dtype,
        "--batch-size", str(args.batch_size), "--torch-threads",
        str(args.threads), "--preprocess-workers", str(args.preprocess_workers), "--max-queue", "100000"],
        work / "embedder.log", env={"OMP_NUM_THREADS": str(args.threads)})
    peer = Peer(shlex.split(args.peer_cmd), str(args.model), work, args.batch_size, args.threads,
                args.device, args.dtype, args.peer_pythonpath)
    search = None
    try:
        ours.wait_ready(600)
        peer.wait_ready(600)
        out["peer_argv"] = peer.argv
        guarded(out, "same_vectors", lambda: same_vectors(ours.address, peer.address, jpegs))
        image_bodies = [image_body(jpegs[i:i + 32]) for i in range(0, len(jpegs) - 31, 32)]
        text_bodies = [text_body([q]) for q in loadgen.QUERIES]
        # each load: fn(seconds); a warm-up of the same load runs first,
        # outside the CPU bracket, so the CPU per item counts measured items only
        ours_cases = {
            "encode_image": lambda t: loadgen.run("EncodeImage", ours.address, args.image_clients, 32, t,
                                                  procs=min(args.procs, args.image_clients), jpegs=jpegs,
                                                  warmup_s=0),
            "encode_text_64x1": lambda t: loadgen.run("EncodeText", ours.address, 64, 1, t, procs=args.procs,
                                                      warmup_s=0),
            "one_text": lambda t: loadgen.run("EncodeText", ours.address, 1, 1, t, warmup_s=0),
        }
        peer_cases = {
            "encode_image": lambda t: http_run(peer.address, image_bodies, 32, args.image_clients, t,
                                               procs=min(args.procs, args.image_clients), warmup_s=0),
            "encode_text_64x1": lambda t: http_run(peer.address, text_bodies, 1, 64, t, procs=args.procs,
                                                   warmup_s=0),
            "one_text": lambda t: http_run(peer.address, text_bodies, 1, 1, t, warmup_s=0),
        }
        for case in ours_cases:
            out.setdefault(case, {})["load_average"] = load_average()
            for who, fn, pid in (("ours", ours_cases[case], ours.process.pid),
                                 ("peer", peer_cases[case], peer.process.pid)):
                guarded(out[case], who, lambda: with_cpu([pid], lambda: fn(args.seconds),
                                                         warm=lambda: fn(args.warmup)))
        if args.search:
            search = Service("search_service", ["--embedder", ours.address, "--data-dir", str(work / "data")],
                             work / "search.log")
            search.wait_ready(180)
            out["ingest"] = {"load_average": load_average(), "peer": NOT_RUN["Ingest"]}
            guarded(out["ingest"], "ours", lambda: with_cpu(
                [search.process.pid, ours.process.pid],
                lambda: loadgen.run("Ingest", search.address, 4, 32, args.seconds, jpegs=jpegs, warmup_s=0)))
            out["search_by_text"] = {"load_average": load_average(), "peer": NOT_RUN["SearchByText"]}
            guarded(out["search_by_text"], "ours", lambda: with_cpu(
                [search.process.pid, ours.process.pid],
                lambda: loadgen.run("SearchByText", search.address, 1, 1, args.seconds, warmup_s=0),
                warm=lambda: loadgen.run("SearchByText", search.address, 1, 1, args.warmup, warmup_s=0)))
    finally:
        if search is not None:
            out["exit_search"] = search.stop()
        out["exit_ours"] = ours.stop()
        out["exit_peer"] = peer.stop()
    naive_rate = out.get("naive", {}).get("images_per_s")
    if naive_rate:
        out["ratio_to_naive"] = {who: round(out["encode_image"][who]["items_per_s"] / naive_rate, 2)
                                 for who in ("ours", "peer")
                                 if "items_per_s" in out["encode_image"].get(who, {})}
    out["load_average_after"] = load_average()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", type=Path, default=TEST_MODEL, help="checkpoint directory both serve")
    parser.add_argument("--peer-cmd", default=str(ROOT / ".peer" / "bin" / "infinity_emb"),
                        help="how to start Infinity's CLI (e.g. 'python3 -m infinity_emb.cli')")
    parser.add_argument("--peer-pythonpath", default=None,
                        help="PYTHONPATH for the peer's process only (its packages installed with --target)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    parser.add_argument("--batch-size", type=int, default=32, help="most items per forward pass, both")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="torch CPU threads, both (ours: --torch-threads; Infinity: OMP_NUM_THREADS)")
    parser.add_argument("--preprocess-workers", type=int, default=2, help="ours: decode threads")
    parser.add_argument("--image-clients", type=int, default=8, help="EncodeImage clients (32 images each)")
    parser.add_argument("--procs", type=int, default=2, help="client processes for the concurrent cases")
    parser.add_argument("--images", type=int, default=256, help="distinct photo-like JPEGs")
    parser.add_argument("--naive-images", type=int, default=100, help="images through the naive loop")
    parser.add_argument("--seconds", type=float, default=10, help="length of each load run")
    parser.add_argument("--warmup", type=float, default=2, help="seconds of the same load before each run")
    parser.add_argument("--search", action=argparse.BooleanOptionalAction, default=True,
                        help="also run ours' Ingest and SearchByText (Milvus Lite); the peer has none")
    parser.add_argument("--work", type=Path, help="keep logs and data here (default: a temporary folder)")
    parser.add_argument("--commit", default=None)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        args.work = args.work or Path(tmp)
        args.work.mkdir(parents=True, exist_ok=True)
        results = run(args)
    commit = args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                           capture_output=True, text=True).stdout.strip() or "unknown"
    results["meta"] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores"
                   + (", no GPU" if args.device == "cpu" else ""),
        "commit": commit, "date": datetime.date.today().isoformat(),
        "command": " ".join(["python -m bench.peer", *sys.argv[1:]]),
        "wall_s": round(time.time() - started),
        "ours": our_versions(), "peer": peer_versions(shlex.split(args.peer_cmd), args.peer_pythonpath)}
    emit(results, args.json)


if __name__ == "__main__":
    main()
