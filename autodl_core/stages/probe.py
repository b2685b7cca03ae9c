"""Stage 1: frozen pretrained features and a linear head, refitted as more data is read.

Each train call is one slice (log-time spaced): read a little more, compute features of what
was read, refit the head. Test features are computed once, so each refit's prediction is nearly
free. When features cover everything that will be read, the run moves on to fine-tuning.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch

from autodl_core.ensemble import Candidate
from autodl_core.heads import LinearHead
from autodl_core.images import working_size
from autodl_core.planner import seconds_since
from autodl_core.run_context import RunContext
from autodl_core.stages.thumbnails import ThumbnailStage

log = logging.getLogger("autodl_core.stages.probe")


class ProbeStage:
    name = "probe"

    def __init__(self, ctx: RunContext, thumbnails: ThumbnailStage):
        self.ctx, self.thumbnails = ctx, thumbnails
        self.head: LinearHead | None = None
        self.size = None  # the working size the head's features were computed at
        self._thumbs_stale = False

    def working_size(self):
        cfg, storage = self.ctx.config, self.ctx.data.profile.storage_hw
        if cfg.probe_resolution > 0:
            return working_size(storage, cfg.probe_resolution)
        return working_size(storage, self.ctx.plan.probe_resolution(min(storage)))

    def max_examples(self) -> int:
        cfg = self.ctx.config
        return cfg.gpu_probe_max_examples if self.ctx.device.type == "cuda" else cfg.probe_max_examples

    def test_feature_cost(self, size) -> float:
        caches = self.ctx.caches
        return self.ctx.planner.test_feature_cost(size, self.ctx.data.n_test_read, caches.test_features is not None)

    def step(self, deadline: float) -> str:
        ctx = self.ctx
        data, caches, planner = ctx.data, ctx.caches, ctx.planner
        size = self.working_size()
        rate = planner.feature_rate(size)
        slice_s = planner.probe_slice_seconds()
        slice_deadline = planner.probe_slice_deadline(deadline, slice_s, self.test_feature_cost(size))
        have_features = 0 if caches.train_features is None else len(caches.train_features)
        n_feature_target = planner.probe_feature_target(slice_s, size, data.n_read, have_features, self.max_examples())
        if data.n_read < n_feature_target:
            data.read_more_train(slice_deadline, max_examples=n_feature_target - data.n_read)
        n_target = min(data.n_read, self.max_examples())
        n_target = min(n_target, have_features + max(64, int(rate * max(1.0, slice_deadline - time.monotonic()))))
        if n_target > have_features:
            self._extend_features(size, have_features, n_target, slice_deadline, deadline)
        if caches.train_features is None:
            return self.name
        self._fit_head(size, deadline)
        self._thumbs_stale = data.n_read > 1.5 * self.thumbnails.examples()
        if self._thumbs_stale:
            self.thumbnails.fit(deadline)
        ctx.predictions.ready(self.predict)
        n_feat = len(caches.train_features)
        if n_feat >= min(self.max_examples(), data.n_read) and (data.reading_done() or n_feat >= self.max_examples()):
            if ctx.net.strategy in ("finetune", "finetune_top"):
                return "finetune"
            ctx.done_training = True
            return "done"
        return self.name

    def _extend_features(self, size, have_features: int, n_target: int, slice_deadline: float, deadline: float):
        """Features of examples have_features..n_target-1 (a prefix of them when time runs short)."""
        ctx = self.ctx
        caches, planner = ctx.caches, ctx.planner
        caches.at(size)
        started = time.monotonic()
        caches.train.ensure(ctx.data.images("train"), np.arange(have_features, n_target),
                            deadline=planner.feature_pass_deadline(deadline, slice_deadline))
        ready = caches.train.has[have_features:n_target]
        done = int(np.argmin(ready)) if not ready.all() else len(ready)  # cached prefix length
        if not done:
            return
        new = caches.pooled(caches.train, np.arange(have_features, have_features + done),
                            deadline=planner.pooling_deadline(deadline))
        if new is not None:
            planner.note_features(done, size, seconds_since(started))
            caches.train_features = new if caches.train_features is None else torch.cat([caches.train_features, new])

    def _fit_head(self, size, deadline: float):
        ctx = self.ctx
        features, data = ctx.caches.train_features, ctx.data
        n_feat = len(features)
        fit_mask = ~data.is_val[:n_feat]
        y = data.train_y[:n_feat]
        if fit_mask.sum() < 2:
            fit_mask[:] = True
        self.head = LinearHead(data.profile.multilabel, l2=self.l2(fit_mask.sum())).fit(
            features[torch.from_numpy(fit_mask).to(features.device)], y[fit_mask], max_iter=100,
            deadline=ctx.planner.probe_fit_deadline(deadline, self.test_feature_cost(size)))
        self.size = size

    def first_examples(self, n: int = 1000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(frozen features, images, labels) of the first `n` training examples with features: what a
        second look at the pipeline choice measures its landmarkers on."""
        features = self.ctx.caches.train_features
        n = min(n, 0 if features is None else len(features))
        data = self.ctx.data
        return features[:n].float().cpu().numpy(), data.train_x[:n], data.train_y[:n]

    @staticmethod
    def l2(n: int) -> float:
        return float(np.clip(2.0 / max(1, n), 1e-4, 1e-2))

    def val_probs(self, deadline: float | None = None):
        """Probe predictions on every validation example read so far (features computed as needed); None
        when they cannot be computed before `deadline`."""
        ctx = self.ctx
        val = np.flatnonzero(ctx.data.is_val)
        if len(val) == 0:
            return None
        ctx.caches.train.ensure(ctx.data.images("train"), val, deadline=deadline)
        if not ctx.caches.train.has[val].all():
            return None
        features = ctx.caches.pooled(ctx.caches.train, val, deadline=deadline)
        return None if features is None else self.head.predict_proba(features)

    def predict(self, deadline: float):
        ctx = self.ctx
        caches, size = ctx.caches, self.size
        if caches.test_features is None:
            caches.at(size)
            n_test = ctx.data.n_test_read
            started = time.monotonic()
            done = caches.test.ensure(ctx.data.images("test"), np.arange(n_test), deadline=deadline)
            if n_test and not caches.test.has.all():
                log.info("test activations: %d of %d before the deadline", done, n_test)
                return None  # what was computed stays cached for the next call
            features = caches.pooled(caches.test, np.arange(n_test), deadline=deadline)
            if features is None:
                log.info("test features: the top over %d cached activations does not fit before the deadline",
                             n_test)
                return None  # the activations stay cached for the next call
            caches.test_features = features
            ctx.planner.note_features(done, size, seconds_since(started))
        probs = self.head.predict_proba(caches.test_features)
        ctx.candidates.add(Candidate("probe", probs, self.val_probs()))
        if self._thumbs_stale:
            self._thumbs_stale = False
            self.thumbnails.register()
        return ctx.best_combination()
