"""Stage 0: a linear head on raw-pixel thumbnails of a first chunk of data.

Instant, and on simple data (digits) already strong: the first prediction lands within seconds,
which ALC's log time axis rewards most. Refitted by the probe stage as more data is read.
"""
from __future__ import annotations

import time

import numpy as np

from autodl_core.ensemble import Candidate
from autodl_core.heads import LinearHead, thumbnails
from autodl_core.run_context import RunContext

FIRST_CHUNK_MAX = 4000  # examples read at most before the first (thumbnail) prediction


class ThumbnailStage:
    name = "thumbnails"

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.head: LinearHead | None = None
        self.n_fitted = 0  # examples read when the head was fitted
        self._test_thumbnails = None  # the test set never changes

    def step(self, deadline: float) -> str:
        data, cfg, planner = self.ctx.data, self.ctx.config, self.ctx.planner
        started = time.monotonic()
        data.read_more_train(planner.first_chunk_deadline(deadline, started, cfg.first_chunk_seconds),
                             max_examples=FIRST_CHUNK_MAX)
        # Data sorted by class: a first chunk that saw only some classes predicts the others at chance
        # (sign_language_digits: 2 of 10 classes in its first 300 examples, test NAUC 0.77 instead of
        # 0.95). Read on, up to 3x the time (at least 1 s), until every class has appeared.
        cap = planner.class_search_deadline(deadline, started, cfg.first_chunk_seconds)
        while not data.all_classes_seen() and data.n_read < FIRST_CHUNK_MAX and time.monotonic() < cap:
            if data.read_more_train(planner.class_search_read_deadline(cap),
                                    max_examples=FIRST_CHUNK_MAX - data.n_read) == 0:
                break
        self.fit(deadline)
        self.ctx.predictions.ready(self.predict)
        return "probe"

    def fit(self, deadline: float):
        data = self.ctx.data
        n = min(data.n_read, 20000)
        fit = ~data.is_val[:n]
        if fit.sum() < 2:
            fit[:] = True
        self.n_fitted = n
        self.head = LinearHead(data.profile.multilabel, l2=1e-2).fit(
            thumbnails(data.train_x, positions=np.flatnonzero(fit)), data.train_y[:n][fit], max_iter=60,
            deadline=self.ctx.planner.thumbnail_fit_deadline(deadline))

    def examples(self) -> int:
        """Examples the head was fitted on (0 before a successful fit)."""
        return 0 if self.head is None or self.head.mean is None else self.n_fitted

    def val_probs(self, val_idx: np.ndarray) -> np.ndarray:
        return self.head.predict_proba(thumbnails(self.ctx.data.train_x, positions=val_idx))

    def register(self):
        """Add (or replace) the thumbnail candidate: its test and validation predictions."""
        data = self.ctx.data
        if self._test_thumbnails is None:
            self._test_thumbnails = thumbnails(data.test_x)
        test_probs = self.head.predict_proba(self._test_thumbnails)
        val = np.flatnonzero(data.is_val)
        val_probs = self.val_probs(val) if len(val) else None
        self.ctx.candidates.add(Candidate("thumbnails", test_probs, val_probs))

    def predict(self, deadline: float):
        self.register()
        return self.ctx.best_combination()
