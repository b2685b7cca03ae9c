"""What the solver holds in memory, against its cap (`PipelineConfig.memory_cap_gb`).

The cap counts everything the solver adds to its process from the moment it starts: the backbones with
their compiled inference engines, the stored images, the trunk-activation caches of the any-time steps
and what training them takes. What the process held before (the interpreter, TensorFlow, torch and the
engines' libraries, the caller's own data: ~1.4 GB in the kit's process) is the base, outside the cap.

Memory is measured (this process's resident set), not predicted: a backbone's engines take what their
compiler takes. Freed memory is handed back to the system where the C library can (glibc's
`malloc_trim`): warming up three backbones left ~1 GB of freed scratch in the heap on a 2-core EPYC,
counted in the resident set and so in the cap, until trimmed.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys
import time

import psutil


def process_memory_gb() -> float:
    """This process's resident memory (GB)."""
    return psutil.Process().memory_info().rss / 1e9


def peak_process_memory_gb() -> float | None:
    """The most this process has held so far (GB; None where the system does not say): where a run's
    peak comes from shows in when this rises."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e9 if sys.platform == "darwin" else peak * 1024 / 1e9


def _malloc_trim():
    """glibc's malloc_trim, or None where the C library has none (macOS, musl, Windows)."""
    try:
        name = ctypes.util.find_library("c")
        trim = getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_TRIM = _malloc_trim()


TRIM_INTERVAL_S = 1.0  # inside the frozen passes' loops, the heap is trimmed at most this often
_last_trim = 0.0


def trim_heap(min_interval_s: float = 0.0) -> bool:
    """Hand the heap's free pages back to the system, unless it was done less than `min_interval_s` ago
    (no garbage collection); whether it did.

    Called inside the frozen passes' loops: their temporaries, freed batch by batch, stayed in the
    allocator's arenas through the kit (blood cells' pass of the frozen top over 9,957 cached activations
    grew the process by 0.33-0.45 GB that its features, 51 MB, did not explain); a pass with a trim a
    second ran as fast as without. Not inside training or prediction loops: there the pages handed back
    are faulted in again by the next step (MobileNetV2's top at 344 x 256 px: 0.53 -> 0.70 s a training
    step, predictions 1.5x slower, for a peak 0.1 GB lower), and a 1-MB mmap threshold, which hands every
    large block back at once, made the training steps 2.6x slower."""
    global _last_trim
    if _TRIM is None:
        return False
    now = time.monotonic()
    if now - _last_trim < min_interval_s:
        return False
    _TRIM(0)
    _last_trim = time.monotonic()
    return True


def release_freed_memory() -> bool:
    """Collect Python's garbage and hand the heap's free pages back to the system; whether it could."""
    gc.collect()
    return trim_heap()


class MemoryBudget:
    """The solver's memory cap as a budget: what it holds is the process's memory now less the base
    (the process's memory when the solver started)."""

    def __init__(self, cap_gb: float, base_gb: float | None = None):
        self.cap_gb = float(cap_gb)
        self.base_gb = process_memory_gb() if base_gb is None else float(base_gb)
        self.peak_held_gb = 0.0

    def held_gb(self) -> float:
        held = max(0.0, process_memory_gb() - self.base_gb)
        self.peak_held_gb = max(self.peak_held_gb, held)
        return held

    def left_gb(self) -> float:
        """What the cap leaves (negative when the solver already holds more)."""
        return self.cap_gb - self.held_gb()

    def fits(self, more_gb: float, freed_gb: float = 0.0) -> bool:
        """Whether holding `more_gb` more, after letting go of `freed_gb`, stays within the cap."""
        return self.held_gb() - max(0.0, freed_gb) + max(0.0, more_gb) <= self.cap_gb

    def call_line(self) -> str:
        """For the log line of each call: the process's memory now and its peak so far."""
        peak = peak_process_memory_gb()
        return f"process memory {process_memory_gb():.2f} GB" + (f", peak {peak:.2f} GB" if peak else "")

    def line(self) -> str:
        """For logs: held and cap."""
        return f"solver holds {self.held_gb():.2f} GB of its {self.cap_gb:.2f} GB cap, above {self.base_gb:.2f} GB before it"
