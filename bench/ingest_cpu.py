"""Ingest beside EncodeImage on the same images, and what ingest costs the search service.

    python -m bench.ingest_cpu --seconds 10 --rounds 3 --workers 1 2 \
        --baseline /tmp/08be5de /tmp/6e5e0e8 --json docs/bench/ingest-cpu-2core-64d.json
    python -m bench.ingest_cpu --projection-dim 512 --milvus-server ...

(`--floor`: also bench/relay.py in the service's place, the least any
search process spends per image; `--baseline DIR ...`: checkouts of earlier
commits, `git archive COMMIT | tar -x -C DIR` with their protos compiled,
run first; `--projection-dim 512`: vectors as wide as ViT-B/32's from a
cheap random model; `--milvus-server`: a Milvus 2.3.5 standalone server
instead of Lite.)

For each setting (each baseline checkout, each `--workers` value of this
one, the floor) it starts that code's embedder and search service (Milvus
Lite under its data directory) as separate processes on loopback. All
settings stay up side by side, and take their rounds in turn: in each, a
closed-loop `EncodeImage` run against the setting's embedder, then an
`Ingest` run through its search service. The load comes from that code's
own bench/loadgen.py, in a process of its own, so a checkout from before
the API revision is loaded as its clients used it (one image per Ingest
message). Every run sends the same photo JPEGs; ingest gives each image a
trailer so that every one is new, at the same decode cost. For each Ingest
run it records the CPU seconds of the search service's whole process tree
(the parent, its workers, and Milvus Lite, which runs inside a search
process) per ingested image, and the share of that spent on the main
thread (the event loop of a single-process service).

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
from dataclasses import dataclass, field
from pathlib import Path

from bench.harness import ROOT, free_port, stop_process
from bench.photos import make_jpegs
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


# Run in the checkout under test, so its own loadgen speaks its own API.
_LOAD = """import json, sys
from pathlib import Path
from bench import loadgen
from bench.photos import unique
a = json.loads(sys.argv[1])
jpegs = [p.read_bytes() for p in sorted(Path(a["jpegs"]).iterdir())]
jpegs = [unique(jpeg, a["run"]) for jpeg in jpegs] if a["run"] else jpegs
print(json.dumps(loadgen.run(a["target"], a["server"], a["clients"], a["batch"], a["seconds"],
                             jpegs=jpegs, warmup_s=0, procs=1)))
