"""`--workers N`: N search processes serving one port, supervised by this one.

One search process is bound by its interpreter lock at about one core. With
`--workers N` (N > 1) the process started by the operator (the parent)
serves no calls itself: it starts N copies of the service (the workers) as
child processes, with the same flags and environment. Each worker binds the
same API port; gRPC sets SO_REUSEPORT on Linux (`grpc.so_reuseport`, on by
default), so the kernel spreads incoming connections over the workers. Each
worker has its own event loop, Milvus client and embedder channel, and
serves health on the shared port: a probe reaches whichever worker the
kernel picks, and each answers for itself.

The parent
- replaces a worker that exits while the service runs, with a log line
  (after a pause that doubles, up to 30 s, while workers keep dying within
  seconds of their start); a worker that exits with status 2 (a start-up
  problem the operator must fix) makes the parent stop the others and exit
  2 as well, since its replacement would fail the same way;
- on SIGTERM or SIGINT, passes SIGTERM to every worker (each turns health
  NOT_SERVING and finishes its in-flight calls within `--grace-s`), waits
  for them, and exits 0; a worker still running after the grace period
  plus a margin is killed, and that, or a worker failing while it stops,
  makes the exit status 1;
- serves the Prometheus metrics of all workers on `--metrics-port`
  (prometheus_client's multiprocess mode: each worker writes its metrics to
  files in a private PROMETHEUS_MULTIPROC_DIR; counters and histograms are
  summed over workers, dead ones included, so rates stay monotonic), plus
  `search_workers` (live workers), `search_worker_restarts_total` and
  `search_worker_rpcs_total{worker_pid}` (RPCs each worker handled: how
  evenly connections spread);
- with Milvus Lite (no `--milvus-uri`), opens the Lite file itself (a Lite
  file can be opened by one process only) and serves it on its private
  Unix socket (store/lite.py); the workers connect to that socket. All Milvus
  work then runs in the parent, so Lite caps what workers add: a Milvus
  server is the way to ingest at the speed of many workers.

Duplicate answers across workers are those across replicas: within one
worker, concurrent streams of one new image give one INSERTED and the
others wait and say ALREADY_PRESENT; streams on two workers may both say
INSERTED, and the image is still one row (writes are upserts by content id).

`--workers 0` picks one worker per available core: the CPUs this process
may run on (sched_getaffinity), lowered to a cgroup v2 CPU quota
(cpu.max at the cgroup root, which is the container's own cgroup in a
container) when one is set, at most `MAX_AUTO_WORKERS`.
"""
from __future__ import annotations

import logging
import math
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("search_service.workers")

MAX_AUTO_WORKERS = 8
_CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
_QUICK_EXIT_S = 10.0  # a worker that dies sooner after its start counts towards the backoff
_MAX_BACKOFF_S = 30.0
_KILL_MARGIN_S = 5.0  # beyond --grace-s, before a draining worker is killed


def cgroup_cpus(path: Path = _CGROUP_CPU_MAX) -> float | None:
    """The cgroup v2 CPU quota in CPUs ("200000 100000" is 2.0), or None without one."""
    try:
        quota, period = path.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return int(quota) / int(period)
    except (ValueError, ZeroDivisionError):
        return None


