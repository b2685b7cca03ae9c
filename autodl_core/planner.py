"""The time planner: every time decision of a run in one place.

It holds the budget (the kit's own time between calls, the run's clock; each call's deadline is computed
here and then passed down the stages as an argument, never kept as state),
the measured rates (feature extraction, reading, a fine-tuning step, the last test and validation
passes) and the cost model built on them, and answers the stages' questions: how long a probe
slice, what a test prediction will cost, whether a resize or a flip-TTA pass fits, how many
fine-tuning steps to plan, and when each piece of work inside a call must stop (the `*_deadline`
methods, from the named constants below). The stages decide *what* to do; this module says *whether
it fits* and *until when*.
"""
from __future__ import annotations

import logging
import time

import numpy as np

log = logging.getLogger("autodl_core.planner")


class RateMeter:
    """Measured pixels/s of a forward pass, to plan how many images fit in a time slice."""

    def __init__(self, pixels_per_s: float):
        self.pixels_per_s = pixels_per_s

    def update(self, pixels: float, seconds: float):
        if seconds > 0.05 and pixels > 0:
            self.pixels_per_s = 0.5 * self.pixels_per_s + 0.5 * pixels / seconds

    def images_per_s(self, size) -> float:
        return self.pixels_per_s / max(1, size[0] * size[1])


SAFETY_SECONDS = 3.0  # kept free at the end of the budget: the kit kills ingestion at T
MIN_STEP_SECONDS = 0.5  # a train call with less time than this left does no work (it could only overrun)

# How long a piece of work inside a call may take, and what it leaves before the call's deadline (seconds).
# The stages ask the planner for these deadlines (`TimePlanner.*_deadline`); none computes one itself.
PEEK_SECONDS = 1.0  # the first look at raw examples (sizes, channels, value range) stops after this
READ_CHUNK_SECONDS = 5.0  # one chunk of reading the whole training set
READ_ALL_RESERVE = 10.0  # reading the whole training set stops this long before the deadline
CLASS_SEARCH_FACTOR = 3.0  # the first chunk reads on, up to this many times its time (at least
CLASS_SEARCH_MIN_SECONDS = 1.0  # this long), until every class has appeared ...
CLASS_SEARCH_SECONDS = 0.1  # ... one small read at a time
THUMBNAIL_FIT_SECONDS = 2.0  # the thumbnail head's fit ...
THUMBNAIL_FIT_RESERVE = 1.0  # ... leaving this before the call's deadline
PROBE_FIT_SECONDS = 5.0  # the first probe's head fit ...
PROBE_FIT_RESERVE = 1.0  # ... leaving this and the test features' cost
FEATURE_PASS_MIN_SECONDS = 1.0  # a probe slice's feature pass runs at least this long ...
FEATURE_PASS_RESERVE = 2.0  # ... and stops this long before the call's deadline
POOLING_RESERVE = 1.0  # pooling the probe's new activations stops this long before the call's deadline
STEP_PASS_RESERVE = 2.0  # a probe step's passes stop this long before the call's deadline (its head follows)
STEP_FIT_SECONDS = 10.0  # a probe step's head fit
TRAIN_SLICE_SHARE = 0.7  # of a fine-tuning slice: the training steps ...
CACHE_SLICE_SHARE = 0.3  # ... and extending the activation caches
FINETUNE_START_RESERVE = 10.0  # fine-tuning's first caches and rescoring leave this before the deadline
RESIZE_CACHE_RESERVE = 30.0  # the caches of a new fine-tuning size leave this (the first steps at it)
STEP_TIMING_SECONDS = 60.0  # the measured first steps that size a cosine schedule take at most this ...
STEP_TIMING_RESERVE = 5.0  # ... leaving this before the deadline


def seconds_since(started: float) -> float:
    """Seconds from `started` (a time.monotonic() reading) to now: what the stages time their work with."""
    return time.monotonic() - started


def in_seconds(seconds: float) -> float:
    """The time.monotonic() reading `seconds` from now."""
    return time.monotonic() + seconds


