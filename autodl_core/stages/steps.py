"""Stage 3 on a CPU: any-time steps of growing strength, until the budget ends.

After the first probe (a small resolution: the early predictions ALC weighs most), quality is bought
in steps, each chosen from the data and the time left by the planner's cost model:

    probe    a backbone's frozen features at the largest size the data and the budget afford
             (up to `max_step_side`, small images upsampled at most MAX_UPSAMPLE times): one pass
             over every example, a linear head; on small photo sets a 224-px frozen probe costs
             seconds and beats fine-tuning at 64-128 px (test NAUC 0.98 vs 0.89 on 397 photos);
    tune     the backbone's top fine-tuned (LP-FT) on the trunk activations its probe cached, at
             the largest size where TUNE_MIN_EPOCHS epochs fit (TUNE_MIN_EPOCHS_WEAK where the frozen
             probes score low: far from ImageNet, epochs pay more than pixels); it hands over at a
             plateau (two slices whose gain the validation split cannot vouch for) or when its share of
             the time is used;
    then     the next backbone (`step_backbones`: EfficientNet-Lite0, Lite2), probe then tune; and
             when no stronger step fits, the last step goes on with a new cycle until the end.

A set large for its budget (TUNE_MIN_EPOCHS epochs fit at no size) has its pipeline's backbone tuned
until the end at the largest size where one epoch fits, after one larger probe; photos that must be
read again at their large size get a probe at the stored size first (no reading: seconds).

Every step's predictions join the candidate pool; the prediction is the validation-best ensemble
across steps (diverse backbones and sizes are where ensembles pay). Before the first step the
validation split is checked against near-duplicates (autodl_core/validation.py).
"""
from __future__ import annotations

import logging
import time

import numpy as np

from autodl_core.ensemble import Candidate
from autodl_core.heads import LinearHead
from autodl_core.images import working_size
from autodl_core.memory import process_memory_gb, release_freed_memory
from autodl_core.planner import (FIRST_PROBE_WEAK_NAUC, MIN_STEP_TIME, TUNE_MIN_EPOCHS, TUNE_MIN_EPOCHS_WEAK,
                                 TUNE_STEP_SHARE, WEAK_FEATURES_NAUC, seconds_since)
from autodl_core.run_context import RunContext, score
from autodl_core.run_data import REREAD_CHUNK
from autodl_core.stages.finetune import FinetuneStage, StepStart
from autodl_core.stages.probe import ProbeStage
from autodl_core.stages.thumbnails import ThumbnailStage
from autodl_core.validation import check_split

log = logging.getLogger("autodl_core.stages.steps")

STEP_SIDES = (64, 80, 96, 112, 128, 160, 192, 224, 256, 288, 320)  # shorter sides the steps choose among
# Small images are looked at up to this many times their own size: frozen probes of 28 px BreastMNIST
# scored test NAUC 0.73 at 96 px, 0.82 at 160, 0.77 at 288 (MobileNetV2; docs/benchmarks.md).
MAX_UPSAMPLE = 6.0
MIN_SIDE_GAIN = 1.3  # a further probe of a backbone must look at least this much larger
MAX_STEP_FAILURES = 2  # steps that may fail (logged, skipped) before the run stops its training


def probe_step_examples(config) -> int:
    """Training examples a probe step computes features of at most (twice the first probe's)."""
    return 2 * config.probe_max_examples


def step_sides(storage_hw, max_side: int) -> list[int]:
    """The shorter sides a step may use for images stored at `storage_hw`, ascending."""
    top = min(max_side, MAX_UPSAMPLE * min(storage_hw))
    sides = [s for s in STEP_SIDES if s <= top]
    return sides or [STEP_SIDES[0]]


