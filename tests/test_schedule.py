"""Timing rules of fine-tuning (autodl_core/schedule.py, device_plan.py): a cold first step never plans
the schedule, re-planning keeps the learning rate continuous and monotone, batches scale with the device."""
import math

import numpy as np
import pytest
import torch

from autodl_core.device_plan import DevicePlan, plan_for
from autodl_core.schedule import CosineSchedule, StepClock


class FakeTime:
    """A clock the test advances by hand: each training step 'takes' the seconds it is given."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def run_steps(clock: StepClock, fake: FakeTime, durations):
    clock.start()
    for seconds in durations:
        fake.now += seconds
        clock.step_done()
    clock.stop()


def test_cold_first_step_does_not_set_the_step_time():
    fake = FakeTime()
    clock = StepClock(torch.device("cpu"), clock=fake)
    # the H200 case: 6.7 s for the first step (cuDNN tuning), then ~40 ms
    run_steps(clock, fake, [6.7, 0.04, 0.041, 0.039, 0.04])
    assert clock.seconds_per_step == pytest.approx(0.04, abs=0.002)


def test_only_a_cold_block_is_trusted_at_most_three_times_the_warm_up_prior():
    fake = FakeTime()
    clock = StepClock(torch.device("cpu"), prior=0.05, clock=fake)
    assert clock.seconds_per_step == 0.05
    run_steps(clock, fake, [6.7])
    assert clock.seconds_per_step == pytest.approx(0.15)


def test_gpu_blocks_hold_several_steps_and_restart_forgets_the_old_shape():
    fake = FakeTime()
    clock = StepClock(torch.device("cuda"), clock=fake)
    assert clock.block_steps == 4
    clock.stop()  # nothing open: no-op
    clock.blocks.extend([0.04, 0.04])
    clock.first_block = 1.0
    clock.restart()  # e.g. a larger resolution: the next block is cold again
    assert not clock.blocks and clock.first_block is None and clock.prior == pytest.approx(0.04)


def test_replanned_cosine_follows_the_new_plan():
    schedule = CosineSchedule(total_steps=50, warmup_steps=20)
    factors = [schedule.factor(step) for step in range(60)]
    assert factors[19] == pytest.approx(1.0) and factors[55] == pytest.approx(0.05)
    # planned from a cold step (50 steps) while 5,000 fit: the rate is what the right plan gives
    schedule.replan(30, 5000)
    right = CosineSchedule(total_steps=5000, warmup_steps=20)
    assert schedule.factor(30) == pytest.approx(right.factor(30))
    later = [schedule.factor(step) for step in range(30, 5001, 50)]
    assert all(b <= a + 1e-12 for a, b in zip(later, later[1:]))
    assert schedule.factor(5000) == pytest.approx(0.05)
    # fewer steps than planned (a slower step): no jump, what is left of the curve is shortened
    slow = CosineSchedule(total_steps=1000, warmup_steps=20)
    before = slow.factor(500)
    slow.replan(500, 600)
    assert slow.factor(500) == pytest.approx(before)
    assert slow.factor(550) < before and slow.factor(600) == pytest.approx(0.05)
    # the unchanged schedule is the classic warm-up + cosine
    plain = CosineSchedule(total_steps=120, warmup_steps=20)
    expected = 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (70 - 20) / 100))
    assert plain.factor(70) == pytest.approx(expected)


def test_device_plan_scales_batch_and_learning_rate_on_a_gpu_only():
    cpu, gpu = plan_for(torch.device("cpu")), DevicePlan("cuda", 512, 512, True)
    assert cpu.train_batch(50000, 64, 256) == 64
    assert gpu.train_batch(50000, 64, 256) == 256
    assert gpu.train_batch(1500, 64, 256) == 187  # ~8 steps an epoch on small sets
    assert gpu.train_batch(40, 64, 256) == 40
    assert DevicePlan.scaled_lr(0.01, 256, 64) == pytest.approx(0.02)
    assert cpu.probe_resolution(32) == 64 and gpu.probe_resolution(32) == 128
    assert gpu.probe_resolution(8) == 96 and gpu.probe_resolution(100) == 160
    assert np.isclose(cpu.probe_resolution(8), 48)
