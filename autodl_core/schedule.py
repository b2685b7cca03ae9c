"""Time rules of fine-tuning: how long a step really takes, and a learning-rate schedule that can be re-planned.

Why this exists: on a GPU the first steps at a new shape are cold (cuDNN picks its algorithms,
kernels are compiled and cached) and take seconds where later ones take milliseconds, and kernels
run asynchronously, so a wall-clock reading without a synchronisation measures only the launch.
A schedule planned from one cold step (6.7 s/step measured, ~40 ms real) ended its cosine after
50 of several thousand steps. So:
  - `StepClock` times blocks of steps between synchronisations and reports the steady-state time
    (the median of recent blocks, the first block after a (re)start left out once others exist);
  - `CosineSchedule` is re-planned whenever the clock says more (or fewer) steps fit: it then follows
    the plan it would have had with the right step time from the start (never further along the curve
    than it already is: fewer steps than planned shorten what is left, continuously; many more steps,
    e.g. after a cold estimate or once a busy neighbour has gone, give the learning rate back).
"""
from __future__ import annotations

import math
import time
from collections import deque

import torch


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on a CPU, where time is already real)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepClock:
    """Steady-state seconds per step, from blocks of steps timed between synchronisations.

    `prior` (e.g. measured in an untimed warm-up) is the estimate until a block is measured.
    """

    def __init__(self, device: torch.device, prior: float | None = None, window: int = 9, clock=time.monotonic):
        self.device = device
        self._now = clock  # injectable for tests
        self.prior = prior
        self.blocks: deque[float] = deque(maxlen=window)  # seconds per step of each block
        self.first_block: float | None = None
        self._started: float | None = None
        self._steps_in_block = 0

    @property
    def block_steps(self) -> int:
        """Steps between synchronisations: one on a CPU; a few on a GPU so its queue stays full."""
        return 1 if self.device.type != "cuda" else 4

    def start(self) -> None:
        """Begin a block (after a synchronisation, so earlier queued work is not billed to it)."""
        synchronize(self.device)
        self._started = self._now()
        self._steps_in_block = 0

    def step_done(self) -> bool:
        """Count a step; closes the block (synchronising) when it is full. True when a block closed."""
        self._steps_in_block += 1
        if self._steps_in_block < self.block_steps:
            return False
        self.stop()
        self.start()
        return True

    def stop(self) -> None:
        """Close the current block, if it holds steps."""
        if self._started is None or self._steps_in_block == 0:
            return
        synchronize(self.device)
        per_step = (self._now() - self._started) / self._steps_in_block
        if self.first_block is None:
            self.first_block = per_step
        else:
            self.blocks.append(per_step)
        self._started, self._steps_in_block = None, 0

    def restart(self) -> None:
        """A new shape or model follows (e.g. a resolution growth): its first block is cold again."""
        self.stop()
        if self.blocks or self.first_block is not None:
            self.prior = self.seconds_per_step
        self.blocks.clear()
        self.first_block = None

    @property
    def seconds_per_step(self) -> float | None:
        if self.blocks:
            return sorted(self.blocks)[len(self.blocks) // 2]
        if self.prior is not None:
            # Only a cold first block so far: trust it no more than 3x above the prior.
            return self.prior if self.first_block is None else min(self.first_block, 3 * self.prior)
        return self.first_block


class CosineSchedule:
    """Linear warm-up, then cosine decay to `floor` of the base rate, over a step budget that can change.

    `replan(step, total)`: the progress along the curve becomes the share of the new plan already done,
    or the current progress if that is less, and what is left of the curve is spread over the new
    remaining steps.
    """

    def __init__(self, total_steps: int, warmup_steps: int = 20, floor: float = 0.05):
        self.warmup_steps = max(0, int(warmup_steps))
        self.floor = floor
        self.total_steps = max(1, int(total_steps))
        self._anchor_step, self._anchor_progress = self.warmup_steps, 0.0

    def progress(self, step: int) -> float:
        if step <= self._anchor_step:
            return self._anchor_progress
        span = max(1, self.total_steps - self._anchor_step)
        return min(1.0, self._anchor_progress + (1.0 - self._anchor_progress) * (step - self._anchor_step) / span)

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * self.progress(step)))

    def replan(self, step: int, total_steps: int) -> None:
        total_steps = max(int(total_steps), step + 1)
        if step > self._anchor_step:
            done_share = (step - self.warmup_steps) / max(1, total_steps - self.warmup_steps)
            self._anchor_progress = min(self.progress(step), max(0.0, done_share))
            self._anchor_step = step
        self.total_steps = total_steps
