"""Candidates (models whose test predictions exist) and the validation-driven choice among them.

The solver keeps the thumbnail head, the frozen-feature probe and the last few fine-tuned
checkpoints (each possibly with flip TTA). What it predicts is the single candidate or the
average of the best-k candidates that scores highest on the validation split. Validation
examples are chosen by read position, so the split only grows by appending: a candidate's
`val_probs` covers a prefix of it, and candidates are compared on their common prefix.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np

log = logging.getLogger("autodl_core.ensemble")

MIN_VAL_EXAMPLES = 20
MAX_CANDIDATES = 12  # test predictions kept at most (1,000 classes x 10,000 test examples: 40 MB each)


@dataclass(eq=False)  # compared by identity: the arrays have no single truth value
class Candidate:
    name: str
    test_probs: np.ndarray | None  # None: a tentative candidate, scored on validation only
    val_probs: np.ndarray | None
    kind: str = ""  # "thumbnails", "probe" or "finetune"
    group: str = ""  # the any-time step it came from ("mobilenetv2_100@224x224"); "" for the first stages

    def __post_init__(self):
        if not self.kind:
            self.kind = self.name.split("@")[0].split(":")[0]


def paired_gain_se(y_val: np.ndarray, new_probs: np.ndarray, old_probs: np.ndarray,
                   score: Callable[[np.ndarray, np.ndarray], float], n_boot: int | None = None,
                   seed: int = 0) -> float:
    """Standard error of score(new) - score(old) on this validation split (paired bootstrap).

    Why: on a 25-image split a checkpoint "won" by 0.106 NAUC and lost 0.12 on the test set; the
    gain a split can vouch for shrinks with its size. The bootstrap resamples examples, scoring both
    predictions on the same resample (paired: their errors are correlated). Its cost is bounded:
    fewer resamples for large splits x many classes (at least 16).
    """
    n = len(y_val)
    if n < 2:
        return float("inf")
    if n_boot is None:
        n_boot = int(np.clip(2_000_000 // max(1, n * y_val.shape[1]), 16, 100))
    rng = np.random.default_rng(seed)
    gains = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        y = y_val[idx]
        if not valid_val(y):
            continue
        new, old = score(y, new_probs[idx]), score(y, old_probs[idx])
        if np.isfinite(new) and np.isfinite(old):
            gains.append(new - old)
    return float(np.std(gains, ddof=1)) if len(gains) >= 8 else float("inf")


def valid_val(y_val: np.ndarray) -> bool:
    """A validation split is usable when some label column holds both classes."""
    sums = y_val.sum(axis=0)
    return bool(np.any((sums > 0) & (sums < len(y_val))))


class CandidatePool:
    """Per step (group): at most `max_checkpoints` fine-tuned checkpoints (the newest) and one candidate of
    every other kind; MAX_CANDIDATES in all (the oldest checkpoints of earlier steps go first)."""

    def __init__(self, score: Callable[[np.ndarray, np.ndarray], float], max_checkpoints: int = 3,
                 single_noise_z: float | None = None):
        self.score = score
        self.max_checkpoints = max(1, int(max_checkpoints))
        # A single candidate is chosen over the best average of several only when its lead exceeds this many
        # paired-bootstrap standard errors (None: the highest score wins, as before the any-time steps).
        self.single_noise_z = single_noise_z
        self.items: list[Candidate] = []

    def __iter__(self):
        return iter(self.items)

    def add(self, candidate: Candidate) -> None:
        if candidate.test_probs is not None:  # float32 halves the memory of 1000-class predictions
            candidate.test_probs = np.asarray(candidate.test_probs, dtype=np.float32)
        items = [c for c in self.items if c.name != candidate.name]
        if candidate.kind != "finetune":
            items = [c for c in items if not (c.kind == candidate.kind and c.group == candidate.group)]
        items.append(candidate)
        checkpoints = [c for c in items if c.kind == "finetune" and c.group == candidate.group]
        drop = {id(c) for c in checkpoints[:-self.max_checkpoints]}
        items = [c for c in items if id(c) not in drop]
        while len(items) > MAX_CANDIDATES:
            older = [c for c in items if c.kind == "finetune" and c.group != candidate.group] or items[:1]
            items.remove(older[0])
        self.items = items

    def select(self, y_val_full: np.ndarray, extra: Candidate | None = None) -> tuple[list[Candidate], float]:
        """Best single candidate or best-k average on the common validation prefix: (group, val score).

        With too little validation data the newest candidate wins (later stages see more data).
        `extra` is scored as if it were in the pool (to ask whether a new checkpoint would help).
        """
        pool = self.items + ([extra] if extra is not None else [])
        if not pool:
            return [], -np.inf
        latest = pool[-1]
        scored = [c for c in pool if c.val_probs is not None and len(c.val_probs)]
        if not scored:
            return [latest], -np.inf
        m = min(len(c.val_probs) for c in scored)
        y_val = y_val_full[:m]
        if m < MIN_VAL_EXAMPLES or not valid_val(y_val):
            return [latest], -np.inf
        singles = sorted(((c, self.score(y_val, c.val_probs[:m])) for c in scored),
                         key=lambda item: item[1], reverse=True)
        options = [([c], s) for c, s in singles]
        for k in range(2, len(singles) + 1):
            group = [c for c, _ in singles[:k]]
            options.append((group, self.score(y_val, np.mean([c.val_probs[:m] for c in group], axis=0))))
        group, best = max(options, key=lambda item: item[1])
        if len(group) == 1 and self.single_noise_z is not None and len(singles) > 1:
            return self._single_or_average(group, best, options[len(singles):], y_val, m)
        return group, best

    def _single_or_average(self, single: list[Candidate], score: float, averages: list, y_val: np.ndarray,
                           m: int) -> tuple[list[Candidate], float]:
        """The best single candidate, unless the best average of several is within the noise of the split.

        Why: a run tries many checkpoints against a small validation split, and the one that scores highest
        alone is partly the luckiest (DTD, 97 held-out images: a checkpoint at val NAUC 0.994 replaced an
        ensemble at 0.983 and scored 0.975 on the test set against the ensemble's 0.984). An average of
        strong models loses little when it is truly worse, and its validation score is less of a lottery."""
        group, value = max(averages, key=lambda item: item[1])
        n_boot = int(np.clip(1_000_000 // max(1, m * y_val.shape[1]), 8, 30))
        se = paired_gain_se(y_val, single[0].val_probs[:m], self.group_val_probs(group, m), self.score, n_boot=n_boot)
        if score - value > self.single_noise_z * se:
            return single, score
        return group, value

    @staticmethod
    def group_val_probs(group: list[Candidate], m: int) -> np.ndarray:
        """The group's averaged validation predictions on the first m validation examples."""
        return np.mean([c.val_probs[:m] for c in group], axis=0)

    def predict(self, y_val_full: np.ndarray) -> tuple[np.ndarray, float, str]:
        """Test probabilities of the chosen group, its validation score and a readable name."""
        group, best = self.select(y_val_full)
        group = [c for c in group if c.test_probs is not None]
        if not group:
            raise ValueError("no candidate with test predictions")
        name = "+".join(c.name for c in group)
        log.info("chose %s (val NAUC %.4f)", name, best)
        return np.mean([c.test_probs for c in group], axis=0), best, name
