"""Ingest beside EncodeImage on the same images, and what ingest costs the search service.

    python -m bench.ingest_cpu --seconds 10 --rounds 3 --workers 1 2 \
        --baseline /tmp/base --json docs/bench/ingest-cpu-2core-64d.json
    python -m bench.ingest_cpu --projection-dim 512 --milvus-server ...

(`--floor`: also bench/relay.py in the service's place, the least any
search process spends per image; `--baseline DIR`: a checkout of an
earlier commit, `git archive COMMIT | tar -x -C DIR`, run first;
`--projection-dim 512`: vectors as wide as ViT-B/32's from a cheap random
model; `--milvus-server`: a Milvus 2.3.5 standalone server instead of Lite.)

Starts one embedder and, for each `--workers` value, one search service
(Milvus Lite under its data directory) as separate processes on loopback,
then alternates closed-loop `EncodeImage` runs against the embedder and
`Ingest` runs through the search service (bench/loadgen.py, the same photo
JPEGs; ingest gives each image a trailer so that every one is new, at the
same decode cost). For each Ingest run it records the CPU seconds of the
search service's whole process tree (the parent, its workers, and Milvus
Lite, which runs inside a search process) per ingested image, and the share
of that spent on the main thread (the event loop of a single-process
service). Ratios compare runs of the same invocation, back to back.

This script starts its own processes (it does not use the test helpers),
and a Milvus server only with `--milvus-server`.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import loadgen
from bench.harness import ROOT, free_port, stop_process
from bench.photos import make_jpegs, unique
from bench.report import emit, load_average
from imagesearch.health import wait_serving


class Proc:
    """`python -m MODULE ARGS` on a free loopback port, logging to a file:
    not harness.Service, whose flags (--health-port) an earlier checkout
    run by --baseline may not have."""

    def __init__(self, module: str, args: list[str], log: Path, cwd: Path = ROOT) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log = log
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", module, "--host", "127.0.0.1", "--port", str(self.port), *args],
                cwd=cwd, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=out,
                stderr=subprocess.STDOUT)

    def ready(self, timeout_s: float = 300) -> "Proc":
        try:
            wait_serving(self.address, timeout_s, alive=lambda: self.process.poll() is None)
        except Exception:
            self.stop()
            raise RuntimeError(f"{self.log} never got ready:\n{self.log.read_text()[-3000:]}")
        return self

    def stop(self) -> int:
        return stop_process(self.process, 60)


def _ticks(pid: int, task: int | None = None) -> float:
    path = f"/proc/{pid}/task/{task}/stat" if task else f"/proc/{pid}/stat"
    try:
        with open(path) as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:  # gone meanwhile
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree(pid: int) -> list[int]:
    """`pid` and its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo.extend(children.get(current, []))
    return out


def cpu(pid: int) -> dict[int, tuple[float, float]]:
    """{pid: (CPU seconds, main thread's CPU seconds)} over the process tree of `pid`."""
    return {p: (_ticks(p), _ticks(p, p)) for p in tree(pid)}


def cpu_used(before: dict, after: dict) -> tuple[float, float]:
    """CPU seconds (all threads, main threads) the tree used between two `cpu` readings."""
    total = main = 0.0
    for pid, (t1, m1) in after.items():
        t0, m0 = before.get(pid, (0.0, 0.0))
        total, main = total + t1 - t0, main + m1 - m0
    return total, main


def encode_run(embedder: Proc, jpegs, seconds, clients, batch) -> dict:
    before = cpu(embedder.process.pid)
    result = loadgen.run(target="EncodeImage", server=embedder.address, concurrency=clients,
                         batch=batch, duration_s=seconds, jpegs=jpegs, warmup_s=0, procs=1)
    used, _ = cpu_used(before, cpu(embedder.process.pid))
    images = max(result["requests"] * batch, 1)
    result["embedder_cpu_us_per_image"] = round(used * 1e6 / images)
    result["load_average"] = load_average()
    return result


_RUNS = itertools.count(1)