class ProbeStep:
    """A frozen probe of one backbone at one size: trunk activations of the validation, test and training
    examples (cached: a fine-tuning step at this size goes on from them), the frozen top's pooled
    features, a linear head; its predictions join the candidates."""

    def __init__(self, ctx: RunContext, net, size, fit_idx: np.ndarray, val_idx: np.ndarray, then_tune: bool,
                 resume: FinetuneStage | None = None, tune_to_end: bool = False, sized_for_weak: bool = False):
        self.ctx, self.net, self.size = ctx, net, tuple(size)
        self.sized_for_weak = sized_for_weak  # its size was chosen knowing the frozen features are weak
        self.resume = resume  # a fine-tuning step of this backbone and size to go on with once cached
        self.tune_to_end = tune_to_end  # the fine-tuning that follows keeps the rest of the run
        # The head is fitted on the first PROBE_STEP_FIT examples of a large set (a fine-tuning step caches
        # the rest as it trains): CIFAR-10's whole training set at 96 px took 47 s without a prediction.
        self.fit_idx = fit_idx[:probe_step_examples(ctx.config)]
        self.val_idx, self.then_tune = val_idx, then_tune
        self.group = f"{net.name}@{self.size[0]}x{self.size[1]}"
        self.finished = False
        self.head: LinearHead | None = None
        self.test_probs = self.val_probs = None
        self._opened = False

    def step(self, deadline: float) -> None:
        ctx = self.ctx
        if not self._opened:
            ctx.use_backbone(self.net)
            ctx.caches.at(self.size)
            release_freed_memory()  # the last step's caches, freed: handed back before these fill
            self._opened = True
            log.info("step: frozen probe of %s at %s%s (process memory %.2f GB)", self.net.name, self.size,
                     ", then fine-tuning" if self.then_tune else "", process_memory_gb())
        caches, data = ctx.caches, ctx.data
        stop = ctx.planner.step_pass_deadline(deadline)
        if data.reread_needed(self.size) and not data.reread_at_large_size(stop) \
                and data.large_storage_hw is not None:
            ctx.predictions.nothing_new()  # reading again at the large size: goes on at the next call
            return
        n_test = data.n_test_read
        started = time.monotonic()
        for cache, images, positions in ((caches.train, data.images("train"), self.val_idx),
                                         (caches.test, data.images("test"), np.arange(n_test)),
                                         (caches.train, data.images("train"), self.fit_idx)):
            cache.ensure(images, positions, deadline=stop)
            if len(positions) and not cache.has[positions].all():
                ctx.predictions.nothing_new()  # goes on at the next call
                return
        fit_val = np.concatenate([self.fit_idx, self.val_idx])
        features = caches.pooled(caches.train, fit_val, deadline=stop)
        test_features = caches.pooled(caches.test, np.arange(n_test), deadline=stop) if features is not None else None
        if features is None or test_features is None:
            ctx.predictions.nothing_new()
            return
        ctx.planner.note_features(len(fit_val) + n_test, self.size, seconds_since(started))
        y = data.train_y
        n_fit = len(self.fit_idx)
        self.head = LinearHead(data.profile.multilabel, l2=ProbeStage.l2(n_fit)).fit(
            features[:n_fit], y[self.fit_idx], max_iter=100, deadline=ctx.planner.step_fit_deadline(stop))
        self.val_probs = self.head.predict_proba(features[n_fit:]) if len(self.val_idx) else None
        self.test_probs = self.head.predict_proba(test_features)
        self.finished = True
        log.info("step: frozen probe of %s: val NAUC %.4f", self.group, self.val_score())
        ctx.predictions.ready(self.predict)

    def val_score(self) -> float:
        """The probe's validation score (-inf without a validation split)."""
        if self.val_probs is None or not len(self.val_idx):
            return -np.inf
        return score(self.ctx.data.train_y[self.val_idx], self.val_probs)

    def predict(self, deadline: float):
        ctx = self.ctx
        ctx.candidates.add(Candidate(f"probe:{self.group}", self.test_probs, self.val_probs, kind="probe",
                                     group=self.group))
        return ctx.best_combination()


