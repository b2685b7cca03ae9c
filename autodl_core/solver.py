"""The any-time solver behind model.py: stages timed for ALC, budgets held, never a crash.

Stages (each `train` call advances one step, each `test` call predicts with the best
candidate so far):
  0. thumbnails: a linear head on raw pixel thumbnails of a first chunk of data, so the
     first prediction lands within seconds;
  1. probe: frozen pretrained features and a linear head, refitted as more data is read
     (test features are computed once, so each refit's prediction is nearly free);
  2. finetune: LP-FT of the backbone in growing time slices, EMA weights, validation on a
     held-out split; a checkpoint is predicted only when it improves the validation score of
     the ensemble (the best-k average of the last checkpoints, the probe and the thumbnails);
     flip TTA is switched on when validation says it helps; when validation stops improving
     and time is left, the resolution grows and fine-tuning goes on from the best weights.
"""
from __future__ import annotations

import copy
import logging
import os
import time

import numpy as np
import torch
import torch.nn as nn

from autodl_core.config import PipelineConfig
from autodl_core.device_plan import plan_for
from autodl_core.ensemble import Candidate, CandidatePool, paired_gain_se
from autodl_core.heads import LinearHead, thumbnails
from autodl_core.images import Preprocessor, working_size
from autodl_core.learner import Classifier, FineTuner, RateMeter, inference_autocast
from autodl_core.metrics import nauc
from autodl_core.profile import DataProfile, choose_storage_shape
from autodl_core import readers
from autodl_core.trunk import ActivationCache, split_backbone, top_features

log = logging.getLogger("autodl_core.solver")


SAFETY_SECONDS = 3.0  # kept free at the end of the budget: the kit kills ingestion at T
FIRST_CHUNK_MAX = 4000  # examples read at most before the first (thumbnail) prediction
PEEK_SECONDS = 1.0  # the first look at raw examples (sizes, channels, value range) stops after this
MIN_STEP_SECONDS = 0.5  # a train call with less time than this left does no work (it could only overrun)


def min_gain(best_score: float, cost_share: float) -> float:
    """Validation NAUC gain a checkpoint needs before it is worth predicting.

    0.001, or a quarter of the error left when validation is nearly saturated (a fixed 0.001 forbids
    every gain once validation passes 0.999, common on small digit and face sets);
    plus a share of the prediction's cost (time spent predicting large test sets needs a clearer gain).
    """
    room = 1.0 - best_score if np.isfinite(best_score) else 1.0
    return min(0.001, 0.25 * max(room, 0.0)) + 0.02 * cost_share


