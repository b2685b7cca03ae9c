"""The bench's background-CPU watch: other processes' CPU is counted, the run's own tree's is not."""
from __future__ import annotations

import subprocess
import sys
import time

import psutil
import pytest

from tools.contention import BackgroundWatch, background_share

BURN = "import time; end = time.time() + {s}\nwhile time.time() < end: pass"


def test_background_share_arithmetic():
    assert background_share(busy_delta=10.0, own_delta=10.0, wall=10.0, n_cpus=2) == 0.0
    assert background_share(busy_delta=15.0, own_delta=5.0, wall=10.0, n_cpus=2) == pytest.approx(0.5)
    assert background_share(busy_delta=1.0, own_delta=5.0, wall=10.0, n_cpus=2) == 0.0  # never negative
    assert background_share(busy_delta=99.0, own_delta=0.0, wall=1.0, n_cpus=2) == 1.0
    assert background_share(busy_delta=1.0, own_delta=0.0, wall=0.0, n_cpus=2) == 0.0


def test_own_child_is_not_background_but_a_detached_process_is():
    cores = psutil.cpu_count() or 1
    with BackgroundWatch(interval=0.1) as own:
        subprocess.run([sys.executable, "-c", BURN.format(s=1.5)], check=True)
    # a busy loop outside this process tree: started by a shell that exits at once (re-parented)
    subprocess.run(["sh", "-c", f'"{sys.executable}" -c "{BURN.format(s=2.5)}" >/dev/null 2>&1 &'], check=True)
    time.sleep(0.3)
    with BackgroundWatch(interval=0.1) as other:
        time.sleep(1.5)
    # in cores: one busy process is ~1 core whatever the machine's size
    assert own.share * cores < 0.4, own.share
    assert other.share * cores > 0.6, other.share