def ingest_run(search: Proc, embedder: Proc, jpegs, seconds, streams, batch) -> dict:
    # Bytes of their own for each run (loadgen numbers its images from 0 in
    # every run): every image new, so each is embedded and written.
    run = next(_RUNS)
    jpegs = [unique(jpeg, run) for jpeg in jpegs]
    before, before_embedder = cpu(search.process.pid), cpu(embedder.process.pid)
    result = loadgen.run(target="Ingest", server=search.address, concurrency=streams,
                         batch=batch, duration_s=seconds, jpegs=jpegs, warmup_s=0, procs=1)
    used, main = cpu_used(before, cpu(search.process.pid))
    used_embedder, _ = cpu_used(before_embedder, cpu(embedder.process.pid))
    images = max(result["requests"] * batch, 1)
    result["search_cpu_us_per_image"] = {"total": round(used * 1e6 / images),
                                         "main_threads": round(main * 1e6 / images)}
    result["search_processes"] = len(tree(search.process.pid))
    result["embedder_cpu_us_per_image"] = round(used_embedder * 1e6 / images)
    result["load_average"] = load_average()
    return result


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "search_service", "bench"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out + ("+changes" if dirty else "") if out else "unknown"
    except OSError:
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "tests" / "fixtures" / "shapes-clip"))
    parser.add_argument("--projection-dim", type=int, default=0,
                        help="instead of --model, a random tiny CLIP (bench/random_clip.py) "
                             "whose vectors are this wide (512: ViT-B/32's)")
    for flag, default, what in (
            ("--seconds", 15.0, "length of each load run"),
            ("--rounds", 2, "EncodeImage/Ingest pairs per setting"),
            ("--images", 256, "distinct photo JPEGs"),
            ("--clients", 8, "concurrent callers of each run"),
            ("--batch", 64, "images per request (per Ingest stream)"),
            ("--ingest-batch", 64, "the search service's --ingest-batch"),
            ("--embedder-args", "--preprocess-workers 2 --max-queue 100000",
             "extra embedder flags"),
            ("--search-args", "", "extra search-service flags")):
        parser.add_argument(flag, type=type(default), default=default, help=what)
    parser.add_argument("--workers", type=int, nargs="+", default=[1],
                        help="search-service --workers settings to run, one after another")
    parser.add_argument("--baseline", type=Path,
                        help="also run, first, a single-process search service from this "
                             "checkout of an earlier commit (e.g. `git archive COMMIT | tar -x "
                             "-C DIR`), so before and after come from one run")
    parser.add_argument("--milvus-server", action="store_true",
                        help="write into a Milvus 2.3.5 standalone server (PyPI `milvus`) that "
                             "this script starts, instead of Milvus Lite: the search processes' "
                             "CPU is then the service's alone (Lite runs inside a search process)")
    parser.add_argument("--floor", action="store_true",
                        help="also run bench/relay.py in the search service's place: the CPU "
                             "that passing the bytes through Python gRPC costs, a floor")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--commit", default=None)
    args = parser.parse_args()

    jpegs = make_jpegs(args.images)
    out: dict = {"meta": {
        "command": " ".join(["python -m bench.ingest_cpu", *sys.argv[1:]]),
        "commit": args.commit or commit(), "date": datetime.date.today().isoformat(),
        "cpus": len(os.sched_getaffinity(0)), "python": sys.version.split()[0],
        "load_average_at_start": load_average(),
        "baseline": str(args.baseline) if args.baseline else None}, "settings": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.projection_dim:
            from bench.random_clip import write_tiny
            args.model = str(write_tiny(work / "tiny-clip", args.projection_dim))
        out["meta"]["model"] = args.model if not args.projection_dim else \
            f"random tiny CLIP, {args.projection_dim}-d vectors"
        server = None
        if args.milvus_server:
            from bench.harness import MilvusServer
            (work / "milvus").mkdir()
            server = MilvusServer(work / "milvus").wait_ready()
        embedder = Proc("embedder_service", ["--model", args.model, *args.embedder_args.split()],
                        work / "embedder.log").ready()
        try:
            loadgen.run(target="EncodeImage", server=embedder.address, concurrency=args.clients,
                        batch=args.batch, duration_s=2, jpegs=jpegs, warmup_s=0)  # warm-up
            settings = [("baseline", 1)] if args.baseline else []
            settings += [(f"workers_{workers}", workers) for workers in args.workers]
            settings += [("floor", 1)] if args.floor else []
            for name, workers in settings:
                if name == "floor":
                    search = Proc("bench.relay", ["--embedder", embedder.address], work / "relay.log")
                else:
                    search = Proc("search_service", [
                        "--embedder", embedder.address, "--data-dir", str(work / f"data-{name}"),
                        *(["--workers", str(workers)] if workers != 1 else []),
                        "--ingest-batch", str(args.ingest_batch),
                        *(["--milvus-uri", server.uri, "--collection", f"bench_{name}"]
                          if server else []),
                        *args.search_args.split()], work / f"search-{name}.log",
                        cwd=args.baseline if name == "baseline" else ROOT)
                search.ready()
                runs = []
                try:
                    loadgen.run(target="Ingest", server=search.address, concurrency=args.clients,
                                batch=args.batch, duration_s=2, jpegs=jpegs, warmup_s=0)  # warm-up
                    for _ in range(args.rounds):
                        encode = encode_run(embedder, jpegs, args.seconds, args.clients, args.batch)
                        ingest = ingest_run(search, embedder, jpegs, args.seconds, args.clients,
                                            args.batch)
                        runs.append({"encode_image": encode, "ingest": ingest,
                                     "ratio": round(ingest["items_per_s"] / encode["items_per_s"], 3)})
                finally:
                    code = search.stop()
                ratios = sorted(r["ratio"] for r in runs)
                per_image = sorted(r["ingest"]["search_cpu_us_per_image"]["total"] for r in runs)
                out["settings"][name] = {
                    "runs": runs, "exit_code": code, "ratio_median": ratios[len(ratios) // 2],
                    "search_cpu_us_per_image_median": per_image[len(per_image) // 2]}
                print(json.dumps(out["settings"][name], indent=1), flush=True)
        finally:
            out["meta"]["exit_embedder"] = embedder.stop()
            if server is not None:
                server.stop()
        out["meta"]["milvus"] = "Milvus 2.3.5 standalone server" if server else "Milvus Lite"
    out["meta"]["load_average_at_end"] = load_average()
    emit(out, args.json)


if __name__ == "__main__":
    main()
