"""How many threads the solver computes with, from the load it sees on the machine.

With as many threads as cores and another process busy on one of them, every parallel region of a
forward or backward pass waits for the thread the scheduler has put aside: on a 2-core machine
beside one CPU-bound neighbour, training fell from ~80 to 5 images/s with 2 threads and kept ~50
with 1 (docs/reliability.md), and a fine-tuning call ended 46 s past its deadline. So the solver
measures, between its calls, how many cores other processes kept busy, and computes with the cores
left (at least one); a change is applied only when two readings in a row agree (a neighbour's burst
of a second must not make it flap), to torch and to the inference engines alike.
"""
from __future__ import annotations

import logging
import os
import time

log = logging.getLogger("autodl_core.threads")

MIN_WINDOW_SECONDS = 0.5  # readings closer together than this are not trusted


def _busy_seconds() -> tuple[float, float] | None:
    """(CPU seconds the whole machine spent busy, CPU seconds this process used), or None without psutil."""
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil is a dependency
        return None
    t = psutil.cpu_times()
    machine = sum(t) - t.idle - getattr(t, "iowait", 0.0)
    own = psutil.Process(os.getpid()).cpu_times()
    return machine, own.user + own.system


def threads_for(cpus: int, others_busy: float) -> int:
    """The cores left when other processes keep `others_busy` cores busy (rounded), at least one."""
    return max(1, min(cpus, cpus - int(round(max(0.0, others_busy)))))


class ThreadGovernor:
    def __init__(self, cpus: int | None = None, clock=time.monotonic):
        self.cpus = max(1, int(cpus or os.cpu_count() or 1))
        self.threads = self.cpus
        self._clock = clock
        self._last = None  # (time, machine busy, own busy)
        self._proposal = None  # the thread count the last reading asked for
        self.others_busy = 0.0

    def reading(self) -> float | None:
        """Cores other processes kept busy since the last reading (None: no earlier reading, or too soon)."""
        busy = _busy_seconds()
        if busy is None:
            return None
        now = self._clock()
        last, self._last = self._last, (now, *busy)
        if last is None:
            return None
        wall = now - last[0]
        if wall < MIN_WINDOW_SECONDS:
            self._last = last  # keep the older start: the window goes on
            return None
        return max(0.0, ((busy[0] - last[1]) - (busy[1] - last[2])) / wall)

    def update(self, trust_one: bool = False) -> int | None:
        """Take a reading; the new thread count when it changes (two readings in a row agree, or one when
        `trust_one`: a long window such as the warm-up), else None."""
        others = self.reading()
        if others is None or self.cpus == 1:
            return None
        self.others_busy = others
        wanted = threads_for(self.cpus, others)
        if wanted == self.threads:
            self._proposal = None
            return None
        if self._proposal != wanted and not trust_one:
            self._proposal = wanted
            return None
        self._proposal = None
        log.info("other processes keep %.1f of %d cores busy: computing with %d thread%s (was %d)", others,
                 self.cpus, wanted, "s" if wanted > 1 else "", self.threads)
        self.threads = wanted
        return wanted
