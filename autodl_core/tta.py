"""Flip TTA (averaging the predictions of an image and its mirror), decided from validation.

The first checkpoint at a resolution decides: TTA goes on when it raises the validation score
and its test cost fits in the time left (the flipped predictions computed for the decision are
used). While on, every later checkpoint re-examines it (its flipped predictions are computed
anyway): a decision taken on a diverged first slice (a broken model that flips happen to help)
must not stay on for good, as it did on 8x8 digits, hiding every better checkpoint.
Once off, it stays off at this resolution.
"""
from __future__ import annotations

import logging
from typing import Callable

import numpy as np

log = logging.getLogger("autodl_core.tta")

MIN_TTA_GAIN = 5e-4  # validation NAUC flips must add to be switched on


class FlipTTA:
    def __init__(self):
        self.on: bool | None = None  # None: not decided yet at this resolution

    def reset(self):
        """A new resolution (or network): decided again."""
        self.on = None

    def apply(self, plain: np.ndarray, y_val: np.ndarray, score: Callable[[np.ndarray, np.ndarray], float],
              affordable: Callable[[], bool], flipped: Callable[[], np.ndarray | None], recheck: bool = True,
              where: object = "") -> np.ndarray:
        """Validation predictions of the checkpoint as it would predict the test set (with TTA or not).

        `affordable()`: whether its test cost fits (asked only while undecided); `flipped()`: the
        validation predictions on mirrored images (None when they could not be computed in time)."""
        if self.on is None and not affordable():
            self.on = False
        if self.on is False:
            return plain
        mirrored = flipped()
        if mirrored is None:
            if self.on is None:
                self.on = False
            return plain
        tta = (plain + mirrored) / 2
        if self.on is None or recheck:
            plain_score, tta_score = score(y_val, plain), score(y_val, tta)
            decided = bool(tta_score > plain_score + MIN_TTA_GAIN)
            if decided != self.on:
                log.info("flip TTA at %s: val NAUC %.4f -> %.4f: %s", where, plain_score, tta_score,
                         "on" if decided else "off")
            self.on = decided
        return tta if self.on else plain