def available_cores(cpu_max: Path = _CGROUP_CPU_MAX) -> int:
    """CPUs this process may use: its affinity, lowered to the cgroup quota (rounded up)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    quota = cgroup_cpus(cpu_max)
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


def resolve(workers: int) -> int:
    """The number of worker processes `--workers` asks for (0: one per core, capped)."""
    return workers if workers > 0 else min(available_cores(), MAX_AUTO_WORKERS)


@dataclass
class _Worker:
    slot: int
    process: subprocess.Popen
    started: float = field(default_factory=time.monotonic)


class Supervisor:
    """Start `count` workers running `command` (plus worker-only flags); keep them running."""

    def __init__(self, count: int, command: list[str], grace_s: float,
                 metrics_dir: str | None = None, lite_uri: str = "") -> None:
        self._count = count
        self._command = command
        self._grace_s = grace_s
        self._env = dict(os.environ)
        if metrics_dir:
            self._env["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        self._metrics_dir = metrics_dir
        self._extra = ["--workers", "1", "--metrics-port", "0", "--worker-of", str(os.getpid())]
        if lite_uri:
            self._extra += ["--worker-lite-uri", lite_uri]
        self._workers: dict[int, _Worker] = {}  # slot -> worker
        self._restart_at: dict[int, float] = {}  # slot -> when to start its replacement
        self._quick_exits = 0
        self.restarts = 0
        self._stopping = False
        self._wake_r, self._wake_w = os.pipe()

    @property
    def pids(self) -> list[int]:
        # A copy first: the metrics thread reads this while the main thread
        # replaces workers (list() of a dict view runs under the GIL at once).
        return [w.process.pid for w in list(self._workers.values())]

    def _start(self, slot: int) -> None:
        process = subprocess.Popen([*self._command, *self._extra], env=self._env)
        self._workers[slot] = _Worker(slot, process)
        log.info("worker %d started (pid %d)", slot, process.pid)

    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        if signum in (signal.SIGTERM, signal.SIGINT):
            self._stopping = True

    def run(self) -> int:
        """Until SIGTERM or SIGINT; the exit status for the parent."""
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(sig, self._on_signal)
        os.set_blocking(self._wake_w, False)
        os.set_blocking(self._wake_r, False)
        signal.set_wakeup_fd(self._wake_w)
        for slot in range(self._count):
            self._start(slot)
        status = 0
        while not self._stopping:
            status = self._reap()
            if status:
                break
            now = time.monotonic()
            for slot, when in list(self._restart_at.items()):
                if when <= now and not self._stopping:
                    del self._restart_at[slot]
                    self._start(slot)
            timeout = max(0.0, min(self._restart_at.values()) - time.monotonic()) \
                if self._restart_at else None
            try:  # woken by any signal (SIGCHLD: a worker exited), or for a due restart
                select.select([self._wake_r], [], [], timeout)
                os.read(self._wake_r, 512)
            except BlockingIOError:
                pass
            except InterruptedError:
                pass
        return self._stop(status)

    def _reap(self) -> int:
        """Note workers that exited and plan their replacements; 2 when one
        exited with a start-up error (stop everything)."""
        for slot, worker in list(self._workers.items()):
            code = worker.process.poll()
            if code is None:
                continue
            del self._workers[slot]
            self._forget(worker.process.pid)
            if code == 2:
                log.error("worker %d (pid %d) exited with status 2 (a start-up error, see above): "
                          "stopping the other workers", slot, worker.process.pid)
                return 2
            lived = time.monotonic() - worker.started
            self._quick_exits = self._quick_exits + 1 if lived < _QUICK_EXIT_S else 0
            delay = 0.0 if not self._quick_exits else min(_MAX_BACKOFF_S,
                                                          0.5 * 2 ** (self._quick_exits - 1))
            how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
            log.warning("worker %d (pid %d) %s after %.1f s; replacing it%s", slot,
                        worker.process.pid, how, lived, f" in {delay:.1f} s" if delay else "")
            self.restarts += 1
            self._restart_at[slot] = time.monotonic() + delay
        return 0

    def _forget(self, pid: int) -> None:
        """Drop a dead worker's live gauges from the metrics (its counters stay)."""
        if self._metrics_dir:
            from prometheus_client import multiprocess
            multiprocess.mark_process_dead(pid, self._metrics_dir)

    def _stop(self, status: int) -> int:
        """SIGTERM every worker, wait for them to drain; kill what outlives the grace period."""
        self._stopping = True
        workers = list(self._workers.values())
        log.info("stopping %d workers: in-flight calls get up to %.1f s", len(workers),
                 self._grace_s)
        for worker in workers:
            if worker.process.poll() is None:
                worker.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self._grace_s + _KILL_MARGIN_S
        for worker in workers:
            try:
                code = worker.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker %d (pid %d) still running after the grace period: killing it",
                          worker.slot, worker.process.pid)
                worker.process.kill()
                worker.process.wait()
                status = status or 1
                continue
            if code not in (0, -signal.SIGTERM):
                log.error("worker %d (pid %d) exited with status %s while stopping",
                          worker.slot, worker.process.pid, code)
                status = status or 1
        signal.set_wakeup_fd(-1)
        os.close(self._wake_r)
        os.close(self._wake_w)
        log.info("all workers stopped")
        return status


