"""The bench's background-CPU watch: other processes' CPU is counted, the run's own tree's is not.

The accounting is tested with injected readings (no assertion depends on how busy this machine is:
a timing share measured live failed on a fresh, slightly busy machine)."""
from __future__ import annotations

import pytest

from tools.contention import BackgroundWatch, background_share, process_tree_cpu


def test_background_share_arithmetic():
    assert background_share(busy_delta=10.0, own_delta=10.0, wall=10.0, n_cpus=2) == 0.0
    assert background_share(busy_delta=15.0, own_delta=5.0, wall=10.0, n_cpus=2) == pytest.approx(0.5)
    assert background_share(busy_delta=1.0, own_delta=5.0, wall=10.0, n_cpus=2) == 0.0  # never negative
    assert background_share(busy_delta=99.0, own_delta=0.0, wall=1.0, n_cpus=2) == 1.0
    assert background_share(busy_delta=1.0, own_delta=0.0, wall=0.0, n_cpus=2) == 0.0


class Machine:
    """Scripted readings: each sample of the tree advances the scenario by one step."""

    def __init__(self, steps):
        self.steps = steps  # list of (busy seconds of the machine, {process key: cpu seconds}, wall clock)
        self.i = 0

    def tree(self):
        readings = self.steps[min(self.i, len(self.steps) - 1)][1]
        self.i += 1
        return dict(readings)

    def busy(self):
        return self.steps[min(max(self.i - 1, 0), len(self.steps) - 1)][0]

    def clock(self):
        return self.steps[min(max(self.i - 1, 0), len(self.steps) - 1)][2]


def watch(machine):
    return BackgroundWatch(interval=3600, busy=machine.busy, tree=machine.tree, clock=machine.clock, n_cpus=2)


def test_own_child_is_not_background():
    # 10 s of wall time on 2 cores; our own child process burns 9 s, the machine is busy 9.5 s
    machine = Machine([(100.0, {(1, 0.0): 1.0}, 0.0),
                       (109.5, {(1, 0.0): 1.0, (2, 5.0): 9.0}, 10.0)])
    with watch(machine) as own:
        pass
    assert own.share == pytest.approx(0.5 / 20)


def test_a_process_outside_the_tree_is_background():
    # we are idle; something else keeps one core of two busy for the whole 10 s
    machine = Machine([(100.0, {(1, 0.0): 1.0}, 0.0), (110.0, {(1, 0.0): 1.0}, 10.0)])
    with watch(machine) as other:
        pass
    assert other.share == pytest.approx(0.5)


def test_a_child_that_ended_keeps_its_last_reading():
    # the child was sampled at 4 s of CPU, then ended: the tree's last reading still counts it
    machine = Machine([(100.0, {(1, 0.0): 1.0}, 0.0),
                       (105.0, {(1, 0.0): 1.0}, 10.0)])
    with watch(machine) as run:
        run._own[(2, 5.0)] = 4.0  # what the sampling thread recorded while the child lived
    assert run.share == pytest.approx(1.0 / 20)


def test_process_tree_cpu_reads_this_process():
    readings = process_tree_cpu()
    assert readings and all(seconds >= 0 for seconds in readings.values())