"""


def load(code: Path, target: str, server: str, jpegs: Path, seconds: float, clients: int,
         batch: int, run: int = 0) -> dict:
    """One closed-loop load run by `code`'s bench/loadgen.py (`run` > 0: the
    images given that run's trailer, so none is stored yet)."""
    args = {"target": target, "server": server, "jpegs": str(jpegs), "seconds": seconds,
            "clients": clients, "batch": batch, "run": run}
    done = subprocess.run([sys.executable, "-c", _LOAD, json.dumps(args)], cwd=code, text=True,
                          capture_output=True, env={**os.environ, "PYTHONPATH": str(code)})
    if done.returncode:
        raise RuntimeError(f"{target} load from {code} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def encode_run(code: Path, embedder: Proc, jpegs: Path, seconds, clients, batch) -> dict:
    before = cpu(embedder.process.pid)
    result = load(code, "EncodeImage", embedder.address, jpegs, seconds, clients, batch)
    used, _ = cpu_used(before, cpu(embedder.process.pid))
    images = max(result["requests"] * batch, 1)
    result["embedder_cpu_us_per_image"] = round(used * 1e6 / images)
    result["load_average"] = load_average()
    return result


_RUNS = itertools.count(1)


def ingest_run(code: Path, search: Proc, embedder: Proc, jpegs: Path, seconds, streams,
               batch) -> dict:
    before, before_embedder = cpu(search.process.pid), cpu(embedder.process.pid)
    # Bytes of their own for each run (loadgen numbers its images from 0 in
    # every run): every image new, so each is embedded and written.
    result = load(code, "Ingest", search.address, jpegs, seconds, streams, batch, next(_RUNS))
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


@dataclass
class Arm:
    """One setting: `code`'s embedder and search service (or bench/relay.py)."""
    name: str
    code: Path
    workers: int
    relay: bool
    runs: list = field(default_factory=list)
    embedder: Proc | None = None
    search: Proc | None = None

    def start(self, args, work: Path, server) -> None:
        # Kept before waiting, so stop() finds it whatever ends the wait.
        self.embedder = Proc("embedder_service", ["--model", args.model,
                                                  *args.embedder_args.split()],
                             work / f"embedder-{self.name}.log", cwd=self.code)
        self.embedder.ready()
        if self.relay:
            self.search = Proc("bench.relay", ["--embedder", self.embedder.address],
                               work / "relay.log")
        else:
            self.search = Proc("search_service", [
                "--embedder", self.embedder.address, "--data-dir", str(work / f"data-{self.name}"),
                *(["--workers", str(self.workers)] if self.workers != 1 else []),
                "--ingest-batch", str(args.ingest_batch),
                *(["--milvus-uri", server.uri, "--collection", f"bench_{self.name}"]
                  if server else []),
                *args.search_args.split()], work / f"search-{self.name}.log", cwd=self.code)
        self.search.ready()

    def warm_up(self, args, jpegs: Path) -> None:
        load(self.code, "EncodeImage", self.embedder.address, jpegs, 2, args.clients, args.batch)
        load(self.code, "Ingest", self.search.address, jpegs, 2, args.clients, args.batch,
             next(_RUNS))

    def round(self, args, jpegs: Path) -> None:
        encode = encode_run(self.code, self.embedder, jpegs, args.seconds, args.clients,
                            args.batch)
        ingest = ingest_run(self.code, self.search, self.embedder, jpegs, args.seconds,
                            args.clients, args.batch)
        self.runs.append({"encode_image": encode, "ingest": ingest,
                          "ratio": round(ingest["items_per_s"] / encode["items_per_s"], 3)})

    def stop(self) -> dict:
        """The arm's summary, once its processes have stopped."""
        exits = {role: proc.stop() for role, proc in (("search", self.search),
                                                      ("embedder", self.embedder)) if proc}
        ratios = sorted(r["ratio"] for r in self.runs)
        per_image = sorted(r["ingest"]["search_cpu_us_per_image"]["total"] for r in self.runs)
        return {"code": str(self.code), "runs": self.runs, "exit_codes": exits,
                "ratio_median": ratios[len(ratios) // 2] if ratios else None,
                "search_cpu_us_per_image_median":
                    per_image[len(per_image) // 2] if per_image else None}


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
    parser.add_argument("--baseline", type=Path, nargs="+", default=[],
                        help="also run, first, the system of each of these checkouts of earlier "
                             "commits (`git archive COMMIT | tar -x -C DIR`, then its protos "
                             "compiled as scripts/install.sh does): its embedder, a "
                             "single-process search service and its own load generator, so "
                             "before and after come from one run")
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

    out: dict = {"meta": {
        "command": " ".join(["python -m bench.ingest_cpu", *sys.argv[1:]]),
        "commit": args.commit or commit(), "date": datetime.date.today().isoformat(),
        "cpus": len(os.sched_getaffinity(0)), "python": sys.version.split()[0],
        "load_average_at_start": load_average(),
        "baselines": [str(code) for code in args.baseline]}, "settings": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        jpegs = work / "jpegs"
        jpegs.mkdir()
        for n, jpeg in enumerate(make_jpegs(args.images)):
            (jpegs / f"{n:05d}.jpg").write_bytes(jpeg)
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
        # Baselines first, the floor last. All run side by side, idle but for
        # their turn, and take their rounds in turn: the machine's load drifts
        # (other jobs share it), so each arm's rounds fall minutes apart from
        # the others', not a whole setting apart.
        arms = [Arm(f"baseline_{code.name}", code.resolve(), 1, False) for code in args.baseline]
        arms += [Arm(f"workers_{workers}", ROOT, workers, False) for workers in args.workers]
        arms += [Arm("floor", ROOT, 1, True)] if args.floor else []
        try:
            for arm in arms:
                arm.start(args, work, server)
                arm.warm_up(args, jpegs)
            for number in range(args.rounds):
                for arm in arms:
                    arm.round(args, jpegs)
                print(f"round {number + 1} of {args.rounds}: " + ", ".join(
                    f"{arm.name} {arm.runs[-1]['ingest']['search_cpu_us_per_image']['total']} us"
                    for arm in arms), flush=True)
        finally:
            for arm in arms:
                out["settings"][arm.name] = arm.stop()
            if server is not None:
                server.stop()
        out["meta"]["milvus"] = "Milvus 2.3.5 standalone server" if server else "Milvus Lite"
    out["meta"]["load_average_at_end"] = load_average()
    emit(out, args.json)


if __name__ == "__main__":
    main()