class StepsStage:
    name = "finetune"

    def __init__(self, ctx: RunContext, thumbnails: ThumbnailStage, probe: ProbeStage, nets: dict):
        self.ctx, self.thumbnails, self.probe, self.nets = ctx, thumbnails, probe, nets
        self.current = None  # the step under way: a ProbeStep or a FinetuneStage
        self.tune: FinetuneStage | None = None  # the latest fine-tuning step
        self.tunes: dict[str, FinetuneStage] = {}  # the latest fine-tuning step of each backbone
        self.history: list[str] = []  # the steps begun, in order ("probe mobilenetv2_100@224x224", ...)
        self.probed: dict[str, int] = {}  # backbone -> largest side probed
        # the best validation score of a step's frozen probe (or the first probe's, where that is already
        # weak): how much the pretrained features carry on this data
        self.frozen_score = -np.inf
        self.tuned: set[str] = set()
        self.fit_idx = self.val_idx = None
        self.split_report = None
        self.started = False
        self.failures = 0
        self._looked_before_reading = False  # the stored-size probe before the first reading again is made
        self._memory_dropped: dict = {}  # backbone name -> the sides last left out for memory (logged on change)

    # ------------------------------------------------------------------ one train call
    def step(self, deadline: float) -> str:
        ctx = self.ctx
        if not self.started:
            if not ctx.data.read_all_train(deadline):
                ctx.done_training = True
                return self.name
            if ctx.caches.test_features is None:
                return self.name  # the probe's test prediction is still being made: the next test call ends it
            self._begin(deadline)
            self.started = True
            return self.name
        for _ in range(4):  # a step may finish without a prediction: the next one starts in the same call
            if self.current is None or self.current.finished:
                if ctx.memory is not None:  # the finished step's scratch, freed: not counted when sizing the next
                    release_freed_memory()
                self.current = self._next_step(deadline)
                if self.current is None:
                    log.info("steps: no step fits in the %.0fs left: done", deadline - time.monotonic())
                    ctx.done_training = True
                    ctx.predictions.nothing_new()
                    return self.name
            try:
                self.current.step(deadline)
            except Exception:  # one step failing (memory, an engine) must not end the run: the next one starts
                self.failures += 1
                if self.failures > MAX_STEP_FAILURES:
                    raise
                log.exception("step %s failed; going on with the next one", self.history[-1] if self.history else "")
                self.current.finished = True
                ctx.predictions.nothing_new()
                continue
            made_prediction = ctx.predictions.pending is None
            if ctx.done_training or made_prediction or not self.current.finished:
                break
            if deadline - time.monotonic() < 5.0:
                break
        return self.name

    # ------------------------------------------------------------------ the validation split
    def _begin(self, deadline: float):
        """Every example is read: check the validation split against near-duplicates (the first probe's
        features), and score the earlier candidates on the split the steps will use."""
        ctx, data, cfg = self.ctx, self.ctx.data, self.ctx.config
        features = ctx.caches.train_features
        if cfg.group_validation and features is not None:
            n = len(features)
            mask, self.split_report = check_split(features, data.train_y[:n], data.is_val[:n],
                                                  ctx.caches.test_features, data.profile.multilabel)
            log.info(self.split_report.line())
            if mask is not None:
                full = np.zeros(data.n_read, bool)
                full[:n] = mask
                data.set_val_mask(full)
                self._refit_first_heads(deadline)
        self.val_idx = np.flatnonzero(data.is_val)
        self.fit_idx = np.flatnonzero(~data.is_val)
        if len(self.val_idx):
            first = {}  # what each first stage carries, before any step
            for cand in ctx.candidates:
                if cand.name == "thumbnails":
                    cand.val_probs = self.thumbnails.val_probs(self.val_idx)
                elif cand.name == "probe" and self.probe.head is not None:
                    cand.val_probs = self.probe.val_probs()
                if cand.val_probs is not None and len(cand.val_probs) == len(self.val_idx):
                    first[cand.name] = score(data.val_labels(), cand.val_probs)
                    log.info("steps: %s val NAUC %.4f", cand.name, first[cand.name])
            if "probe" in first:
                self.note_first_probe(first["probe"], first.get("thumbnails", -np.inf))
            _, ctx.best_val_score = ctx.candidates.select(data.val_labels())
        ctx.predictions.ready(lambda deadline: ctx.best_combination())

    def note_first_probe(self, value: float, thumbnails: float = -np.inf) -> None:
        """The first probe's validation score, and the raw thumbnails' head's: a probe below
        FIRST_PROBE_WEAK_NAUC that does not beat 12-px thumbnails either says the pretrained features carry
        little here before any step, so the first step is sized for tuning instead of preceded by a larger
        frozen probe. Knee X-rays (probe 0.19, thumbnails 0.39): a 15-s probe at 192 px scored 0.41 and put
        the tuning's start at 32 s instead of 14 s. Pedestrians (0.36 over thumbnails' 0.33) keep that probe:
        at 216 x 96 px it scored 0.48 and its predictions carried the ensemble (ALC 0.497 with it, 0.471
        without)."""
        if np.isfinite(value) and value < FIRST_PROBE_WEAK_NAUC and value <= thumbnails:
            self.frozen_score = value
            log.info("steps: the first probe's features are weak (val NAUC %.3f < %.2f, thumbnails %.3f)",
                     value, FIRST_PROBE_WEAK_NAUC, thumbnails)

    def _refit_first_heads(self, deadline: float):
        """The thumbnail and probe heads saw examples now held out: refitted without them (seconds)."""
        ctx = self.ctx
        self.thumbnails.fit(deadline)
        self.thumbnails.register()
        probe = self.probe
        if probe.head is not None and probe.size is not None:
            probe._fit_head(probe.size, deadline)
            ctx.candidates.add(Candidate("probe", probe.head.predict_proba(ctx.caches.test_features), None))

    # ------------------------------------------------------------------ which step next
    def _next_step(self, deadline: float):
        last = self.current
        if isinstance(last, ProbeStep) and last.head is not None:
            self.frozen_score = max(self.frozen_score, last.val_score())
        if isinstance(last, ProbeStep) and last.then_tune and last.head is not None:
            if last.resume is not None:  # its activations are cached again: it goes on until the end
                last.resume.extend(deadline)
                self.tune = last.resume
                return last.resume
            if self.weak_features() and not (last.sized_for_weak or last.tune_to_end):
                # Its probe shows the features carry little: the tuning goes where enough epochs fit (the
                # same size when they fit there: _stronger_step tunes these cached activations then).
                log.info("steps: the frozen features are weak (val NAUC %.3f < %.2f): tuning where %.0f epochs fit",
                         self.frozen_score, WEAK_FEATURES_NAUC, TUNE_MIN_EPOCHS_WEAK)
                step = self._stronger_step(deadline)
                if step is not None:
                    return step
            return self._tune(last, deadline, last_step=last.tune_to_end)
        step = self._stronger_step(deadline)
        if step is not None:
            return step
        time_left = deadline - time.monotonic()
        if time_left < MIN_STEP_TIME:
            return None
        # The fine-tuning step that reached the best validation score goes on, from its best weights: at once
        # when it is the one just finished, else once its activations are cached again (a probe of another
        # backbone took the caches). Not a new probe and a new fine-tuning from its head, which threw its
        # progress away (pedestrians: -0.006 ALC); nor the last step's new cycles when an earlier step is
        # better (knee X-rays: EfficientNet-Lite2 at 64 px, validation 0.49, went on in 15-s cycles for the
        # last 140 s while MobileNetV2's step at 112 px had reached 0.60).
        resumable = [t for t in self.tunes.values() if t.tuner is not None and t.best_state is not None]
        best = max(resumable, key=lambda t: t.best_score, default=None)
        if isinstance(last, FinetuneStage) and last.tuner is not None and (
                best is None or best is last or last.best_score >= best.best_score):
            last.extend(deadline)
            return last
        if best is not None:
            self.history.append(f"resume {best.start.group}")
            log.info("step: %s goes on until the end (its activations cached again)", best.start.group)
            return ProbeStep(self.ctx, best.net, best.size, self.fit_idx, self.val_idx, then_tune=True, resume=best)
        # The last fine-tuning step: the pipeline's backbone at the largest size where an epoch fits in the
        # time left (at the smallest size when none does).
        net = self.nets[self.ctx.config.backbone]
        side, cached = self._tune_side(net, 0.9 * time_left, min_epochs=1.0, floor=0)
        if side is None:
            side = self._sides(net)[0]
            cached = self._cached(net, side)
        return self._tune(last, deadline, last_step=True) if cached else self._probe(net, side, then_tune=True)

    def _stronger_step(self, deadline: float):
        """The next backbone in `step_backbones` order that is not tuned yet: its cached activations tuned
        when the last probe left them, else a frozen probe at the largest affordable size first when that
        is clearly larger than where it can be tuned, else a probe at the tuning size followed by
        fine-tuning; None when none fits."""
        ctx, planner = self.ctx, self.ctx.planner
        first_side = min(self.probe.size) if self.probe.size else self._sides()[0]
        left = deadline - time.monotonic()
        names = [n for n in ctx.config.step_backbone_names() if n in self.nets and n not in self.tuned]
        weak = self.weak_features()
        min_epochs = TUNE_MIN_EPOCHS_WEAK if weak else TUNE_MIN_EPOCHS
        for i, name in enumerate(names):
            net = self.nets[name]
            probe_sides = self._sides(net, training=False)
            budget = (TUNE_STEP_SHARE if i + 1 < len(names) else 0.9) * left
            tune_side, cached = self._tune_side(net, budget, min_epochs=min_epochs, floor=first_side)
            if cached:
                return self._tune(self.current, deadline)
            probe_side = next((s for s in reversed(probe_sides) if planner.probe_step_affordable(
                self._n_all(), self._size(s), net.rate, deadline, extra=self._reread_cost(s))), None)
            # Where the features are weak, a frozen probe at a larger size is not worth its pass (knee X-rays:
            # EfficientNet-Lite0 at 160 px, 15 s, below the ensemble).
            probe_worth = (probe_side is not None and not weak
                           and probe_side > self.probed.get(name, 0) * MIN_SIDE_GAIN
                           and probe_side >= first_side * MIN_SIDE_GAIN)
            if probe_worth and (tune_side is None or probe_side >= tune_side * MIN_SIDE_GAIN):
                return self._look_before_reading_again(net, probe_side, first_side, deadline) \
                    or self._probe(net, probe_side, then_tune=False)
            if tune_side is not None:
                return self._look_before_reading_again(net, tune_side, first_side, deadline) \
                    or self._probe(net, tune_side, then_tune=True)
            if i == 0 and name == ctx.config.backbone:
                step = self._tune_large_set(net, first_side, deadline)
                if step is not None:
                    return step
        return None

    def _tune_large_set(self, net, first_side: int, deadline: float):
        """The pipeline's backbone, where TUNE_MIN_EPOCHS epochs fit at no size in a step's share (a set large
        for its budget), fine-tuned for the rest of the run at the largest size where one epoch fits in the
        time left; None when none does. The training images, not the epochs, set the size here: on CIFAR-10
        at T = 300 s the steps otherwise probed three backbones for 80 s and then tuned at 80 px (final
        NAUC 0.964), where one fine-tuning at 96 px from the start ended at 0.973."""
        left = deadline - time.monotonic()
        weak = self.weak_features()
        side, cached = self._tune_side(net, 0.9 * left, min_epochs=TUNE_MIN_EPOCHS_WEAK if weak else 1.0,
                                       floor=first_side)
        if side is None and weak:  # as many epochs as the time allows: at the smallest size
            side = next((s for s in self._sides(net) if s >= first_side), None)
            cached = side is not None and self._cached(net, side)
        if side is None:
            return None
        log.info("steps: a large set for the time left (%d training examples): %s tuned until the end at side %d",
                 len(self.fit_idx), net.name, side)
        if cached:
            return self._tune(self.current, deadline, last_step=True)
        return self._probe(net, side, then_tune=True, tune_to_end=True)

    def _look_before_reading_again(self, net, side: int, first_side: int, deadline: float):
        """Once, before the first step that must read the data again at the large size: a frozen probe at the
        largest size the stored images hold, if that is clearly larger than the first probe's. Reading
        Oxford flowers again at 340 x 384 px took 7.6 s, and its 288-px probe predicted at 22 s, where the
        earlier solver's fine-tuning at 96 px had predicted 0.989 at 16 s; a 128-px probe costs a second."""
        if self._looked_before_reading or not self.ctx.data.reread_needed(self._size(side)):
            return None
        self._looked_before_reading = True
        stored = [s for s in self._sides(net, training=False) if not self.ctx.data.reread_needed(self._size(s))
                  and s >= first_side * MIN_SIDE_GAIN and s > self.probed.get(net.name, 0)]
        affordable = [s for s in stored if self.ctx.planner.probe_step_affordable(
            self._n_all(), self._size(s), net.rate, deadline)]
        if not affordable:
            return None
        log.info("steps: a look at the stored size before reading the data again")
        return self._probe(net, affordable[-1], then_tune=False)

    def _tune_side(self, net, budget: float, min_epochs: float, floor: int) -> tuple[int | None, bool]:
        """(the largest side >= `floor` where fine-tuning `net` needs at most `budget` seconds, whether the
        last probe cached its activations there). Cached activations cost no pass, and one epoch is enough
        to start on them (large sets: three epochs fit at no size, but their probe's activations are
        there); otherwise a pass and `min_epochs` epochs. Where the features are weak, cached activations
        need `min_epochs` too: one epoch at 224 px is what the weak rule moves away from."""
        if net.train_rate is None:
            return None, False
        planner, n_fit = self.ctx.planner, len(self.fit_idx)
        weak = self.weak_features()
        for side in reversed(self._sides(net)):
            if side < floor:
                break
            cached = self._cached(net, side)
            needed = planner.tune_step_seconds(self._n_all(all_fit=True), n_fit, self._size(side), net.rate,
                                               net.train_rate, cached=cached,
                                               min_epochs=1.0 if cached and not weak else min_epochs,
                                               extra=self._reread_cost(side),
                                               n_predicted=len(self.val_idx) + self.ctx.data.n_test_read,
                                               flips=self.ctx.config.flip_tta and self.ctx.data.profile.flip_ok)
            if needed <= budget:
                return side, cached
        return None, False

    def weak_features(self) -> bool:
        """Whether the steps' frozen probes carry little on this data (their best validation NAUC below
        WEAK_FEATURES_NAUC): knee X-rays, pedestrians' attributes, 28-px fundus and ultrasound images score
        0.41-0.53, blood cells 0.71-0.87, photos and textures 0.90-0.99. Unknown until a step's probe has a
        validation score, unless the first probe's is below FIRST_PROBE_WEAK_NAUC and no better than the
        thumbnails' (never without a validation split)."""
        return bool(np.isfinite(self.frozen_score) and self.frozen_score < WEAK_FEATURES_NAUC)

    def _cached(self, net, side: int) -> bool:
        """Whether the step just finished is a probe of `net` at `side` (its activations are in the caches)."""
        last = self.current
        return isinstance(last, ProbeStep) and last.net is net and last.size == self._size(side) \
            and last.head is not None

    def _sides(self, net=None, training: bool = True) -> list[int]:
        """The sides a step of `net` may use: within the data's reach (step_sides) and the memory cap (its
        caches and a training step's working set, `net`'s own; with no `net`, the step backbone that needs
        most; `training` False for a frozen probe that no tuning follows: its caches only; and the images'
        larger copy where the side needs them read again, `reread_gb`; or, where more, the reading's own
        peak before the caches fill, `reading_peak_gb`); the smallest when none fits the cap.
        Each backbone's own bytes: 1.0.4 charged EfficientNet-Lite2's saved tensors (499 bytes a pixel) to
        MobileNetV2's steps (279) and to frozen probes, which train nothing."""
        sides = step_sides(self.ctx.data.step_storage_hw(), self.ctx.config.max_step_side)
        memory = self.ctx.memory
        if memory is None:
            return sides
        freed = self.ctx.caches.nbytes() / 1e9  # a new step's caches replace the present ones
        fitting = [s for s in sides if memory.fits(
            max(self.cache_gb(s, net) + (self.training_gb(s, net) if training else 0.0) + self.reread_gb(s),
                self.reading_peak_gb(s)),
            freed_gb=freed)]
        dropped = tuple(s for s in sides if s not in fitting)
        key = (getattr(net, "name", None), training)
        if dropped != self._memory_dropped.get(key, ()):
            self._memory_dropped[key] = dropped
            if dropped:
                log.info("steps: sides %s left out for %s %s: %s would pass the memory cap (%s)",
                         ", ".join(map(str, dropped)), "tuning" if training else "a frozen probe of",
                         key[0] or "the step backbones",
                         ("their caches and training" if training else "their caches")
                         + (", with the images read again at the large size" if self.reread_gb(sides[-1]) else ""),
                         self.ctx.memory.line())
        return fitting or sides[:1]

    def _step_nets(self, net=None) -> list:
        """The backbones a memory count is for: `net`, or every step backbone (the largest then counts)."""
        return [net] if net is not None else list(self.nets.values())

    def cache_gb(self, side: int, net=None) -> float:
        """What a step's caches at `side` take in the end (GB): the trunk activations of every training and
        test example and, with flip TTA, of the flipped validation and test images, for `net` (with no
        `net`, the step backbone whose activations are largest)."""
        data, size = self.ctx.data, self._size(side)
        per_example = max((n.activation_bytes(size) for n in self._step_nets(net)), default=0)
        n = data.n_read + data.n_test_read
        if self.ctx.config.flip_tta and data.profile.flip_ok:
            n += len(self.val_idx if self.val_idx is not None else ()) + data.n_test_read
        return n * per_example / 1e9

    def training_gb(self, side: int, net=None) -> float:
        """What a fine-tuning step of `net` at `side` holds beside its caches while it trains (GB): the
        backward pass's saved tensors for one batch, as the warm-up measured them (with no `net`, for the
        step backbone that needs most). Training time only, but a probe's side is the side its tuning may
        keep."""
        size, batch = self._size(side), self.ctx.config.batch_size
        return max((n.training_bytes(size, batch) for n in self._step_nets(net)), default=0) / 1e9

    def reread_gb(self, side: int) -> float:
        """What the stored images grow by when a step at `side` needs them read again at the large size (GB):
        the training and test images at the large storage shape, less the stored ones they replace. Not
        counted before 1.0.6: blood cells at T = 1200 s (9,957 training images) were read again at 180 x 240
        px (1.6 GB where 0.45 GB had been) for a 256 x 344-px tuning sized without them, and the process
        peaked at 5.4 GB above its base against a 4-GB cap."""
        data = self.ctx.data
        if not data.reread_needed(self._size(side)):
            return 0.0
        n = data.n_read + data.n_test_read
        return max(0.0, self._images_gb(data.large_storage_hw, n) - self._images_gb(data.profile.storage_hw, n))

    def reading_peak_gb(self, side: int) -> float:
        """What reading the images again for a step at `side` holds at its peak (GB), before any cache fills:
        the larger copy in full, since the stored one is let go only once every image is read again, and
        a chunk being read and joined (twice REREAD_CHUNK images). Blood cells' reading at 182 x 242 px
        grew the process by 1.74 GB at its peak and by 1.41 GB once done, where `reread_gb` counts 1.18."""
        data = self.ctx.data
        if not data.reread_needed(self._size(side)):
            return 0.0
        n = data.n_read + data.n_test_read
        return self._images_gb(data.large_storage_hw, n + 2 * min(n, REREAD_CHUNK))

    def _images_gb(self, hw, n: int) -> float:
        """What `n` stored uint8 images take at shape `hw` (GB)."""
        return n * max(1, self.ctx.data.profile.channels) * hw[0] * hw[1] / 1e9

    def _size(self, side: int) -> tuple[int, int]:
        return working_size(self.ctx.data.step_storage_hw(), side)

    def _reread_cost(self, side: int) -> float:
        """Seconds of reading the data again at the large size, when a step at `side` needs that first."""
        data = self.ctx.data
        if not data.reread_needed(self._size(side)):
            return 0.0
        return self.ctx.planner.reread_seconds(data.n_read + data.n_test_read, data.profile.storage_hw,
                                               data.large_storage_hw)

    def _n_all(self, all_fit: bool = False) -> int:
        """The images a probe step passes: validation, test, and the training examples its head sees (every
        training example: what a fine-tuning step caches in the end)."""
        n_fit = len(self.fit_idx) if all_fit else min(len(self.fit_idx), probe_step_examples(self.ctx.config))
        return n_fit + len(self.val_idx) + self.ctx.data.n_test_read

    def _probe(self, net, side: int, then_tune: bool, tune_to_end: bool = False) -> ProbeStep:
        size = self._size(side)
        self.probed[net.name] = max(self.probed.get(net.name, 0), side)
        self.history.append(f"probe {net.name}@{size[0]}x{size[1]}")
        return ProbeStep(self.ctx, net, size, self.fit_idx, self.val_idx, then_tune, tune_to_end=tune_to_end,
                         sized_for_weak=self.weak_features())

    def _tune(self, probe_step: ProbeStep, deadline: float, last_step: bool = False) -> FinetuneStage:
        """Fine-tuning from a finished probe step (its head, its cached activations)."""
        ctx = self.ctx
        name = probe_step.net.name
        self.tuned.add(name)
        remaining = [n for n in ctx.config.step_backbone_names() if n in self.nets and n not in self.tuned]
        until = ctx.planner.tune_step_until(deadline, last=last_step or not remaining)
        start = StepStart(probe_step.head, probe_step.size, probe_step.group, until, probe_step.val_score())
        self.tune = FinetuneStage(ctx, self.thumbnails, self.probe, start=start, net=probe_step.net)
        self.tunes[name] = self.tune
        self.history.append(f"tune {probe_step.group} for {until - time.monotonic():.0f}s")
        log.info("step: fine-tuning %s for up to %.0fs (process memory %.2f GB)", probe_step.group,
                 until - time.monotonic(), process_memory_gb())
        return self.tune

    # ------------------------------------------------------------------ what callers read
    @property
    def size(self):
        return self.tune.size if self.tune is not None else None
