"""What this process holds in memory: the solver's memory cap is checked against it (the step backbones
built in `__init__`) and the steps log it as each one starts (where a run's peak comes from)."""
from __future__ import annotations

import psutil


def process_memory_gb() -> float:
    """This process's resident memory (GB)."""
    return psutil.Process().memory_info().rss / 1e9