def follow_parent(parent: int) -> None:
    """In a worker: get SIGTERM (and drain) when the parent dies, even by
    SIGKILL, rather than serve on unsupervised (Linux; elsewhere a no-op)."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before the call above
        os.kill(os.getpid(), signal.SIGTERM)
    log.info("worker pid %d of supervisor pid %d", os.getpid(), parent)


def serve_metrics(port: int, host: str, directory: str, supervisor: Supervisor) -> None:
    """The workers' metrics, summed, and the parent's own, on http://HOST:PORT/metrics."""
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
    from prometheus_client.multiprocess import MultiProcessCollector

    from imagesearch.flags import exit_startup

    from imagesearch.observability import package_version
    version = package_version()

    class _Parent:
        def collect(self):
            # Info metrics do not work in multiprocess mode: the parent says it.
            yield InfoMetricFamily("imagesearch_build", "What runs: the imagesearch version and "
                                   "which server", value={"version": version, "server": "search"})
            yield GaugeMetricFamily("search_workers", "Live search worker processes",
                                    value=len(supervisor.pids))
            yield CounterMetricFamily("search_worker_restarts", "Workers that exited and were "
                                      "replaced", value=supervisor.restarts)
            rpcs = CounterMetricFamily("search_worker_rpcs", "RPCs (health checks excepted) "
                                       "handled by each worker process", labels=["worker_pid"])
            for path in sorted(Path(directory).glob("counter_*.db")):
                pid = path.stem.removeprefix("counter_")
                for metric in MultiProcessCollector.merge([str(path)]):
                    if metric.name == "grpc_server_handled":
                        rpcs.add_metric([pid], sum(s.value for s in metric.samples
                                                   if s.name.endswith("_total")))
            yield rpcs

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=directory)
    registry.register(_Parent())
    try:
        start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        exit_startup(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}; "
                     "pick another --metrics-port, or 0 to turn metrics off")
    log.info("metrics of all workers on http://%s:%d/metrics", host, port)


def supervise(config, argv: list[str], lite_uri: str = "") -> int:
    """Run `config.workers` (resolved) workers until SIGTERM; the exit status.
    `lite_uri`: where this process serves the Milvus Lite file to them."""
    from imagesearch.flags import exit_startup

    count = resolve(config.workers)
    if config.port == 0:
        exit_startup("search: --workers above 1 needs a fixed --port, not 0: each worker would "
                     "listen on a port of its own")
    with tempfile.TemporaryDirectory(prefix="search-metrics-") as metrics_dir:
        supervisor = Supervisor(count, [sys.executable, "-m", "search_service", *argv],
                                config.grace_s, metrics_dir if config.metrics_port else None,
                                lite_uri)
        if config.metrics_port:
            serve_metrics(config.metrics_port, config.host, metrics_dir, supervisor)
        log.info("search: %d workers on %s (--workers %d%s), Milvus %s", count, config.address,
                 config.workers, f": one per available core, {available_cores()}, at most "
                 f"{MAX_AUTO_WORKERS}" if config.workers == 0 else "",
                 f"Lite {config.milvus_target}, served by this process" if lite_uri else
                 config.milvus_uri)
        return supervisor.run()
