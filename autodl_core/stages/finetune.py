"""Stage 2: LP-FT of the backbone (full, on a GPU) or of its top blocks on cached activations
(the CPU recipe), in growing time slices, EMA weights, validated on the held-out split.

A checkpoint is predicted only when it raises the validation score of the ensemble (the best-k
average of the last checkpoints, the probe and the thumbnails) by more than the minimum gain and
the split's noise; flip TTA is switched on when validation says it helps; when validation stops
improving and time is left, the resolution grows and fine-tuning goes on from the best weights.
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from autodl_core.ensemble import Candidate, CandidatePool, paired_gain_se
from autodl_core.growth import ResolutionGrowth
from autodl_core.heads import LinearHead
from autodl_core.images import working_size
from autodl_core.learner import Classifier, FineTuner, head_row_norm, lp_ft_learning_rate
from autodl_core.planner import in_seconds, min_gain, seconds_since
from autodl_core.run_context import RunContext, score
from autodl_core.stages.probe import ProbeStage
from autodl_core.stages.thumbnails import ThumbnailStage
from autodl_core.tta import FlipTTA

log = logging.getLogger("autodl_core.stages.finetune")


# A step's fine-tuning that has not yet passed its probe's validation score (nor the weights it started
# from) is recovering, not on a plateau, until this many epochs and this many optimiser steps (its time
# share still bounds it); while it recovers, a fall after the first learning-rate cut goes on from where it
# is instead of going back. Steps as well as epochs: leaving the head took 200-350 steps on knee X-rays
# (3,585 examples fitted: 2-3 epochs) and on blood cells, and three epochs of BreastMNIST's 560 are about
# 50 steps: its EfficientNet steps went back to their heads twice and ended on a plateau below them by
# step 120.
RECOVERY_EPOCHS = 3.0
RECOVERY_STEPS = 400
# A step's fine-tuning cuts its learning rate on a fall at most this often per schedule; later falls only go
# back to the best weights. Leaving a strong probe's head dips validation more than once: on blood cells a
# step cut it twice (x0.09) in its first 200 steps and ended at test NAUC 0.76, where one cut (the earlier
# single-stage solver) recovered to 0.91.
MAX_STEP_LR_CUTS = 1


@dataclass
class StepStart:
    """Where a fine-tuning step of the any-time steps (autodl_core/stages/steps.py) starts: the frozen probe
    of its backbone at its size (LP-FT from that head; the trunk activations are cached at that size),
    and the time it may use."""
    head: LinearHead
    size: tuple
    group: str  # "backbone@HxW": the candidates it makes are one step's
    until: float  # time.monotonic() at which the step hands over (plateau or not)
    probe_score: float = -np.inf  # its probe's validation score: fine-tuning below it is still recovering


class FinetuneStage:
    name = "finetune"

    def __init__(self, ctx: RunContext, thumbnails: ThumbnailStage, probe: ProbeStage | None,
                 start: StepStart | None = None, net=None):
        self.ctx, self.thumbnails, self.probe = ctx, thumbnails, probe
        self.net = net if net is not None else ctx.net  # the backbone it tunes (the steps move between several)
        # Within the any-time steps: a plateau (or the end of its time) finishes this step, and the steps
        # stage starts the next one; alone, a plateau grows the resolution or ends the run.
        self.start = start
        self.finished = False
        self.best_val_probs = None  # validation predictions of the best weights (the noise of a gain)
        self.tuner: FineTuner | None = None
        self.size = None  # the working size fine-tuning runs at
        self.fit_idx = self.val_idx = None
        self.slice_seconds = ctx.config.first_slice_seconds
        self.tta = FlipTTA()
        self.growth = ResolutionGrowth(ctx.config)
        self.best_score, self.best_state = -np.inf, None  # the best fine-tuned weights at this resolution
        self.start_score = -np.inf  # validation score of the weights this schedule started from
        self.leaving_head = False  # a step's first schedule, from its probe's head (LP-FT): it may recover
        self.stale_slices = 0
        self.val_probs = None  # validation predictions of the checkpoint the next test call predicts
        self._planned_step_seconds = None

    # ------------------------------------------------------------------ one train call
    def step(self, deadline: float) -> str:
        """Train slices until a checkpoint is worth predicting or time runs out."""
        ctx = self.ctx
        if self.tuner is None and not self._start(deadline):
            ctx.done_training = True
            return self.name
        while True:
            time_left = ctx.planner.slice_room(deadline, self.test_cost(), self.val_cost())
            if self.start is not None and self.start.until - time.monotonic() < time_left:
                if self.start.until - time.monotonic() < max(3.0, 2 * (self.tuner.seconds_per_step or 1.0)):
                    log.info("fine-tuning step %s: its time is used (step %d)", self.start.group, self.tuner.steps)
                    return self._finish()
                time_left = self.start.until - time.monotonic()
            if time_left < max(3.0, 2 * (self.tuner.seconds_per_step or 1.0)):
                ctx.done_training = True
                ctx.predictions.nothing_new()
                return self.name
            slice_s = min(self.slice_seconds, time_left)
            self._extend_cache(ctx.planner.cache_slice_seconds(slice_s))
            self.tuner.train_until(self._make_batch(), ctx.data.train_y, self._fit_pool(),
                                   deadline=ctx.planner.train_slice_deadline(slice_s))
            self._replan_if_step_time_moved(self.schedule_end(deadline))
            self.slice_seconds *= ctx.config.slice_growth
            if len(self.val_idx) == 0:
                # No validation (tiny data): trust the schedule, predict after every slice, and stop
                # after a fixed number of epochs.
                if self.tuner.steps * self.tuner.batch_size >= ctx.config.max_epochs_without_val * len(self.fit_idx):
                    ctx.done_training = True
                self.val_probs = None
                break
            val_started = time.monotonic()
            plain = self.predict_val(deadline - self.test_cost())
            if plain is None:
                continue
            value = score(ctx.data.train_y[self.val_idx], plain)
            log.info("fine-tune step %d at %s: val NAUC %.4f (ensemble so far %.4f)", self.tuner.steps,
                     self.size, value, ctx.best_val_score)
            self._track(value, plain)
            val_probs = self.with_flip_tta(plain, deadline)
            ctx.planner.ft_val_seconds = seconds_since(val_started)
            if self._worth_predicting(val_probs, deadline):
                self.val_probs = val_probs
                break
            if self.start is not None and self._converged():
                log.info("fine-tuning step %s: a plateau at step %d (%d slices without a gain beyond noise)",
                         self.start.group, self.tuner.steps, self.stale_slices)
                return self._finish()
            if self._converged() and self.grow_resolution(deadline):
                continue
            if self.stale_slices >= ctx.config.patience_slices:
                return self._out_of_patience()
        ctx.predictions.ready(self.predict)
        return self.name

    def _out_of_patience(self) -> str:
        """No validation gain for `patience_slices` slices. A step of the any-time steps ends and the steps
        stage decides what comes next (a stronger step, or the best step going on until the end); only the
        single fine-tuning stage ends the run. Ending the run from a step left time unused: BreastMNIST's
        EfficientNet-Lite0 step, still below its probe after 16 epochs, ended it at 215 s of 300 with the
        Lite2 step never tried."""
        if self.start is not None:
            log.info("fine-tuning step %s: validation has not improved for %d slices (step %d)",
                     self.start.group, self.stale_slices, self.tuner.steps)
            return self._finish()
        log.info("validation has not improved for %d slices: done", self.stale_slices)
        self.ctx.done_training = True
        self.ctx.predictions.nothing_new()
        return self.name

    def _finish(self) -> str:
        """This step of the any-time steps is done: the steps stage takes over (a pending checkpoint stays)."""
        self.finished = True
        self.ctx.predictions.nothing_new()
        return self.name

    def extend(self, until: float):
        """No stronger step fits in the time left: go on here until `until`, from the best weights, with a
        new cosine cycle at half the learning rate (a warm restart: nothing idles while time is left)."""
        self.finished = False
        self.start.until = until
        model = copy.deepcopy(self.tuner.ema)  # the EMA copy has requires_grad off: the new tuner re-freezes
        if self.best_state is not None:
            model.load_state_dict(self.best_state)
        for p in model.parameters():
            p.requires_grad_(True)
        self._new_tuner(model, self.tuner.base_lrs[-1] * 0.5)
        self.leaving_head = False  # it starts from tuned weights: a fall goes back to them
        self.slice_seconds = self.ctx.config.first_slice_seconds
        self._start_schedule(until)
        log.info("fine-tuning step %s goes on until the end (a new cycle at half the learning rate)",
                 self.start.group)

    # ------------------------------------------------------------------ start
    def _start(self, deadline: float) -> bool:
        ctx, cfg = self.ctx, self.ctx.config
        data = ctx.data
        if not data.read_all_train(deadline):
            return False
        top_mode = ctx.top_mode
        body = copy.deepcopy(ctx.net.top) if top_mode else copy.deepcopy(ctx.net.network)
        model = Classifier(body, ctx.net.n_features, data.train_y.shape[1])
        if top_mode and cfg.top_dropout > 0:
            model.head = nn.Sequential(nn.Dropout(cfg.top_dropout), model.head)
        head = self.start.head if self.start is not None else self.probe.head
        lr = cfg.top_lr if top_mode else cfg.lr
        start_lr = lr
        if head is not None and head.multilabel == data.profile.multilabel and head.weight.shape[1] == data.train_y.shape[1]:
            weight, bias = head.as_linear()  # LP-FT: start from the probe's linear head
            linear = model.head[-1] if isinstance(model.head, nn.Sequential) else model.head
            with torch.no_grad():
                linear.weight.copy_(weight)
                linear.bias.copy_(bias)
            if top_mode:  # (measured in the CPU's top mode; the full fine-tuning keeps its recipe)
                start_lr = lp_ft_learning_rate(lr, weight)
        if self.start is not None:
            self.size = self.start.size  # its probe's size: the head's features, the cached activations
        elif top_mode or cfg.finetune_resolution <= 0:
            self.size = self.probe.size  # the LP-FT head was fitted on features at this size
        else:
            self.size = working_size(data.profile.storage_hw, cfg.finetune_resolution)
        self.fit_idx = np.flatnonzero(~data.is_val)
        self.val_idx = np.flatnonzero(data.is_val)
        self._new_tuner(model, start_lr)
        if start_lr < lr:
            # the cut a first fall would have made, made before it: a later fall does not cut again
            self.lr_cuts = MAX_STEP_LR_CUTS
            log.info("LP-FT from a large head (row norm %.0f): learning rate %.4f from the start",
                     head_row_norm(weight), start_lr)
        self.leaving_head = self.start is not None
        if top_mode:
            ctx.caches.train.ensure(data.images("train"), self.val_idx,
                                    deadline=ctx.planner.finetune_start_deadline(deadline))
        if self.start is None:  # (the steps stage scored the earlier candidates on its own split)
            # the probe's candidates, on the probe-size caches
            self._rescore_candidates_on_full_val(ctx.planner.finetune_start_deadline(deadline))
            if top_mode and cfg.finetune_resolution > 0:
                self._top_finetune_resolution(deadline)
        self._start_schedule(self.schedule_end(deadline), deadline)
        return True

    def schedule_end(self, deadline: float) -> float:
        """When the cosine schedule should end: the call's deadline (the run's end), or this step's own end."""
        return deadline if self.start is None else min(deadline, self.start.until)

    def _top_finetune_resolution(self, deadline: float):
        """Top mode with its own fine-tuning resolution: the probe's early predictions at the cheap
        probe size, the fine-tuned top at the larger one (caches rebuilt), when time allows.

        Why: at 96 px instead of 64 the fine-tuned top ends clearly better on photos (final NAUC
        peta 0.58 vs 0.54, cifar10 0.976 vs 0.974), but a 96 px probe predicts seconds later, which
        ALC punishes most. Only once the probe's test predictions are made: the caches holding its
        features are dropped.
        """
        ctx = self.ctx
        new_size = working_size(ctx.data.profile.storage_hw, ctx.config.finetune_resolution)
        if tuple(new_size) == tuple(self.size):
            return
        if ctx.caches.test_features is None:
            log.info("fine-tuning stays at %s: the probe's test predictions are not made yet", self.size)
            return
        if self._resize_affordable(new_size, deadline) is None:
            return
        ctx.predictions.drop_predictor()  # the probe's predictor needs the probe-size caches: not any more
        self.size = new_size
        self._rebuild_top_caches(new_size, deadline)

    def _resize_affordable(self, new_size, deadline: float) -> float | None:
        data = self.ctx.data
        return self.ctx.planner.resize_affordable(self.size, new_size, deadline, len(self.val_idx), data.n_test_read,
                                                  len(self.fit_idx), self.ctx.top_mode, self.test_cost())

    def _rebuild_top_caches(self, new_size, deadline: float):
        ctx = self.ctx
        caches, images = ctx.caches, ctx.data.images("train")
        caches.at(new_size)  # new train/test caches; the probe's features are not needed any more
        caches.train.ensure(images, self.val_idx)
        caches.test.ensure(ctx.data.images("test"), np.arange(ctx.data.n_test_read),
                           deadline=ctx.planner.resize_cache_deadline(deadline))
        first = ctx.planner.first_share(ctx.planner.feature_rate(new_size), len(self.fit_idx))
        caches.train.ensure(images, self.fit_idx[:max(first, ctx.config.batch_size)],
                            deadline=ctx.planner.resize_cache_deadline(deadline))

    def _new_tuner(self, model: Classifier, lr: float):
        """Top mode: the CPU recipe (batch 64, cached activations). Full mode: a batch sized to the
        device with the learning rate scaled to it, random resized crops made on the device, and the
        pretrained BatchNorm statistics kept (frozen BN). Why frozen: with BN in training mode the
        running statistics drift to the augmented batches' within a dozen steps, the features the
        probe's head (LP-FT) was fitted on move, and validation fell from 0.96 to 0.39 NAUC on
        sign_language_digits even as the learning rate was cut to 3% (and from 0.81 to 0.65 on
        cifar10 on a GPU)."""
        ctx, cfg = self.ctx, self.ctx.config
        self.lr_cuts = 0  # learning-rate cuts after a fall, in this schedule
        top_mode = ctx.top_mode
        batch = cfg.batch_size
        if not top_mode:
            batch = ctx.plan.train_batch(len(self.fit_idx), cfg.batch_size, cfg.gpu_batch_size)
            lr = ctx.plan.scaled_lr(lr, batch, cfg.batch_size)
        prior = None
        if not top_mode and ctx.net.warm_step_seconds:  # measured at the expected size and batch
            prior = ctx.net.warm_step_seconds
        self.tuner = FineTuner(model, ctx.data.preprocess, ctx.data.profile.multilabel, lr=lr,
                               batch_size=batch, weight_decay=cfg.weight_decay,
                               freeze_fraction=0.0 if top_mode else cfg.freeze_fraction, ema_decay=cfg.ema_decay,
                               label_smoothing=cfg.label_smoothing,
                               flip=cfg.augment_flip and ctx.data.profile.flip_ok, max_shift=cfg.augment_shift,
                               total_steps_hint=1000, freeze_bn=True, random_crops=not top_mode,
                               step_seconds_prior=prior)
        self.tta.reset()  # flip TTA is decided per resolution, from validation
        ctx.caches.drop_flipped()
        ctx.planner.reset_finetune_costs()

    def _start_schedule(self, schedule_end: float, deadline: float | None = None):
        """Plan the cosine schedule (to end at `schedule_end`); the starting weights are the first "best"
        fine-tuned state, when their validation pass ends before the call's `deadline` (a pass of the
        whole network at a new size on a busy CPU took seconds: without a deadline a call overran)."""
        deadline = schedule_end if deadline is None else deadline
        self._plan_total_steps(min(schedule_end, deadline))
        self.stale_slices = 0
        self.best_score, self.best_state, self.best_val_probs = -np.inf, None, None
        self.start_score = -np.inf
        if len(self.val_idx):
            plain = self.predict_val(deadline - self.test_cost() - 1.0)
            if plain is not None:
                self._track(score(self.ctx.data.train_y[self.val_idx], plain), plain)
                self.start_score = self.best_score

    def _rescore_candidates_on_full_val(self, deadline: float | None = None):
        """Earlier candidates saw a prefix of the validation split; extend their val predictions to all of it
        (the probe's, when its features are computed before `deadline`)."""
        ctx = self.ctx
        if len(self.val_idx) == 0:
            return
        for cand in ctx.candidates:
            if cand.name == "thumbnails":
                cand.val_probs = self.thumbnails.val_probs(self.val_idx)
            elif cand.name == "probe" and self.probe.head is not None:
                probs = self.probe.val_probs(deadline)
                if probs is not None:
                    cand.val_probs = probs
        _, ctx.best_val_score = ctx.candidates.select(ctx.data.val_labels())

    # ------------------------------------------------------------------ the schedule
    def _plan_total_steps(self, deadline: float):
        """Cosine schedule length: the steps that fit in the time left, from the steady-state step time
        (a few measured steps; the first, cold ones are not trusted, see autodl_core/schedule.py)."""
        self.tuner.train_until(self._make_batch(), self.ctx.data.train_y, self._fit_pool(),
                               deadline=self.ctx.planner.step_timing_deadline(deadline),
                               max_steps=2 * self.tuner.clock.block_steps + 1)
        per_step = self.tuner.seconds_per_step or 1.0
        self.tuner.total_steps_hint = self.ctx.planner.planned_steps(deadline, per_step)
        self._planned_step_seconds = per_step
        log.info("fine-tuning at %s: %.4fs/step (batch %d), planning %d steps", self.size, per_step,
                 self.tuner.batch_size, self.tuner.total_steps_hint)

    def _replan_if_step_time_moved(self, deadline: float):
        per_step = self.tuner.seconds_per_step
        total = self.ctx.planner.replanned_steps(deadline, per_step, self._planned_step_seconds, self.tuner.steps)
        if total is None:
            return
        log.info("step time %.4fs measured (planned %.4fs): re-planning %d -> %d steps", per_step,
                 self._planned_step_seconds, self.tuner.total_steps_hint, total)
        self.tuner.total_steps_hint = total
        self._planned_step_seconds = per_step

    # ------------------------------------------------------------------ batches and predictions
    def _make_batch(self):
        ctx = self.ctx
        if ctx.top_mode:
            return lambda idx: ctx.caches.train.get(idx, ctx.device)
        return self.tuner.image_batches(ctx.data.images("train"), self.size)

    def _fit_pool(self) -> np.ndarray:
        if self.ctx.top_mode:
            return self.fit_idx[self.ctx.caches.train.has[self.fit_idx]]
        return self.fit_idx

    def _extend_cache(self, seconds: float):
        """Top mode: spend part of a slice computing trunk activations of training examples not cached yet."""
        ctx = self.ctx
        if not ctx.top_mode or seconds <= 0:
            return
        missing = self.fit_idx[~ctx.caches.train.has[self.fit_idx]]
        if len(missing):
            ctx.caches.train.ensure(ctx.data.images("train"), missing, deadline=in_seconds(seconds))

    def predict_val(self, deadline: float | None, flip: bool = False):
        ctx = self.ctx
        if ctx.top_mode:
            cache = ctx.caches.train
            if flip:
                cache = ctx.caches.flipped("val", self.size)
                cache.ensure(ctx.data.images("train"), self.val_idx)
            return self.tuner.predict_batches(lambda p: cache.get(self.val_idx[p], ctx.device),
                                              len(self.val_idx), deadline=deadline, batch_size=self._top_batch())
        images = ctx.data.images("train")
        val_idx = torch.from_numpy(self.val_idx).to(images.device) if isinstance(images, torch.Tensor) else self.val_idx
        return self.tuner.predict(images[val_idx], self.size, deadline=deadline, flip=flip,
                                  batch_size=ctx.plan.predict_batch)

    def predict_test(self, deadline: float, flip: bool = False):
        ctx = self.ctx
        if ctx.top_mode:
            cache = ctx.caches.flipped("test", self.size) if flip else ctx.caches.test
            n_test = ctx.data.n_test_read
            cache.ensure(ctx.data.images("test"), np.arange(n_test), deadline=deadline)
            if n_test and not cache.has[:n_test].all():
                return None  # what was computed stays cached for the next call
            return self.tuner.predict_batches(lambda p: cache.get(p, ctx.device), n_test, deadline=deadline,
                                              batch_size=self._top_batch())
        return self.tuner.predict(ctx.data.images("test"), self.size, deadline=deadline, flip=flip,
                                  batch_size=ctx.plan.predict_batch)

    def _top_batch(self) -> int:
        """Cached activations the fine-tuned top predicts at once: bounded by pixels as frozen passes are (at
        288 x 328 px, 256 at a time held over a GB of the top's activations)."""
        return min(256, 4 * self.ctx.plan.feature_batch_for(self.size))

    def test_cost(self) -> float:
        ctx = self.ctx
        cost = ctx.planner.finetune_test_cost(ctx.data.n_test_read, self.size, ctx.top_mode, bool(self.tta.on))
        train_rate = self.net.train_rate
        if self.start is not None and train_rate is not None and ctx.planner.ft_test_seconds is None:
            # the tuned top's forward pass, about twice its training rate (frozen passes run in an engine)
            per_pass = ctx.data.n_test_read / max(1.0, 2 * train_rate.images_per_s(self.size))
            cost = max(cost, (2 if self.tta.on else 1) * per_pass + 0.5)
        return cost

    def val_cost(self) -> float:
        return self.ctx.planner.finetune_val_cost(len(self.val_idx), self.size)

    def checkpoint_name(self) -> str:
        backbone = f":{self.net.name}" if self.start is not None else ""
        return (f"finetune{backbone}@{self.size[0]}x{self.size[1]}:{self.tuner.steps}"
                + ("+flip" if self.tta.on else ""))

    def group(self) -> str:
        return self.start.group if self.start is not None else ""

    def predict(self, deadline: float):
        ctx = self.ctx
        started = time.monotonic()
        probs = self.predict_test(deadline)
        if probs is None:
            return None
        if self.tta.on:
            flipped = self.predict_test(deadline, flip=True)
            if flipped is None:
                return None  # the flipped test activations are being computed; next call goes on
            probs = (probs + flipped) / 2
        ctx.planner.ft_test_seconds = seconds_since(started)
        ctx.candidates.add(Candidate(self.checkpoint_name(), probs, self.val_probs, group=self.group()))
        return ctx.best_combination()

    # ------------------------------------------------------------------ validation decisions
    def with_flip_tta(self, plain: np.ndarray, deadline: float, recheck: bool = True) -> np.ndarray:
        """Validation predictions of the checkpoint as it would predict the test set (see autodl_core/tta.py)."""
        ctx = self.ctx
        return self.tta.apply(
            plain, ctx.data.train_y[self.val_idx], score,
            affordable=lambda: ctx.config.flip_tta and ctx.planner.flip_tta_affordable(
                ctx.data.n_test_read, self.size, deadline, plain_cost=self.test_cost()),
            flipped=lambda: self.predict_val(deadline - self.test_cost(), flip=True),
            recheck=recheck, where=self.size)

    def _converged(self) -> bool:
        """Validation has stopped improving at this resolution: after the full patience, or after two
        stale slices once half of the planned schedule is done (early slices are short and noisy)."""
        stale, patience = self.stale_slices, self.ctx.config.patience_slices
        if self.start is not None:  # a step of the any-time steps: the next, stronger step waits
            # ...but not before an epoch and a quarter of its schedule: the first slices are short, and two
            # of them without a clear gain ended a step after 118 steps of ~4,700 images (PneumoniaMNIST).
            settled = self._epochs() >= 1.0 and self.tuner.steps >= 0.25 * self.tuner.total_steps_hint
            if self._recovering():
                # ...nor while it is still below its probe: leaving the probe's head dips validation first, and
                # on knee X-rays (5 grades) it took ~2 epochs to pass it (0.00 -> 0.43 -> 0.56 at 96 px); the
                # steps ended each backbone's tuning after one epoch, below its probe (ALC 0.553 -> 0.449).
                return False
            return stale >= patience or (stale >= min(2, patience) and settled)
        half_done = self.tuner.steps >= 0.5 * self.tuner.total_steps_hint
        return stale >= patience or (stale >= min(2, patience) and half_done)

    def _epochs(self) -> float:
        return self.tuner.steps * self.tuner.batch_size / max(1, len(self.fit_idx))

    def _recovering(self) -> bool:
        """A step's fine-tuning is still leaving its probe's head: below the probe's validation score (or not
        yet past the weights it started from), until RECOVERY_EPOCHS and RECOVERY_STEPS are both done."""
        if self.start is None or (self._epochs() >= RECOVERY_EPOCHS and self.tuner.steps >= RECOVERY_STEPS):
            return False
        if self.best_score < self.start.probe_score:
            return True
        return self.leaving_head and self.best_score <= self.start_score

    def grow_resolution(self, deadline: float) -> bool:
        """Fine-tuning has converged at this resolution: go on at a larger one from the best weights,
        when the new caches (top mode: validation, test and a first share of the training set) cost at
        most half of the time left and leave at least 30 s of training."""
        ctx = self.ctx
        new_size = self.growth.next_size(self.size, ctx.data.profile.storage_hw, self.best_score,
                                         self.best_state is not None)
        if new_size is None:
            return False
        time_left = self._resize_affordable(new_size, deadline)
        if time_left is None:
            self.growth.refuse(self.size)
            return False
        model = copy.deepcopy(self.tuner.ema)  # the EMA copy has requires_grad off: the new tuner re-freezes
        model.load_state_dict(self.best_state)
        for p in model.parameters():
            p.requires_grad_(True)
        lr = self.tuner.base_lrs[-1] * 0.5
        self.growth.grew()
        self.leaving_head = False
        self.size = new_size
        if ctx.top_mode:
            self._rebuild_top_caches(new_size, deadline)
        self._new_tuner(model, lr)
        self.slice_seconds = max(ctx.config.first_slice_seconds, 0.1 * time_left)
        self._start_schedule(deadline)
        return True

    def _track(self, value: float, probs: np.ndarray | None = None):
        """Remember the best fine-tuned weights; on a collapse, go back to them with a smaller learning rate.
        Within the any-time steps a slice whose gain is within the noise of the validation split counts
        as stale too (a plateau is "no gain the split can vouch for", the rule that gates predictions).

        Not while fine-tuning settles (the first 2 x warm-up steps): moving from the probe's head (LP-FT)
        to a tuned network dips validation for a few steps (sign_language_digits, full fine-tuning: 0.955
        -> 0.917 at step 10, 0.98 by step 33); reading that dip as a collapse cut the learning rate twice
        and left the run at the probe's score."""
        best = self.best_score
        if value > best + 1e-4:
            beyond_noise = self._gain_beyond_own_noise(value - best, probs)
            self.best_score, self.best_val_probs = value, probs
            self.best_state = copy.deepcopy(self.tuner.ema.state_dict())
            if beyond_noise or self.tuner.steps < 2 * self.tuner.schedule.warmup_steps:
                self.stale_slices = 0
                return
        if self.tuner.steps < 2 * self.tuner.schedule.warmup_steps:
            return
        self.stale_slices += 1
        if np.isfinite(best) and value < best - 0.02 and self.best_state is not None:
            if self.lr_cuts >= MAX_STEP_LR_CUTS and self._recovering():
                # Going back again would restart the recovery from the head: on knee X-rays each slice went
                # back to the starting weights (val 0.19, 0.30, 0.35 < 0.375 at the slices' ends) and the
                # step never passed them, where 0.1.24, back once, passed its head by step 212.
                log.info("val NAUC fell from %.4f to %.4f while leaving the probe's head (epoch %.1f): goes on",
                         best, value, self._epochs())
                return
            self.tuner.model.load_state_dict(self.best_state)
            self.tuner.ema.load_state_dict(self.best_state)
            if self.start is not None and self.lr_cuts >= MAX_STEP_LR_CUTS:
                log.info("val NAUC fell from %.4f to %.4f: back to the best weights", best, value)
                return
            self.lr_cuts += 1
            self.tuner.base_lrs = [lr * 0.3 for lr in self.tuner.base_lrs]
            log.info("val NAUC fell from %.4f to %.4f: back to the best weights, learning rate x0.3", best, value)

    def _gain_beyond_own_noise(self, gain: float, probs: np.ndarray | None) -> bool:
        """Within the any-time steps: the gain over this step's best weights exceeds `val_noise_z` paired
        bootstrap standard errors (alone, every gain above 1e-4 counts, as before)."""
        if self.start is None or probs is None or self.best_val_probs is None:
            return True
        y_val = self.ctx.data.train_y[self.val_idx]
        m = min(len(probs), len(self.best_val_probs))
        se = paired_gain_se(y_val[:m], probs[:m], self.best_val_probs[:m], score, n_boot=30)
        return gain > self.ctx.config.val_noise_z * se

    def _worth_predicting(self, val_probs: np.ndarray, deadline: float) -> bool:
        """Predict a checkpoint only when adding it raises the ensemble's validation score clearly enough:
        by the minimum gain (saturation, prediction cost) and beyond the noise of the split's size."""
        ctx = self.ctx
        y_val = ctx.data.val_labels()
        tentative = Candidate(self.checkpoint_name(), None, val_probs, group=self.group())
        group, value = ctx.candidates.select(y_val, extra=tentative)
        if not np.isfinite(value) or tentative not in group:
            return False
        gain = value - ctx.best_val_score
        if gain <= min_gain(ctx.best_val_score, ctx.planner.cost_share(self.test_cost(), deadline)):
            return False
        return self._gain_beyond_noise(group, gain, y_val)

    def _gain_beyond_noise(self, group: list[Candidate], gain: float, y_val: np.ndarray) -> bool:
        """The gain over the current prediction exceeds `val_noise_z` bootstrap standard errors."""
        ctx = self.ctx
        current, current_score = ctx.candidates.select(y_val)
        if not current or not np.isfinite(current_score) or ctx.config.val_noise_z <= 0:
            return True
        m = min(len(c.val_probs) for c in group + current if c.val_probs is not None)
        se = paired_gain_se(y_val[:m], CandidatePool.group_val_probs(group, m),
                            CandidatePool.group_val_probs(current, m), score)
        if gain > ctx.config.val_noise_z * se:
            return True
        log.info("checkpoint gain %.4f on %d validation examples is within noise (SE %.4f): not predicted",
                 gain, m, se)
        return False
