"""NAUC and ALC exactly as the official AutoDL scoring program computes them.

This is the single implementation used by the local scorer (`tools run`), the
benchmark and the solver's own validation, so that a number printed anywhere in
the project means the same thing as the kit's score.
"""
from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

T0_SECONDS = 60.0  # the kit's t0 in the log time transform


def valid_columns(solution: np.ndarray) -> np.ndarray:
    """Indices of label columns holding both positives and negatives (the kit scores only these)."""
    solution = np.asarray(solution)
    n = solution.shape[0]
    col_sums = (solution == 1).sum(axis=0)
    return np.flatnonzero((col_sums > 0) & (col_sums < n))


def column_aucs(solution: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """ROC AUC of every valid column (Mann-Whitney from average ranks, as the kit's tiedrank)."""
    solution = np.asarray(solution, dtype=np.float64)
    prediction = np.asarray(prediction, dtype=np.float64)
    if solution.ndim == 1:
        solution = solution[:, None]
    if prediction.ndim == 1:
        prediction = prediction[:, None]
    if solution.shape != prediction.shape:
        raise ValueError(
            f"prediction shape {prediction.shape} does not match solution shape {solution.shape}"
        )
    if not np.all(np.isfinite(prediction)):
        raise ValueError("prediction contains NaN or infinite values")
    cols = valid_columns(solution)
    aucs = np.empty(len(cols))
    for i, k in enumerate(cols):
        ranks = rankdata(prediction[:, k])
        positive = solution[:, k] == 1
        npos = positive.sum()
        nneg = (solution[:, k] < 1).sum()
        aucs[i] = (ranks[positive].sum() - npos * (npos + 1) / 2.0) / (nneg * npos)
    return aucs


def nauc(solution: np.ndarray, prediction: np.ndarray) -> float:
    """Normalised AUC = 2 * mean column AUC - 1; NaN when no column has both classes."""
    aucs = column_aucs(solution, prediction)
    if len(aucs) == 0:
        return float("nan")
    return float(2.0 * aucs.mean() - 1.0)


def is_multiclass(solution: np.ndarray) -> bool:
    """True when every row holds exactly one positive (the kit then also reports accuracy)."""
    solution = np.asarray(solution)
    return bool(np.all(solution.sum(axis=1) == 1))


def soft_accuracy(solution: np.ndarray, prediction: np.ndarray) -> float:
    """The kit's logged multi-class 'accuracy': mean of sum_j y_ij p_ij / sum_j |p_ij|."""
    solution = np.asarray(solution, dtype=np.float64)
    prediction = np.asarray(prediction, dtype=np.float64)
    denom = np.abs(prediction).sum(axis=1)
    denom[denom == 0] = 1.0
    return float(np.mean((solution * prediction).sum(axis=1) / denom))


def transform_time(t, time_budget: float, t0: float = T0_SECONDS):
    """The kit's log time axis: log(1 + t/t0) / log(1 + T/t0)."""
    t = np.asarray(t, dtype=np.float64)
    return np.log1p(t / t0) / np.log1p(time_budget / t0)


def alc(timestamps, scores, time_budget: float, t0: float = T0_SECONDS) -> float:
    """Area under the step learning curve on the transformed time axis (0 before the first prediction).

    `timestamps` are seconds since the clock started, in prediction order; the last
    score extends to x = 1, as in the kit's scores.txt (no clipping of late points).
    """
    if time_budget <= 0:
        raise ValueError(f"time budget must be positive, got {time_budget}")
    timestamps = list(timestamps)
    scores = list(scores)
    if len(timestamps) != len(scores):
        raise ValueError(f"{len(timestamps)} timestamps but {len(scores)} scores")
    if not timestamps:
        return 0.0
    xs = [0.0] + [float(v) for v in transform_time(np.array(timestamps), time_budget, t0)] + [1.0]
    ys = [0.0] + [float(s) for s in scores] + [float(scores[-1])]
    area = 0.0
    for i in range(len(xs) - 1):
        area += (xs[i + 1] - xs[i]) * ys[i]
    return area


def prediction_weight(t: float, time_budget: float, t0: float = T0_SECONDS) -> float:
    """Share of the ALC weight left after time t: what a prediction made at t can still earn."""
    return float(1.0 - transform_time(t, time_budget, t0))