class SideRate:
    """Images/s as a function of the working size, from measurements at two or more square sides: a power
    law in the side (the square root of the pixel count) between and beyond them, its exponent kept in
    [1.5, 2.5] (2: cost per pixel; the top's training step at 64-128 px is dominated by fixed costs and
    measured ~1, which extrapolated to 288 x 376 px predicted 75 img/s where 10 were measured)."""

    def __init__(self, points: list[tuple[int, float]]):
        points = sorted((int(s), float(r)) for s, r in points if r > 0)
        self.points = points
        if len(points) >= 2 and points[-1][0] > points[0][0]:
            (s0, r0), (s1, r1) = points[0], points[-1]
            self.exponent = float(np.clip(np.log(r0 / r1) / np.log(s1 / s0), 1.5, 2.5))
        else:
            self.exponent = 2.0

    def images_per_s(self, size) -> float:
        """At `size`: a working (h, w), or a square side."""
        if not self.points:
            return 1.0
        side = float(np.sqrt(size[0] * size[1])) if isinstance(size, (tuple, list)) else float(size)
        s0, r0 = self.points[-1] if side >= self.points[-1][0] else self.points[0]
        return r0 * (s0 / max(1.0, side)) ** self.exponent


def min_gain(best_score: float, cost_share: float) -> float:
    """Validation NAUC gain a checkpoint needs before it is worth predicting.

    0.001, or a quarter of the error left when validation is nearly saturated (a fixed 0.001 forbids
    every gain once validation passes 0.999, common on small digit and face sets);
    plus a share of the prediction's cost (time spent predicting large test sets needs a clearer gain).
    """
    room = 1.0 - best_score if np.isfinite(best_score) else 1.0
    return min(0.001, 0.25 * max(room, 0.0)) + 0.02 * cost_share


# The any-time steps (autodl_core/stages/steps.py): what a step may cost.
# A frozen probe's pass: at most this share of the time left. Early on every second weighs (ALC's log time):
# a 50-s probe of 8,500 pedestrians at 424 x 192 px left the first 70 s without a new prediction.
PROBE_STEP_SHARE = 0.1
TUNE_STEP_SHARE = 0.5  # a fine-tuning step's time (its probe included) while stronger steps may follow
TUNE_MIN_EPOCHS = 3.0  # a fine-tuning step must afford this many epochs in its time
# ... and this many where the frozen features carry little (a step's frozen probe below WEAK_FEATURES_NAUC on
# validation): there the tuning, not the resolution, pays. Knee X-rays (probe 0.37): 3.5 epochs at 224 px ended at
# test NAUC 0.48-0.51, one schedule of 22 epochs at 96 px at 0.65, its validation highest after 13 epochs.
TUNE_MIN_EPOCHS_WEAK = 12.0
WEAK_FEATURES_NAUC = 0.6
# The first probe (48-64 px) scoring below this, and no better than 12-px raw thumbnails, says as much before
# any step: knee X-rays 0.19 (thumbnails 0.39), 28-px ultrasound images 0.45 (0.49), where blood cells score
# 0.68-0.70, CIFAR-10 0.85, textures and photos 0.91-0.97, pedestrians 0.36 over their thumbnails' 0.33 (a
# larger frozen probe still pays there: 0.48 at 216 x 96 px). Lower than WEAK_FEATURES_NAUC: small images
# underrate what the features carry at a step's size; a step probe at or above it lifts the verdict.
FIRST_PROBE_WEAK_NAUC = 0.5
TUNE_MIN_PREDICTIONS = 4  # ... and this many validation and test predictions of its checkpoints
MIN_STEP_TIME = 20.0  # seconds a step needs at least (a fine-tuning step, or a probe whose pass is this short)


