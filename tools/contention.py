"""How much of the machine other processes used while a benchmark run ran.

Why: on a 2-core machine ALC is decided in the first seconds, and anything else running moves it
far beyond run-to-run noise, even at `nice 19`: a run of ours on mnist_t10k scored 0.9686 beside
unit tests and 0.9860 alone (docs/history/benchmarks-lab-notes.md, 0.1.11). A bench row says how busy the machine
was with other work, so such a run is flagged instead of trusted.
"""
from __future__ import annotations

import os
import threading
import time

import psutil

# Above this share of the machine used by other processes a run is flagged (and not imported).
BACKGROUND_LIMIT = 0.05


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (all cores)."""
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def background_share(busy_delta: float, own_delta: float, wall: float, n_cpus: int) -> float:
    """Share of the machine's capacity (wall x cores) that processes outside the run used."""
    if wall <= 0 or n_cpus <= 0:
        return 0.0
    return float(min(1.0, max(0.0, busy_delta - own_delta) / (wall * n_cpus)))


def process_tree_cpu() -> dict[tuple[int, float], float]:
    """CPU seconds (user + system) of this process and each live descendant, keyed by (pid, start time)."""
    root = psutil.Process(os.getpid())
    try:
        procs = [root] + root.children(recursive=True)
    except psutil.Error:
        procs = [root]
    readings = {}
    for proc in procs:
        try:
            times = proc.cpu_times()
            readings[(proc.pid, proc.create_time())] = times.user + times.system  # a recycled pid is another process
        except psutil.Error:
            continue
    return readings


class BackgroundWatch:
    """Context manager: samples this process tree's CPU time in a thread; `.share` when done.

    Processes of the tree are sampled every `interval` seconds; a process that ends between two
    samples loses at most its last interval, which makes the share an upper bound by a little.
    The readings (machine busy time, the tree's CPU times, the clock, the core count) can be
    injected, so that the accounting is tested without depending on the machine's load.
    """

    def __init__(self, interval: float = 0.25, busy=busy_cpu_seconds, tree=process_tree_cpu,
                 clock=time.monotonic, n_cpus: int | None = None):
        self.interval = interval
        self.share: float | None = None
        self._busy, self._tree, self._clock = busy, tree, clock
        self._n_cpus = n_cpus or psutil.cpu_count() or 1
        self._own: dict[tuple[int, float], float] = {}
        self._stop = threading.Event()

    def _sample(self) -> None:
        self._own.update(self._tree())

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> "BackgroundWatch":
        self._sample()
        self._start_own = sum(self._own.values())
        self._start_busy = self._busy()
        self._start_wall = self._clock()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.share = background_share(self._busy() - self._start_busy,
                                      sum(self._own.values()) - self._start_own,
                                      self._clock() - self._start_wall, self._n_cpus)