class Solver:
    def __init__(self, metadata, config: PipelineConfig | None = None, device: str | None = None):
        self.config = config or PipelineConfig()
        self.metadata = metadata
        self.n_classes = int(metadata.get_output_size())
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.plan = plan_for(self.device)
        torch.set_num_threads(max(1, os.cpu_count() or 1))
        self.warmup_rates: list[tuple[int, float]] = []  # (resolution, images/s) measured in __init__
        self.done_training = False
        self.stage = "thumbnails"
        self.calls = 0
        self.test_calls = 0
        self._returned_at, self._kit_seconds = None, 0.0  # the kit's own time between our calls (the most seen)
        self._test_reader, self._test_parts = None, []  # the test set, read over several calls if need be
        self.profile: DataProfile | None = None
        self.train_reader = None
        self.train_x = self.train_y = None
        self.test_x = None
        self.images_device = {}  # "train"/"test": the uint8 arrays mirrored on the GPU (plan.images_on_device)
        self.warm_step_seconds = None  # a full fine-tuning step measured in the warm-up (GPU)
        self.n_test = None  # known once the test set is read (or counted after a failure)
        self.is_val = None
        self.train_features = None  # probe features of every read example (in read order)
        self.test_features = None
        self.probe_head: LinearHead | None = None
        self.tuner: FineTuner | None = None
        self.candidates = CandidatePool(self._score, max_checkpoints=self.config.ensemble_checkpoints)
        self.pending: np.ndarray | None = None  # predictions the next test call returns
        self.last_good: np.ndarray | None = None
        self.slice_seconds = self.config.first_slice_seconds
        self._read_seconds, self._read_examples = 0.0, 0  # training data read so far, and the time it took
        self.best_val_score = -np.inf
        self._growths = 0  # resolution growths so far (progressive resizing)
        self._growth_refused_at = None  # working size at which a growth was refused for lack of time
        self._build_backbone()

    # ------------------------------------------------------------------ setup (unscored)
    def _build_backbone(self):
        from pretrained import create_backbone, get_spec

        spec = get_spec(self.config.backbone)
        self.backbone = create_backbone(self.config.backbone, pretrained=True, num_classes=0)
        self.backbone.to(self.device).eval()
        self.backbone = self.backbone.to(memory_format=torch.channels_last)
        self.n_features = int(self.backbone.num_features)
        self.mean, self.std = spec.mean, spec.std
        self.strategy = self.config.strategy
        if self.strategy == "auto":
            self.strategy = "finetune" if self.device.type == "cuda" else "finetune_top"
        if self.strategy == "finetune":
            # Full fine-tuning needs no trunk-activation cache: the probe caches pooled features.
            self.trunk, self.top = self.backbone, nn.Identity()
        else:
            self.trunk, self.top = split_backbone(self.backbone, self.config.trunk_blocks)
        self.train_cache = self.test_cache = None
        self.cpu_bf16 = False
        if self.device.type == "cuda":
            self._warm_up_gpu()
        else:
            self._warm_up_cpu()
        log.info("backbone %s ready on %s; warm-up throughput %s", self.config.backbone, self.device,
                 self.warmup_rates)

    def _warm_up_cpu(self):
        """First calls of oneDNN kernels are slow; also measure throughput (and choose bf16)."""
        rows, cols = self.metadata.get_matrix_size(0)
        guess = 64 if rows <= 0 or cols <= 0 else min(self.config.max_resolution, max(32, min(rows, cols)))
        self.cpu_bf16, rate_64 = self._choose_cpu_bf16()
        for res in sorted({guess, 64}):
            if res == 64 and rate_64 is not None:  # measured in the precision just chosen
                rate = rate_64
            else:
                x = torch.randn(64, 3, res, res, device=self.device).contiguous(memory_format=torch.channels_last)
                rate = self._forward_rate(x)
            self.warmup_rates.append((res, rate))
        self.rate = RateMeter(rate * res * res)

    def _expected_storage_hw(self) -> tuple[int, int]:
        """The storage shape the data will most likely get (metadata only: no example seen yet)."""
        rows, cols = (int(v) for v in self.metadata.get_matrix_size(0))
        if rows <= 0 or cols <= 0:
            return (self.config.max_resolution, self.config.max_resolution)
        scale = min(1.0, self.config.max_resolution / max(rows, cols))
        return max(8, int(round(rows * scale))), max(8, int(round(cols * scale)))

    def _warm_up_gpu(self):
        """Run, before the clock starts, every kernel the run will use at the shapes it will use them:
        cuDNN (benchmark mode) tunes its algorithms per shape on first use, which took seconds per
        call when it happened inside the timed run. Then measure, synchronised, the steady-state
        feature rate and the seconds of a full fine-tuning step (a throwaway copy of the network)."""
        # Benchmark mode only where every shape is warmed up here and batches are padded to one shape
        # (full fine-tuning); the top mode's varied shapes would each be tuned inside the timed run.
        torch.backends.cudnn.benchmark = self.strategy == "finetune"
        storage = self._expected_storage_hw()
        size = working_size(storage, self.plan.probe_resolution(min(storage)))
        batch = self.plan.feature_batch
        x = torch.randn(batch, 3, *size, device=self.device).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), inference_autocast(self.device):
            for _ in range(3):
                self.backbone(x)
            torch.cuda.synchronize(self.device)
            started = time.monotonic()
            for _ in range(3):
                self.backbone(x)
            torch.cuda.synchronize(self.device)
        rate = 3 * batch / max(1e-6, time.monotonic() - started)
        self.warmup_rates.append((min(size), rate))
        self.rate = RateMeter(rate * size[0] * size[1])
        if self.strategy == "finetune":
            n_train = max(1, int(self.metadata.size()))
            train_batch = self.plan.train_batch(int(0.9 * n_train), self.config.batch_size, self.config.gpu_batch_size)
            model = Classifier(copy.deepcopy(self.backbone), self.n_features, max(2, self.n_classes))
            preprocess = Preprocessor(self.mean, self.std, device=self.device)
            tuner = FineTuner(model, preprocess, False, batch_size=train_batch, freeze_bn=True, random_crops=True,
                              freeze_fraction=self.config.freeze_fraction)
            channels = int(self.metadata.get_num_channels(0)) if hasattr(self.metadata, "get_num_channels") else 3
            images = torch.randint(0, 256, (train_batch, *storage, max(1, channels)), dtype=torch.uint8,
                                   device=self.device)
            labels = np.eye(max(2, self.n_classes), dtype=np.float32)[np.arange(train_batch) % max(2, self.n_classes)]
            tuner.train_until(tuner.image_batches(images, size), labels, np.arange(train_batch),
                              deadline=time.monotonic() + 120, max_steps=12)
            tuner.predict(images, size, batch_size=self.plan.predict_batch)
            self.warm_step_seconds = tuner.seconds_per_step
            log.info("warm-up: full fine-tuning step at %s, batch %d: %.4fs", size, train_batch,
                     self.warm_step_seconds or float("nan"))
            del tuner, model, images
            torch.cuda.empty_cache()

    def _forward_rate(self, x: torch.Tensor, cpu_bf16: bool | None = None) -> float:
        """Images/s of one frozen forward pass over `x` (after a short untimed one: first calls are slow)."""
        bf16 = self.cpu_bf16 if cpu_bf16 is None else cpu_bf16
        with torch.inference_mode(), inference_autocast(self.device, bf16):
            self.backbone(x[:8])
            started = time.monotonic()
            self.backbone(x)
            return len(x) / max(1e-6, time.monotonic() - started)

    def _choose_cpu_bf16(self) -> tuple[bool, float | None]:
        """(bf16 for frozen forward passes, the 64 px rate in the chosen precision if measured here).

        On a CPU bf16 is used when measured clearly faster (CPUs without bf16 units emulate it, slower);
        AUTODL_CPU_BF16=0/1 forces the choice."""
        if self.device.type != "cpu":
            return False, None
        forced = os.environ.get("AUTODL_CPU_BF16")
        if forced in ("0", "1"):
            return forced == "1", None
        x = torch.randn(64, 3, 64, 64).contiguous(memory_format=torch.channels_last)
        fp32 = self._forward_rate(x, False)
        try:
            bf16 = self._forward_rate(x, True)
        except Exception:  # no bf16 kernels on this build/CPU
            return False, fp32
        log.info("frozen forward at 64 px: fp32 %.0f img/s, bf16 %.0f img/s", fp32, bf16)
        return (True, bf16) if bf16 > 1.2 * fp32 else (False, fp32)

    def _feature_rate(self, size) -> float:
        """Images/s of feature extraction at `size`, scaled from the warm-up measurements by pixel count."""
        return self.rate.images_per_s(size)

    # ------------------------------------------------------------------ kit API
    def _call_deadline(self, started: float, remaining_time_budget: float) -> float:
        """When this call must return: the budget left, less the safety margin and the time the kit
        itself took between our last return and this call (writing a prediction file: 2.3 s for
        1,200 x 1,200 values on a slow CPU), which it will take again after our last prediction."""
        if self._returned_at is not None:
            self._kit_seconds = max(self._kit_seconds, started - self._returned_at)
        return started + float(remaining_time_budget) - SAFETY_SECONDS - self._kit_seconds

    def train(self, dataset, remaining_time_budget: float) -> None:
        started = time.monotonic()
        deadline = self._call_deadline(started, remaining_time_budget)
        self.calls += 1
        self._deadline = deadline
        if self.calls == 1:
            self._clock_start = started
        try:
            if deadline - time.monotonic() < MIN_STEP_SECONDS:
                # Not even a first look at the data: a budget below the safety margin (T = 2 s) or the end
                # of the run. test() still returns predictions of the right shape.
                log.info("train call %d: %.1fs left, too little for a step", self.calls, deadline - time.monotonic())
                self.done_training = True
            else:
                if self.train_reader is None:
                    self._open_train(dataset)
                self._step(deadline)
        except Exception:  # degrade, never crash: keep the last good predictions
            log.exception("train step failed in stage %s; keeping the last good predictions", self.stage)
            self._fallback_after_error()
        finally:
            log.info("train call %d (%s) took %.1fs; remaining %.1fs", self.calls, self.stage,
                     time.monotonic() - started, deadline - time.monotonic())
            self._returned_at = time.monotonic()

    def test(self, dataset, remaining_time_budget: float):
        started = time.monotonic()
        deadline = self._call_deadline(started, remaining_time_budget)
        self.test_calls += 1
        try:
            if self.test_x is None and deadline <= started and readers.declared_test_count(self.metadata) is not None:
                # Begun past its deadline with no test example read: the prior, of the declared size, at once.
                self.n_test = readers.declared_test_count(self.metadata)
            elif self.test_x is None:
                self._read_test(dataset, deadline)
            if self.test_x is not None and self.pending is None and deadline - time.monotonic() > 0.5:
                self._deadline = deadline
                self.pending = self._predict_pending(deadline)
            if self.pending is not None:
                self.last_good = self._sanitize(self.pending)
        except Exception:
            log.exception("test failed in stage %s; returning the last good predictions", self.stage)
            if self.test_x is None and self.n_test is None:
                self.n_test = self._count_test(dataset)
        self.pending = None
        result = self.last_good if self.last_good is not None else self._prior_predictions()
        if deadline - time.monotonic() < 1.0:
            self.done_training = True
        log.info("test call %d took %.1fs; remaining %.1fs", self.test_calls, time.monotonic() - started,
                 deadline - time.monotonic())
        self._returned_at = time.monotonic()
        return result

    def stats(self) -> dict:
        """What this run measured, for reports: device, strategy, sizes, step counts and rates."""
        tuner = self.tuner
        per_step = tuner.seconds_per_step if tuner is not None else None
        return {
            "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            "pipeline_id": self.config.pipeline_id(), "pipeline": self.config.to_dict(),
            "strategy": self.strategy, "stage": self.stage,
            "probe_size": list(getattr(self, "probe_size", ()) or ()),
            "finetune_size": list(getattr(self, "ft_size", ()) or ()),
            "feature_images_per_s": round(self._feature_rate(getattr(self, "probe_size", (64, 64))), 1),
            "warmup_rates": [(int(r), round(v, 1)) for r, v in self.warmup_rates],
            "train_batch": tuner.batch_size if tuner is not None else None,
            "train_steps": tuner.steps if tuner is not None else 0,
            "train_seconds_per_step": round(per_step, 5) if per_step else None,
            "train_images_per_s": round(tuner.batch_size / per_step, 1) if per_step else None,
            "flip_tta": getattr(self, "flip_tta", None),
            "n_train_read": 0 if self.train_x is None else len(self.train_x),
        }

    # ------------------------------------------------------------------ data
    def _open_train(self, dataset, read_train: bool = True):
        peek = readers.peek(dataset, deadline=time.monotonic() + PEEK_SECONDS)
        self.profile = DataProfile.from_metadata_and_peek(self.metadata, peek)
        self.profile.storage_hw = choose_storage_shape(self.profile, self.config.max_resolution,
                                                       self.config.memory_cap_gb)
        self.value_offset, self.value_scale = readers.value_transform(peek.value_min, peek.value_max)
        self.preprocess = Preprocessor(self.mean, self.std, pixel_max=255.0, device=self.device)
        if read_train:
            self.train_reader = readers.ChunkReader(dataset, self.profile.storage_hw, self.value_offset,
                                                     self.value_scale, batch_size=self._read_batch())
        log.info("profile: %s", self.profile)

    def _read_batch(self) -> int:
        """Examples per read batch: 64 for images up to 256 x 256, fewer for larger ones, so that a batch
        (decoded before the deadline is checked again) stays short: 64 photos of 2,000 px take ~3.5 s
        to decode on a slow CPU, one takes ~55 ms."""
        h, w = self.profile.median_hw
        return int(np.clip(64 * (256 * 256) / max(1, h * w), 1, 64))

    def _read_more_train(self, deadline: float, max_examples: int | None = None) -> int:
        if self.train_reader.exhausted:
            return 0
        cap = self.profile.max_cached_examples
        have = 0 if self.train_x is None else len(self.train_x)
        if have >= cap:
            return 0
        limit = cap - have if max_examples is None else min(max_examples, cap - have)
        started = time.monotonic()
        chunk = self.train_reader.read(max_examples=limit, deadline=deadline)
        if chunk is None:
            return 0
        x, y = chunk
        self._read_seconds += time.monotonic() - started
        self._read_examples += len(x)
        if self.train_x is None:
            self.train_x, self.train_y = x, y
        else:
            self.train_x = np.concatenate([self.train_x, x])
            self.train_y = np.concatenate([self.train_y, y])
        if self.plan.images_on_device:
            self._mirror_on_device("train", x)
        self.is_val = self._val_mask(len(self.train_x))
        self.profile.update_labels(self.train_y)
        self.profile.pixel_max = max(self.profile.pixel_max, float(x.max()) if len(x) else 0.0)
        return len(x)

    def _mirror_on_device(self, name: str, new: np.ndarray):
        """Append newly read uint8 examples to the device copy (the GPU then never waits on host copies)."""
        chunk = torch.from_numpy(np.ascontiguousarray(new)).to(self.device)
        have = self.images_device.get(name)
        self.images_device[name] = chunk if have is None else torch.cat([have, chunk])

    def _images(self, name: str):
        """The uint8 arrays the networks read: the device copy where there is one, else numpy."""
        if name in self.images_device:
            return self.images_device[name]
        return self.train_x if name == "train" else self.test_x

    def _val_mask(self, n: int) -> np.ndarray:
        """Held-out examples chosen by a fixed hash of the read position: stable as more data arrives."""
        cfg = self.config
        positions = np.arange(n)
        chosen = (positions * 2654435761 % 1000) < cfg.val_fraction * 1000
        if n < 100:
            chosen[:] = False
        chosen &= np.cumsum(chosen) <= cfg.val_max
        return chosen

    def _read_test(self, dataset, deadline: float):
        """Read the test set; when the deadline comes first (a short budget, large images, a busy CPU),
        stop and go on at the next call: this call then returns prior predictions, whose row count the
        metadata declares. Without a declared count the read goes on (the rows must be right)."""
        if self.profile is None:  # test before train: cannot happen with the kit, but be safe
            self._open_train(dataset, read_train=False)
        if self._test_reader is None:
            self._test_reader = readers.ChunkReader(dataset, self.profile.storage_hw, self.value_offset,
                                                    self.value_scale, batch_size=self._read_batch())
        declared = readers.declared_test_count(self.metadata)
        can_stop = declared is not None
        reader, parts = self._test_reader, self._test_parts
        while not reader.exhausted and not (can_stop and sum(len(p) for p in parts) >= declared):
            chunk = reader.read(max_examples=4096, deadline=deadline if can_stop else None)
            if chunk is None:
                break
            parts.append(chunk[0])
            complete = reader.exhausted or (can_stop and sum(len(p) for p in parts) >= declared)
            if can_stop and time.monotonic() >= deadline and not complete:
                self.n_test = declared
                log.info("test set: %d examples read when the deadline came; reading goes on next call",
                         sum(len(p) for p in parts))
                return
        xs = parts
        self._test_reader, self._test_parts = None, []
        self.test_x = np.concatenate(xs) if xs else np.zeros((0,) + tuple(self.profile.storage_hw) + (1,), np.uint8)
        if self.plan.images_on_device:
            self._mirror_on_device("test", self.test_x)
        log.info("read %d test examples", len(self.test_x))

    # ------------------------------------------------------------------ stages
    def _step(self, deadline: float):
        if self.stage == "thumbnails":
            self._stage_thumbnails(deadline)
        elif self.stage == "probe":
            self._stage_probe(deadline)
        elif self.stage == "finetune":
            self._stage_finetune(deadline)
        else:
            self.done_training = True

    def _stage_thumbnails(self, deadline: float):
        cfg = self.config
        started = time.monotonic()
        self._read_more_train(min(deadline, started + cfg.first_chunk_seconds), max_examples=FIRST_CHUNK_MAX)
        # Data sorted by class: a first chunk that saw only some classes predicts the others at chance
        # (sign_language_digits: 2 of 10 classes in its first 300 examples, test NAUC 0.77 instead of
        # 0.95). Read on, up to 3x the time (at least 1 s), until every class has appeared.
        cap = min(deadline, started + max(3 * cfg.first_chunk_seconds, 1.0))
        while not self._all_classes_seen() and len(self.train_x) < FIRST_CHUNK_MAX and time.monotonic() < cap:
            if self._read_more_train(min(cap, time.monotonic() + 0.1), max_examples=FIRST_CHUNK_MAX - len(self.train_x)) == 0:
                break
        self._fit_thumbnail_head()
        self.stage = "probe"

    def _all_classes_seen(self) -> bool:
        """Single-label: every class has an example (the label prior kept by the profile as data is read).
        Multi-label data is not asked (rare labels may never show)."""
        if self.train_x is None or self.profile.multilabel or self.profile.class_prior is None:
            return True
        return bool((self.profile.class_prior > 0).all())

    def _fit_thumbnail_head(self):
        """Raw-pixel head: instant, and on simple data (digits) already strong; refitted as data grows."""
        n = min(len(self.train_x), 20000)
        fit = ~self.is_val[:n]
        if fit.sum() < 2:
            fit[:] = True
        self._thumb_n = n
        self.thumb_head = LinearHead(self.profile.multilabel, l2=1e-2).fit(
            thumbnails(self.train_x[:n][fit]), self.train_y[:n][fit], max_iter=60,
            deadline=min(time.monotonic() + 2.0, self._deadline - 1.0))
        self._pending_fn = self._predict_thumbnails
        self.pending = None

    def _predict_thumbnails(self, deadline: float):
        self._register_thumbnails()
        return self._best_combination()

    def _register_thumbnails(self):
        if getattr(self, "_test_thumbnails", None) is None:
            self._test_thumbnails = thumbnails(self.test_x)  # the test set never changes
        test_probs = self.thumb_head.predict_proba(self._test_thumbnails)
        val = np.flatnonzero(self.is_val)
        val_probs = self.thumb_head.predict_proba(thumbnails(self.train_x[val])) if len(val) else None
        self._add_candidate(Candidate("thumbnails", test_probs, val_probs))

    def _probe_size(self):
        if self.config.probe_resolution > 0:
            return working_size(self.profile.storage_hw, self.config.probe_resolution)
        return working_size(self.profile.storage_hw, self.plan.probe_resolution(min(self.profile.storage_hw)))

    def _probe_max_examples(self) -> int:
        return self.config.gpu_probe_max_examples if self.device.type == "cuda" else self.config.probe_max_examples

    def _feature_device(self):
        """Where probe features live: on the GPU they stay there (its head is fitted there too)."""
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def _stage_probe(self, deadline: float):
        cfg = self.config
        size = self._probe_size()
        rate = self._feature_rate(size)
        elapsed_total = self._elapsed()
        # Slice: long enough to matter, short enough to give a prediction soon (log-time spacing).
        slice_s = max(3.0, 0.3 * elapsed_total)
        slice_deadline = min(deadline - self._test_feature_cost(size), time.monotonic() + slice_s)
        have_features = 0 if self.train_features is None else len(self.train_features)
        have = 0 if self.train_x is None else len(self.train_x)
        # Read more data, but no more than features can be computed for in the slice: examples already
        # read cost their features, unread ones their reading too (decoding can be the slower part: with
        # fast features, reading for the whole slice put the probe's first prediction off by seconds).
        budget = 0.7 * slice_s
        from_read = min(have - have_features, int(rate * budget))
        budget -= from_read / rate
        read_rate = self._read_examples / self._read_seconds if self._read_seconds > 0.05 else np.inf
        unread = int(budget / (1.0 / rate + 1.0 / read_rate))
        n_feature_target = min(self._probe_max_examples(), have_features + from_read + unread)
        if have < n_feature_target:
            self._read_more_train(slice_deadline, max_examples=n_feature_target - have)
        n_target = min(len(self.train_x), self._probe_max_examples())
        n_target = min(n_target, have_features + max(64, int(rate * max(1.0, slice_deadline - time.monotonic()))))
        if n_target > have_features:
            self._ensure_caches(size)
            started = time.monotonic()
            done = self.train_cache.ensure(self._images("train"), np.arange(have_features, n_target),
                                           deadline=min(self._deadline - 2.0, max(slice_deadline, time.monotonic() + 1.0)))
            ready = self.train_cache.has[have_features:n_target]
            done = int(np.argmin(ready)) if not ready.all() else len(ready)  # cached prefix length
            new = None
            if done:
                new = top_features(self.top, self.train_cache, np.arange(have_features, have_features + done),
                                   self.device, out_device=self._feature_device(), deadline=self._deadline - 1.0)
            if new is not None:
                self.rate.update(done * size[0] * size[1], time.monotonic() - started)
                self.train_features = new if self.train_features is None else torch.cat([self.train_features, new])
        if self.train_features is None:
            return
        n_feat = len(self.train_features)
        fit_mask = ~self.is_val[:n_feat]
        y = self.train_y[:n_feat]
        if fit_mask.sum() < 2:
            fit_mask[:] = True
        self.probe_head = LinearHead(self.profile.multilabel, l2=self._probe_l2(fit_mask.sum())).fit(
            self.train_features[torch.from_numpy(fit_mask).to(self.train_features.device)], y[fit_mask], max_iter=100,
            deadline=min(time.monotonic() + 5.0, self._deadline - 1.0 - self._test_feature_cost(size)))
        self.probe_size = size
        self._thumbs_stale = len(self.train_x) > 1.5 * self._thumb_examples()
        if self._thumbs_stale:
            self._fit_thumbnail_head()
        self.pending = None
        self._pending_fn = self._predict_probe
        reading_done = self.train_reader.exhausted or len(self.train_x) >= self.profile.max_cached_examples
        if n_feat >= min(self._probe_max_examples(), len(self.train_x)) and (
                reading_done or n_feat >= self._probe_max_examples()):
            self.stage = "finetune" if self.strategy in ("finetune", "finetune_top") else "done"
            if self.stage == "done":
                self.done_training = True

    def _thumb_examples(self) -> int:
        head = getattr(self, "thumb_head", None)
        return 0 if head is None or head.mean is None else getattr(self, "_thumb_n", 0)

    def _probe_l2(self, n: int) -> float:
        return float(np.clip(2.0 / max(1, n), 1e-4, 1e-2))

    def _test_feature_cost(self, size) -> float:
        if self.test_features is not None:
            return 0.5
        n_test = len(self.test_x) if self.test_x is not None else 0
        return n_test / max(1.0, self._feature_rate(size))

    def _probe_val_probs(self):
        """Probe predictions on every validation example read so far (features computed as needed)."""
        val = np.flatnonzero(self.is_val)
        if len(val) == 0:
            return None
        self.train_cache.ensure(self._images("train"), val)
        feats = top_features(self.top, self.train_cache, val, self.device, out_device=self._feature_device())
        return self.probe_head.predict_proba(feats)

    def _ensure_caches(self, size):
        if self.train_cache is None or self.train_cache.size != tuple(size):
            self.train_cache, self.test_cache = (self._new_cache(size) for _ in range(2))
            self.train_features = None
            self.test_features = None

    def _new_cache(self, size, flip: bool = False) -> ActivationCache:
        return ActivationCache(self.trunk, self.preprocess, size, batch_size=self.plan.feature_batch, flip=flip,
                               cpu_bf16=self.cpu_bf16, store_device=self._feature_device())

    def _predict_probe(self, deadline: float):
        size = self.probe_size
        if self.test_features is None:
            self._ensure_caches(size)
            n_test = len(self.test_x)
            started = time.monotonic()
            done = self.test_cache.ensure(self._images("test"), np.arange(n_test), deadline=deadline)
            if n_test and not self.test_cache.has.all():
                log.info("test activations: %d of %d before the deadline", done, n_test)
                return None  # what was computed stays cached for the next call
            features = top_features(self.top, self.test_cache, np.arange(n_test), self.device,
                                    out_device=self._feature_device(), deadline=deadline)
            if features is None:
                log.info("test features: the top over %d cached activations does not fit before the deadline", n_test)
                return None  # the activations stay cached for the next call
            self.test_features = features
            self.rate.update(done * size[0] * size[1], time.monotonic() - started)
        probs = self.probe_head.predict_proba(self.test_features)
        self._add_candidate(Candidate("probe", probs, self._probe_val_probs()))
        if self._thumbs_stale:
            self._thumbs_stale = False
            self._register_thumbnails()
        return self._best_combination()

    def _score(self, y_true, probs) -> float:
        try:
            value = nauc(y_true, probs)
        except ValueError:
            return -np.inf
        return -np.inf if np.isnan(value) else value

    # ------------------------------------------------------------------ fine-tuning
    def _start_finetune(self, deadline: float):
        cfg = self.config
        while not self.train_reader.exhausted and len(self.train_x) < self.profile.max_cached_examples:
            if self._read_more_train(min(deadline, time.monotonic() + 5.0)) == 0:
                break
            if time.monotonic() > deadline - 10:
                return False
        top_mode = self.strategy == "finetune_top"
        body = copy.deepcopy(self.top) if top_mode else self.backbone_copy()
        model = Classifier(body, self.n_features, self.train_y.shape[1])
        if top_mode and cfg.top_dropout > 0:
            model.head = nn.Sequential(nn.Dropout(cfg.top_dropout), model.head)
        if self.probe_head is not None and self.probe_head.multilabel == self.profile.multilabel \
                and self.probe_head.weight.shape[1] == self.train_y.shape[1]:
            weight, bias = self.probe_head.as_linear()
            linear = model.head[-1] if isinstance(model.head, nn.Sequential) else model.head
            with torch.no_grad():
                linear.weight.copy_(weight)
                linear.bias.copy_(bias)
        if top_mode or cfg.finetune_resolution <= 0:
            self.ft_size = self.probe_size  # the LP-FT head was fitted on features at this size
        else:
            self.ft_size = working_size(self.profile.storage_hw, cfg.finetune_resolution)
        self.fit_idx = np.flatnonzero(~self.is_val)
        self.val_idx = np.flatnonzero(self.is_val)
        self._new_tuner(model, cfg.top_lr if top_mode else cfg.lr)
        if top_mode:
            self.train_cache.ensure(self._images("train"), self.val_idx)
        self._rescore_candidates_on_full_val()  # the probe's candidates, on the probe-size caches
        if top_mode and cfg.finetune_resolution > 0:
            self._top_finetune_resolution(deadline)
        self._start_schedule(deadline)
        return True

    def _top_finetune_resolution(self, deadline: float):
        """Top mode with its own fine-tuning resolution: the probe's early predictions at the cheap
        probe size, the fine-tuned top at the larger one (caches rebuilt), when time allows.

        Why: at 96 px instead of 64 the fine-tuned top ends clearly better on photos (final NAUC
        peta 0.58 vs 0.54, cifar10 0.976 vs 0.974), but a 96 px probe predicts seconds later, which
        ALC punishes most. Only once the probe's test predictions are made: the caches holding its
        features are dropped.
        """
        new_size = working_size(self.profile.storage_hw, self.config.finetune_resolution)
        if tuple(new_size) == tuple(self.ft_size):
            return
        if self.test_features is None:
            log.info("fine-tuning stays at %s: the probe's test predictions are not made yet", self.ft_size)
            return
        if self._resize_affordable(new_size, deadline) is None:
            return
        self._pending_fn = None  # the probe's predictor needs the probe-size caches: not any more
        self.ft_size = new_size
        self._rebuild_top_caches(new_size, deadline)

    def _first_share(self, size) -> int:
        """Training examples whose activations are cached at once on a resize (~5 s of feature time)."""
        return min(len(self.fit_idx), int(max(1.0, self._feature_rate(size)) * 5))

    def _resize_affordable(self, new_size, deadline: float) -> float | None:
        """The time left (after a test prediction) when fine-tuning at `new_size` is affordable, else None:
        its new caches (top mode: validation, test and a first share of the training set) must cost at
        most half of that time and leave 30 s of training."""
        rate = max(1.0, self._feature_rate(new_size))
        top_mode = self.strategy == "finetune_top"
        cache_cost = (len(self.val_idx) + len(self.test_x) + self._first_share(new_size)) / rate if top_mode else 0.0
        time_left = deadline - time.monotonic() - self._ft_test_cost()
        if cache_cost > 0.5 * time_left or time_left - cache_cost < 30:
            log.info("resolution %s -> %s: no time (caches %.0fs, %.0fs left)", self.ft_size, new_size,
                     cache_cost, time_left)
            return None
        log.info("resolution %s -> %s (caches ~%.0fs, %.0fs left)", self.ft_size, new_size, cache_cost, time_left)
        return time_left

    def _rebuild_top_caches(self, new_size, deadline: float):
        self._ensure_caches(new_size)  # new train/test caches; the probe's features are not needed any more
        self.train_cache.ensure(self._images("train"), self.val_idx)
        self.test_cache.ensure(self._images("test"), np.arange(len(self.test_x)), deadline=deadline - 30)
        self.train_cache.ensure(self._images("train"), self.fit_idx[:max(self._first_share(new_size), self.config.batch_size)],
                                deadline=deadline - 30)

    def _new_tuner(self, model: Classifier, lr: float):
        """Top mode: the CPU recipe (batch 64, cached activations). Full mode: a batch sized to the
        device with the learning rate scaled to it, random resized crops made on the device, and the
        pretrained BatchNorm statistics kept (frozen BN). Why frozen: with BN in training mode the
        running statistics drift to the augmented batches' within a dozen steps, the features the
        probe's head (LP-FT) was fitted on move, and validation fell from 0.96 to 0.39 NAUC on
        sign_language_digits even as the learning rate was cut to 3% (and from 0.81 to 0.65 on
        cifar10 on a GPU)."""
        cfg = self.config
        top_mode = self.strategy == "finetune_top"
        batch = cfg.batch_size
        if not top_mode:
            batch = self.plan.train_batch(len(self.fit_idx), cfg.batch_size, cfg.gpu_batch_size)
            lr = self.plan.scaled_lr(lr, batch, cfg.batch_size)
        prior = None
        if not top_mode and self.warm_step_seconds:  # measured at the expected size and batch
            prior = self.warm_step_seconds
        self.tuner = FineTuner(model, self.preprocess, self.profile.multilabel, lr=lr,
                               batch_size=batch, weight_decay=cfg.weight_decay,
                               freeze_fraction=0.0 if top_mode else cfg.freeze_fraction, ema_decay=cfg.ema_decay,
                               label_smoothing=cfg.label_smoothing,
                               flip=cfg.augment_flip and self.profile.flip_ok, max_shift=cfg.augment_shift,
                               total_steps_hint=1000, freeze_bn=True, random_crops=not top_mode,
                               step_seconds_prior=prior)
        # Flip TTA is decided per resolution, from validation.
        self.flip_tta = None
        self.val_flip_cache = self.test_flip_cache = None
        self._measured_test_cost = self._measured_val_cost = None

    def _start_schedule(self, deadline: float):
        """Plan the cosine schedule; the starting weights are the first "best" fine-tuned state."""
        self._plan_total_steps(deadline)
        self._stale_slices = 0
        self._ft_best_score, self._ft_best_state = -np.inf, None
        if len(self.val_idx):
            self._track_finetune(self._score(self.train_y[self.val_idx], self._predict_val(None)))

    def backbone_copy(self):
        return copy.deepcopy(self.backbone)

    def _rescore_candidates_on_full_val(self):
        """Earlier candidates saw a prefix of the validation split; extend their val predictions to all of it."""
        if len(self.val_idx) == 0:
            return
        for cand in self.candidates:
            if cand.name == "thumbnails":
                cand.val_probs = self.thumb_head.predict_proba(thumbnails(self.train_x[self.val_idx]))
            elif cand.name == "probe" and self.probe_head is not None:
                cand.val_probs = self._probe_val_probs()
        _, self.best_val_score = self.candidates.select(self._val_labels())

    def _plan_total_steps(self, deadline: float):
        """Cosine schedule length: the steps that fit in the time left, from the steady-state step time
        (a few measured steps; the first, cold ones are not trusted, see autodl_core/schedule.py)."""
        self.tuner.train_until(self._make_batch(), self.train_y, self._fit_pool(),
                               deadline=min(time.monotonic() + 60, deadline - 5.0),
                               max_steps=2 * self.tuner.clock.block_steps + 1)
        per_step = self.tuner.seconds_per_step or 1.0
        left = max(0.0, deadline - time.monotonic())
        self.tuner.total_steps_hint = max(50, int(0.8 * left / per_step))
        self._planned_step_seconds = per_step
        log.info("fine-tuning at %s: %.4fs/step (batch %d), planning %d steps", self.ft_size, per_step,
                 self.tuner.batch_size, self.tuner.total_steps_hint)

    def _replan_if_step_time_moved(self, deadline: float):
        """Re-plan the schedule when the measured steady step time is off the planned one by > 25%:
        the steps left are those that fit in 80% of the time left (as planned at the start)."""
        per_step = self.tuner.seconds_per_step
        planned = getattr(self, "_planned_step_seconds", None)
        if not per_step or not planned or abs(per_step / planned - 1) <= 0.25:
            return
        left = max(0.0, deadline - time.monotonic())
        total = self.tuner.steps + max(1, int(0.8 * left / per_step))
        log.info("step time %.4fs measured (planned %.4fs): re-planning %d -> %d steps", per_step, planned,
                 self.tuner.total_steps_hint, total)
        self.tuner.total_steps_hint = total
        self._planned_step_seconds = per_step

    def _make_batch(self):
        if self.strategy == "finetune_top":
            return lambda idx: self.train_cache.get(idx, self.device)
        return self.tuner.image_batches(self._images("train"), self.ft_size)

    def _fit_pool(self) -> np.ndarray:
        if self.strategy == "finetune_top":
            return self.fit_idx[self.train_cache.has[self.fit_idx]]
        return self.fit_idx

    def _extend_cache(self, seconds: float):
        """Top mode: spend part of a slice computing trunk activations of training examples not cached yet."""
        if self.strategy != "finetune_top" or seconds <= 0:
            return
        missing = self.fit_idx[~self.train_cache.has[self.fit_idx]]
        if len(missing):
            self.train_cache.ensure(self._images("train"), missing, deadline=time.monotonic() + seconds)

    def _flip_cache(self, name: str) -> ActivationCache:
        cache = getattr(self, name)
        if cache is None:
            cache = self._new_cache(self.ft_size, flip=True)
            setattr(self, name, cache)
        return cache

    def _predict_val(self, deadline: float | None, flip: bool = False):
        if self.strategy == "finetune_top":
            cache = self.train_cache
            if flip:
                cache = self._flip_cache("val_flip_cache")
                cache.ensure(self._images("train"), self.val_idx)
            return self.tuner.predict_batches(lambda p: cache.get(self.val_idx[p], self.device),
                                              len(self.val_idx), deadline=deadline)
        images = self._images("train")
        val_idx = torch.from_numpy(self.val_idx).to(images.device) if isinstance(images, torch.Tensor) else self.val_idx
        return self.tuner.predict(images[val_idx], self.ft_size, deadline=deadline, flip=flip,
                                  batch_size=self.plan.predict_batch)

    def _predict_test(self, deadline: float, flip: bool = False):
        if self.strategy == "finetune_top":
            cache = self._flip_cache("test_flip_cache") if flip else self.test_cache
            n_test = len(self.test_x)
            cache.ensure(self._images("test"), np.arange(n_test), deadline=deadline)
            if n_test and not cache.has[:n_test].all():
                return None  # what was computed stays cached for the next call
            return self.tuner.predict_batches(lambda p: cache.get(p, self.device), n_test, deadline=deadline)
        return self.tuner.predict(self._images("test"), self.ft_size, deadline=deadline, flip=flip,
                                  batch_size=self.plan.predict_batch)

    def _val_cost(self) -> float:
        estimate = len(self.val_idx) / max(1.0, self._feature_rate(self.ft_size))
        return max(estimate, self._measured_val_cost or 0.0)

    def _ft_test_cost(self) -> float:
        if self._measured_test_cost is not None:
            return self._measured_test_cost
        n = len(self.test_x) if self.test_x is not None else 0
        share = 0.4 if self.strategy == "finetune_top" else 1.0
        return (2 if self.flip_tta else 1) * share * n / max(1.0, self._feature_rate(self.ft_size)) + 0.5

    def _stage_finetune(self, deadline: float):
        if self.tuner is None:
            if not self._start_finetune(deadline):
                self.done_training = True
                return
        # Keep training slices until a checkpoint is worth predicting or time runs out.
        while True:
            reserve = self._ft_test_cost() * 1.3 + self._val_cost() + 2.0
            time_left = deadline - time.monotonic() - reserve
            if time_left < max(3.0, 2 * (self.tuner.seconds_per_step or 1.0)):
                self.done_training = True
                # Nothing new: test() returns the last good predictions (no extra cost).
                self.pending = self.last_good
                return
            slice_s = min(self.slice_seconds, time_left)
            self._extend_cache(0.3 * slice_s)
            self.tuner.train_until(self._make_batch(), self.train_y, self._fit_pool(),
                                   deadline=time.monotonic() + 0.7 * slice_s)
            self._replan_if_step_time_moved(deadline)
            self.slice_seconds *= self.config.slice_growth
            if len(self.val_idx) == 0:
                # No validation (tiny data): trust the schedule, predict after every slice, and stop
                # after a fixed number of epochs.
                if self.tuner.steps * self.tuner.batch_size >= self.config.max_epochs_without_val * len(self.fit_idx):
                    self.done_training = True
                self._ft_val_probs = None
                break
            val_started = time.monotonic()
            plain = self._predict_val(deadline - self._ft_test_cost())
            if plain is None:
                continue
            score = self._score(self.train_y[self.val_idx], plain)
            log.info("fine-tune step %d at %s: val NAUC %.4f (ensemble so far %.4f)", self.tuner.steps,
                     self.ft_size, score, self.best_val_score)
            self._track_finetune(score)
            val_probs = self._with_flip_tta(plain, deadline)
            self._measured_val_cost = time.monotonic() - val_started
            if self._worth_predicting(val_probs, deadline):
                self._ft_val_probs = val_probs
                break
            if self._converged() and self._grow_resolution(deadline):
                continue
            if self._stale_slices >= self.config.patience_slices:
                log.info("validation has not improved for %d slices: done", self._stale_slices)
                self.done_training = True
                self.pending = self.last_good
                return
        self.pending = None
        self._pending_fn = self._predict_finetune

    def _converged(self) -> bool:
        """Validation has stopped improving at this resolution: after the full patience, or after two
        stale slices once half of the planned schedule is done (early slices are short and noisy)."""
        stale, patience = self._stale_slices, self.config.patience_slices
        half_done = self.tuner.steps >= 0.5 * self.tuner.total_steps_hint
        return stale >= patience or (stale >= min(2, patience) and half_done)

    def _with_flip_tta(self, plain: np.ndarray, deadline: float, recheck: bool = True) -> np.ndarray:
        """Validation predictions of the checkpoint as it would predict the test set (flip TTA or not).

        The first call at a resolution decides: TTA goes on when it raises the validation score and
        its test cost fits in the time left (the flipped predictions computed for the decision are used).
        While on, every later checkpoint re-examines it (`recheck`; its flipped predictions are computed
        anyway): a decision taken on a diverged first slice (a broken model that flips happen to help)
        must not stay on for good, as it did on 8x8 digits, hiding every better checkpoint.
        Once off, it stays off at this resolution.
        """
        if self.flip_tta is None and not self._flip_tta_affordable(deadline):
            self.flip_tta = False
        if self.flip_tta is False:
            return plain
        flipped = self._predict_val(deadline - self._ft_test_cost(), flip=True)
        if flipped is None:
            if self.flip_tta is None:
                self.flip_tta = False
            return plain
        tta = (plain + flipped) / 2
        if self.flip_tta is None or recheck:
            y_val = self.train_y[self.val_idx]
            plain_score, tta_score = self._score(y_val, plain), self._score(y_val, tta)
            decided = bool(tta_score > plain_score + 5e-4)
            if decided != self.flip_tta:
                log.info("flip TTA at %s: val NAUC %.4f -> %.4f: %s", self.ft_size, plain_score, tta_score,
                         "on" if decided else "off")
            self.flip_tta = decided
        return tta if self.flip_tta else plain

    def _flip_tta_affordable(self, deadline: float) -> bool:
        if not self.config.flip_tta:
            return False
        n_test = len(self.test_x) if self.test_x is not None else 0
        extra_cost = n_test / max(1.0, self._feature_rate(self.ft_size))
        if extra_cost > 0.15 * max(0.0, deadline - time.monotonic()):
            log.info("flip TTA: not tried (%.1fs of extra test cost is too much for the time left)", extra_cost)
            return False
        return True

    def _grow_resolution(self, deadline: float) -> bool:
        """Fine-tuning has converged at this resolution: go on at a larger one from the best weights.

        Only when the new caches (top mode: validation, test and a first share of the training set)
        cost at most half of the time left and leave at least 30 s of training.
        """
        cfg = self.config
        if self._growths >= cfg.max_resolution_growths or self._ft_best_state is None \
                or self._ft_best_score > 0.9995 or self._growth_refused_at == self.ft_size:
            return False
        target = int(round(min(self.ft_size) * cfg.resolution_growth))
        new_size = working_size(self.profile.storage_hw, min(target, cfg.max_resolution))
        if min(new_size) <= min(self.ft_size):
            return False
        time_left = self._resize_affordable(new_size, deadline)
        if time_left is None:
            self._growth_refused_at = self.ft_size  # time only shrinks: do not ask again at this size
            return False
        model = copy.deepcopy(self.tuner.ema)  # the EMA copy has requires_grad off: the new tuner re-freezes
        model.load_state_dict(self._ft_best_state)
        for p in model.parameters():
            p.requires_grad_(True)
        lr = self.tuner.base_lrs[-1] * 0.5
        self._growths += 1
        self.ft_size = new_size
        if self.strategy == "finetune_top":
            self._rebuild_top_caches(new_size, deadline)
        self._new_tuner(model, lr)
        self.slice_seconds = max(self.config.first_slice_seconds, 0.1 * time_left)
        self._start_schedule(deadline)
        return True

    def _track_finetune(self, score: float):
        """Remember the best fine-tuned weights; on a collapse, go back to them with a smaller learning rate.

        Not while fine-tuning settles (the first 2 x warm-up steps): moving from the probe's head (LP-FT)
        to a tuned network dips validation for a few steps (sign_language_digits, full fine-tuning: 0.955
        -> 0.917 at step 10, 0.98 by step 33); reading that dip as a collapse cut the learning rate twice
        and left the run at the probe's score."""
        best = self._ft_best_score
        if score > best + 1e-4:
            self._ft_best_score = score
            self._ft_best_state = copy.deepcopy(self.tuner.ema.state_dict())
            self._stale_slices = 0
            return
        if self.tuner.steps < 2 * self.tuner.schedule.warmup_steps:
            return
        self._stale_slices += 1
        if np.isfinite(best) and score < best - 0.02 and self._ft_best_state is not None:
            self.tuner.model.load_state_dict(self._ft_best_state)
            self.tuner.ema.load_state_dict(self._ft_best_state)
            self.tuner.base_lrs = [lr * 0.3 for lr in self.tuner.base_lrs]
            log.info("val NAUC fell from %.4f to %.4f: back to the best weights, learning rate x0.3", best, score)

    def _worth_predicting(self, val_probs: np.ndarray, deadline: float) -> bool:
        """Predict a checkpoint only when adding it raises the ensemble's validation score clearly enough:
        by the minimum gain (saturation, prediction cost) and beyond the noise of the split's size."""
        y_val = self._val_labels()
        tentative = Candidate(self._checkpoint_name(), None, val_probs)
        group, score = self.candidates.select(y_val, extra=tentative)
        if not np.isfinite(score) or tentative not in group:
            return False
        cost_share = self._ft_test_cost() / max(1.0, deadline - time.monotonic())
        gain = score - self.best_val_score
        if gain <= min_gain(self.best_val_score, cost_share):
            return False
        return self._gain_beyond_noise(group, gain, y_val)

    def _gain_beyond_noise(self, group: list[Candidate], gain: float, y_val: np.ndarray) -> bool:
        """The gain over the current prediction exceeds `val_noise_z` bootstrap standard errors."""
        current, current_score = self.candidates.select(y_val)
        if not current or not np.isfinite(current_score) or self.config.val_noise_z <= 0:
            return True
        m = min(len(c.val_probs) for c in group + current if c.val_probs is not None)
        se = paired_gain_se(y_val[:m], CandidatePool.group_val_probs(group, m),
                            CandidatePool.group_val_probs(current, m), self._score)
        if gain > self.config.val_noise_z * se:
            return True
        log.info("checkpoint gain %.4f on %d validation examples is within noise (SE %.4f): not predicted",
                 gain, m, se)
        return False

    def _checkpoint_name(self) -> str:
        return f"finetune@{self.ft_size[0]}x{self.ft_size[1]}:{self.tuner.steps}" + ("+flip" if self.flip_tta else "")

    def _predict_finetune(self, deadline: float):
        started = time.monotonic()
        probs = self._predict_test(deadline)
        if probs is None:
            return None
        val_probs = getattr(self, "_ft_val_probs", None)
        if self.flip_tta:
            flipped = self._predict_test(deadline, flip=True)
            if flipped is None:
                return None  # the flipped test activations are being computed; next call goes on
            probs = (probs + flipped) / 2
        self._measured_test_cost = time.monotonic() - started
        self._add_candidate(Candidate(self._checkpoint_name(), probs, val_probs))
        return self._best_combination()

    def _add_candidate(self, candidate: Candidate):
        self.candidates.add(candidate)

    def _val_labels(self) -> np.ndarray:
        return self.train_y[np.flatnonzero(self.is_val)]

    def _choose(self) -> tuple[np.ndarray, float]:
        """Test probabilities of the best candidate group on validation, and its validation score."""
        probs, score, _ = self.candidates.predict(self._val_labels())
        return probs, score

    def _best_combination(self) -> np.ndarray:
        probs, score = self._choose()
        if np.isfinite(score):
            self.best_val_score = score
        return probs

    # ------------------------------------------------------------------ predictions
    def _predict_pending(self, deadline: float):
        fn = getattr(self, "_pending_fn", None)
        if fn is None:
            return None
        return fn(deadline)

    def _elapsed(self) -> float:
        if not hasattr(self, "_clock_start"):
            self._clock_start = time.monotonic()
        return time.monotonic() - self._clock_start

    def _count_test(self, dataset) -> int:
        declared = readers.declared_test_count(self.metadata)
        if declared is not None:
            return declared
        try:
            return readers.count_examples(dataset)
        except Exception:
            log.exception("could not count the test examples")
            return 0

    def _prior_predictions(self) -> np.ndarray:
        n_test = len(self.test_x) if self.test_x is not None else (self.n_test or 0)
        if self.train_y is not None and len(self.train_y):
            prior = self.train_y.mean(0)
        else:
            prior = np.full(self.n_classes, 1.0 / max(1, self.n_classes))
        return np.tile(prior, (n_test, 1)).astype(np.float64)

    def _sanitize(self, probs) -> np.ndarray:
        probs = np.nan_to_num(np.asarray(probs, dtype=np.float64), nan=0.0, posinf=1.0, neginf=0.0)
        probs = np.clip(probs, 0.0, 1.0)
        n_test = len(self.test_x) if self.test_x is not None else len(probs)
        if probs.shape != (n_test, self.n_classes):
            raise ValueError(f"predictions of shape {probs.shape}, expected {(n_test, self.n_classes)}")
        return probs

    def _fallback_after_error(self):
        """After an internal error, stop the stage that failed; the next test returns the last good predictions."""
        self.pending = self.last_good
        if self.stage == "finetune" or self.calls > 50:
            self.done_training = True
        elif self.stage == "probe" and self.train_features is None:
            self.stage = "done"
            self.done_training = True