class TimePlanner:
    def __init__(self, rate: RateMeter):
        self.rate = rate  # pixels/s of frozen feature extraction (warm-up, then measured)
        self.clock_start: float | None = None  # the first train call
        self._returned_at: float | None = None
        self.kit_seconds = 0.0  # the kit's own time between our calls (the most seen)
        self.read_seconds, self.read_examples = 0.0, 0  # training data read so far, and the time it took
        self.ft_test_seconds: float | None = None  # the last fine-tuned test prediction, measured
        self.ft_val_seconds: float | None = None  # the last validation pass (with TTA), measured

    # ------------------------------------------------------------------ the budget
    def call_deadline(self, started: float, remaining_time_budget: float) -> float:
        """When this call must return: the budget left, less the safety margin and the time the kit
        itself took between our last return and this call (writing a prediction file: 2.3 s for
        1,200 x 1,200 values on a slow CPU), which it will take again after our last prediction."""
        if self._returned_at is not None:
            self.kit_seconds = max(self.kit_seconds, started - self._returned_at)
        return started + float(remaining_time_budget) - SAFETY_SECONDS - self.kit_seconds

    # ------------------------------------------------------------------ deadlines inside a call
    # Each returns a time.monotonic() reading: when a piece of work must stop, from the call's `deadline`.
    @staticmethod
    def first_chunk_deadline(deadline: float, started: float, first_chunk_seconds: float) -> float:
        return min(deadline, started + first_chunk_seconds)

    @staticmethod
    def class_search_deadline(deadline: float, started: float, first_chunk_seconds: float) -> float:
        return min(deadline, started + max(CLASS_SEARCH_FACTOR * first_chunk_seconds, CLASS_SEARCH_MIN_SECONDS))

    @staticmethod
    def class_search_read_deadline(cap: float) -> float:
        return min(cap, time.monotonic() + CLASS_SEARCH_SECONDS)

    @staticmethod
    def read_chunk_deadline(deadline: float) -> float:
        return min(deadline, time.monotonic() + READ_CHUNK_SECONDS)

    @staticmethod
    def read_all_must_stop(deadline: float) -> bool:
        """Reading the whole training set gives up here: too close to the deadline for what follows."""
        return time.monotonic() > deadline - READ_ALL_RESERVE

    @staticmethod
    def thumbnail_fit_deadline(deadline: float) -> float:
        return min(time.monotonic() + THUMBNAIL_FIT_SECONDS, deadline - THUMBNAIL_FIT_RESERVE)

    @staticmethod
    def probe_slice_deadline(deadline: float, slice_s: float, test_cost: float) -> float:
        """A probe slice's end: `slice_s` from now, or earlier so that its test prediction still fits."""
        return min(deadline - test_cost, time.monotonic() + slice_s)

    @staticmethod
    def feature_pass_deadline(deadline: float, slice_deadline: float) -> float:
        return min(deadline - FEATURE_PASS_RESERVE, max(slice_deadline, time.monotonic() + FEATURE_PASS_MIN_SECONDS))

    @staticmethod
    def pooling_deadline(deadline: float) -> float:
        return deadline - POOLING_RESERVE

    @staticmethod
    def probe_fit_deadline(deadline: float, test_cost: float) -> float:
        return min(time.monotonic() + PROBE_FIT_SECONDS, deadline - PROBE_FIT_RESERVE - test_cost)

    @staticmethod
    def step_pass_deadline(deadline: float) -> float:
        return deadline - STEP_PASS_RESERVE

    @staticmethod
    def step_fit_deadline(stop: float) -> float:
        return min(time.monotonic() + STEP_FIT_SECONDS, stop)

    @staticmethod
    def train_slice_deadline(slice_s: float) -> float:
        return time.monotonic() + TRAIN_SLICE_SHARE * slice_s

    @staticmethod
    def cache_slice_seconds(slice_s: float) -> float:
        return CACHE_SLICE_SHARE * slice_s

    @staticmethod
    def finetune_start_deadline(deadline: float) -> float:
        return deadline - FINETUNE_START_RESERVE

    @staticmethod
    def resize_cache_deadline(deadline: float) -> float:
        return deadline - RESIZE_CACHE_RESERVE

    @staticmethod
    def step_timing_deadline(deadline: float) -> float:
        return min(time.monotonic() + STEP_TIMING_SECONDS, deadline - STEP_TIMING_RESERVE)

    def returned(self):
        """A call returns to the kit: what happens until the next call is the kit's time."""
        self._returned_at = time.monotonic()

    def elapsed(self) -> float:
        if self.clock_start is None:
            self.clock_start = time.monotonic()
        return time.monotonic() - self.clock_start

    # ------------------------------------------------------------------ measured rates
    def feature_rate(self, size) -> float:
        """Images/s of feature extraction at `size`, scaled from the measurements by pixel count."""
        return self.rate.images_per_s(size)

    def note_features(self, n: int, size, seconds: float):
        self.rate.update(n * size[0] * size[1], seconds)

    def note_read(self, n: int, seconds: float):
        self.read_seconds += seconds
        self.read_examples += n

    def read_rate(self) -> float:
        """Training examples read per second (infinite until enough reading was timed)."""
        return self.read_examples / self.read_seconds if self.read_seconds > 0.05 else np.inf

    # ------------------------------------------------------------------ the probe
    def probe_slice_seconds(self) -> float:
        """Long enough to matter, short enough to give a prediction soon (log-time spacing)."""
        return max(3.0, 0.3 * self.elapsed())

    def probe_feature_target(self, slice_s: float, size, have: int, have_features: int, most: int) -> int:
        """Examples the probe should have features of after this slice: no more than features can be
        computed for in the slice. Examples already read cost their features, unread ones their reading
        too (decoding can be the slower part: with fast features, reading for the whole slice put the
        probe's first prediction off by seconds)."""
        rate = self.feature_rate(size)
        budget = 0.7 * slice_s
        from_read = min(have - have_features, int(rate * budget))
        budget -= from_read / rate
        unread = int(budget / (1.0 / rate + 1.0 / self.read_rate()))
        return min(most, have_features + from_read + unread)

    def test_feature_cost(self, size, n_test: int, features_done: bool) -> float:
        """Seconds the probe's test prediction costs: its test features once, then almost nothing."""
        if features_done:
            return 0.5
        return n_test / max(1.0, self.feature_rate(size))

    # ------------------------------------------------------------------ fine-tuning
    def reset_finetune_costs(self):
        """A new network or resolution: the measured prediction costs no longer apply."""
        self.ft_test_seconds = self.ft_val_seconds = None

    def finetune_test_cost(self, n_test: int, size, top_mode: bool, flip: bool) -> float:
        """A fine-tuned test prediction: measured once made, else estimated from the feature rate (the
        top mode's share of a forward pass is ~0.4; flip TTA doubles it)."""
        if self.ft_test_seconds is not None:
            return self.ft_test_seconds
        share = 0.4 if top_mode else 1.0
        return (2 if flip else 1) * share * n_test / max(1.0, self.feature_rate(size)) + 0.5

    def finetune_val_cost(self, n_val: int, size) -> float:
        estimate = n_val / max(1.0, self.feature_rate(size))
        return max(estimate, self.ft_val_seconds or 0.0)

    def slice_room(self, deadline: float, test_cost: float, val_cost: float) -> float:
        """Seconds a fine-tuning slice may use: what is left after a test prediction (with a margin),
        a validation pass and 2 s."""
        return deadline - time.monotonic() - (test_cost * 1.3 + val_cost + 2.0)

    @staticmethod
    def first_share(size_rate: float, n_fit: int) -> int:
        """Training examples whose activations are cached at once on a resize (~5 s of feature time)."""
        return min(n_fit, int(max(1.0, size_rate) * 5))

    def resize_affordable(self, old_size, new_size, deadline: float, n_val: int, n_test: int, n_fit: int,
                          top_mode: bool, test_cost: float) -> float | None:
        """The time left (after a test prediction) when fine-tuning at `new_size` is affordable, else None:
        its new caches (top mode: validation, test and a first share of the training set) must cost at
        most half of that time and leave 30 s of training."""
        rate = max(1.0, self.feature_rate(new_size))
        cache_cost = (n_val + n_test + self.first_share(self.feature_rate(new_size), n_fit)) / rate if top_mode else 0.0
        time_left = deadline - time.monotonic() - test_cost
        if cache_cost > 0.5 * time_left or time_left - cache_cost < 30:
            log.info("resolution %s -> %s: no time (caches %.0fs, %.0fs left)", old_size, new_size,
                     cache_cost, time_left)
            return None
        log.info("resolution %s -> %s (caches ~%.0fs, %.0fs left)", old_size, new_size, cache_cost, time_left)
        return time_left

    def flip_tta_affordable(self, n_test: int, size, deadline: float, plain_cost: float = 0.0) -> bool:
        """Flip TTA doubles the test prediction: tried only when that costs at most 15% of the time left
        (`plain_cost`: what the caller knows of the plain prediction's cost; the tuned top runs in torch,
        slower than a frozen pass through an inference engine)."""
        extra_cost = max(n_test / max(1.0, self.feature_rate(size)), plain_cost)
        if extra_cost > 0.15 * max(0.0, deadline - time.monotonic()):
            log.info("flip TTA: not tried (%.1fs of extra test cost is too much for the time left)", extra_cost)
            return False
        return True

    @staticmethod
    def cost_share(test_cost: float, deadline: float) -> float:
        """A prediction's cost as a share of the time left (expensive predictions need clearer gains)."""
        return test_cost / max(1.0, deadline - time.monotonic())

    @staticmethod
    def planned_steps(deadline: float, per_step: float) -> int:
        """Cosine schedule length: the steps that fit in 80% of the time left."""
        return max(50, int(0.8 * max(0.0, deadline - time.monotonic()) / per_step))

    @staticmethod
    def replanned_steps(deadline: float, per_step: float, planned: float | None, steps_done: int) -> int | None:
        """The schedule's new length when the measured steady step time is off the planned one by > 25%
        (the steps left are those that fit in 80% of the time left, as at the start), else None."""
        if not per_step or not planned or abs(per_step / planned - 1) <= 0.25:
            return None
        left = max(0.0, deadline - time.monotonic())
        return steps_done + max(1, int(0.8 * left / per_step))

    # ------------------------------------------------------------------ the any-time steps
    @staticmethod
    def pass_seconds(n_images: int, size, rate: RateMeter) -> float:
        """A frozen pass over `n_images` at `size` with a backbone whose measured rate is `rate`."""
        return n_images / max(1.0, rate.images_per_s(size))

    def reread_seconds(self, n_images: int, small_hw, large_hw) -> float:
        """Reading `n_images` again at `large_hw` after reading them at `small_hw`: the measured reading rate,
        slower by the square root of the pixel ratio (decoding costs the same; resizing and copying grow:
        Oxford flowers read 2.8x slower at 340 x 384 px than at 128 px, 7.9x the pixels)."""
        ratio = (large_hw[0] * large_hw[1]) / max(1, small_hw[0] * small_hw[1])
        rate = self.read_rate()
        return 0.0 if not np.isfinite(rate) else n_images * max(1.0, ratio) ** 0.5 / max(1e-6, rate)

    def probe_step_affordable(self, n_images: int, size, rate: RateMeter, deadline: float,
                              extra: float = 0.0) -> bool:
        """A frozen probe at `size`: its pass (and `extra` seconds, e.g. reading again) cost at most
        PROBE_STEP_SHARE of the time left."""
        cost = self.pass_seconds(n_images, size, rate) + extra
        return cost <= PROBE_STEP_SHARE * max(0.0, deadline - time.monotonic())

    def tune_step_seconds(self, n_images: int, n_fit: int, size, rate: RateMeter, train_rate: "SideRate",
                          cached: bool, min_epochs: float = TUNE_MIN_EPOCHS, extra: float = 0.0,
                          n_predicted: int = 0, flips: bool = False) -> float:
        """The least time a fine-tuning step at `size` needs: its pass (unless its activations are cached),
        `extra` seconds (e.g. reading again), `min_epochs` epochs of training steps, and TUNE_MIN_PREDICTIONS
        validation and test passes of the tuned top over `n_predicted` images (twice with `flips`), whose
        forward pass runs at about twice the training rate. Why the predictions: at 424 x 192 px a
        checkpoint's test prediction (1,622 pedestrians, flip TTA on) took 25-33 s, and a step planned on
        its epochs alone made 61 training steps in 116 s."""
        per_image = 1.0 / max(1.0, train_rate.images_per_s(size))
        pass_s = 0.0 if cached else self.pass_seconds(n_images, size, rate) + extra
        predictions = TUNE_MIN_PREDICTIONS * (2 if flips else 1) * n_predicted * per_image / 2
        return pass_s + min_epochs * n_fit * per_image + predictions

    @staticmethod
    def tune_step_until(deadline: float, last: bool) -> float:
        """When a fine-tuning step hands over: TUNE_STEP_SHARE of the time left while stronger steps may
        follow (at least MIN_STEP_TIME), the end of the run for the last one."""
        left = max(0.0, deadline - time.monotonic())
        return deadline if last else time.monotonic() + max(MIN_STEP_TIME, TUNE_STEP_SHARE * left)
