"""autodl_core.metrics against values computed by hand (and by brute-force pair counting).

Each expected number below is worked out in the comment next to it, so a change in
the metric that would move the project's scores away from the kit's fails here.
"""
import itertools
import math

import numpy as np
import pytest

from autodl_core import metrics


def pairwise_auc(labels, scores):
    """AUC as the share of (positive, negative) pairs ranked right, ties counting 1/2."""
    pos = [s for y, s in zip(labels, scores) if y == 1]
    neg = [s for y, s in zip(labels, scores) if y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


# ---------------------------------------------------------------- NAUC / AUC

def test_auc_single_column_hand_value():
    # positives 0.9, 0.4; negatives 0.1, 0.6 -> pairs won: 0.9>0.1, 0.9>0.6, 0.4>0.1 = 3 of 4
    solution = np.array([[1], [0], [1], [0]])
    prediction = np.array([[0.9], [0.1], [0.4], [0.6]])
    assert metrics.column_aucs(solution, prediction) == pytest.approx([0.75])
    assert metrics.nauc(solution, prediction) == pytest.approx(0.5)


def test_ties_get_average_ranks():
    # positive 0.5 vs negatives 0.5 (tie: 1/2) and 0.1 (win: 1) -> AUC 0.75, NAUC 0.5
    solution = np.array([[1], [0], [0]])
    prediction = np.array([[0.5], [0.5], [0.1]])
    assert metrics.nauc(solution, prediction) == pytest.approx(0.5)
    # a constant prediction: every pair tied -> AUC 1/2 -> NAUC 0
    assert metrics.nauc(solution, np.full((3, 1), 0.3)) == pytest.approx(0.0)


def test_perfect_and_reversed_predictions():
    solution = np.array([[1, 0], [0, 1], [1, 0], [0, 1]])
    assert metrics.nauc(solution, solution.astype(float)) == pytest.approx(1.0)
    assert metrics.nauc(solution, 1.0 - solution) == pytest.approx(-1.0)


def test_columns_with_one_class_are_dropped():
    # column 0: AUC 1 (perfect); column 1: AUC 0.5 (constant); column 2 has no positive
    # and column 3 only positives: both dropped -> NAUC = 2 * mean(1, 0.5) - 1 = 0.5
    solution = np.array([[1, 0, 0, 1], [0, 1, 0, 1], [1, 1, 0, 1], [0, 0, 0, 1]])
    prediction = np.array([[0.8, 0.5, 0.9, 0.0], [0.2, 0.5, 0.1, 1.0],
                           [0.7, 0.5, 0.3, 0.5], [0.1, 0.5, 0.2, 0.2]])
    assert list(metrics.valid_columns(solution)) == [0, 1]
    assert metrics.column_aucs(solution, prediction) == pytest.approx([1.0, 0.5])
    assert metrics.nauc(solution, prediction) == pytest.approx(0.5)


def test_no_valid_column_gives_nan():
    solution = np.array([[1, 0], [1, 0]])
    assert math.isnan(metrics.nauc(solution, np.array([[0.3, 0.1], [0.2, 0.4]])))


def test_multilabel_nauc_matches_pair_counting():
    # rows with 0, 1 or 2 positives: a multi-label solution, scored column by column
    solution = np.array([[1, 1, 0], [0, 1, 1], [1, 0, 0], [0, 0, 1], [0, 1, 0]])
    prediction = np.array([[0.9, 0.2, 0.1], [0.3, 0.8, 0.7], [0.6, 0.2, 0.3],
                           [0.3, 0.1, 0.9], [0.2, 0.2, 0.4]])
    # col 0: pos {0.9, 0.6} vs neg {0.3, 0.3, 0.2}: all 6 won -> 1
    # col 1: pos {0.2, 0.8, 0.2} vs neg {0.2, 0.1}: 0.2 ties 0.2 (x2: 1/2 each), beats 0.1 (x2),
    #        0.8 beats both -> (0.5 + 1 + 1 + 1 + 0.5 + 1) / 6 = 5/6
    # col 2: pos {0.7, 0.9} vs neg {0.1, 0.3, 0.4}: all 6 won -> 1
    expected = [1.0, 5.0 / 6.0, 1.0]
    assert metrics.column_aucs(solution, prediction) == pytest.approx(expected)
    assert metrics.nauc(solution, prediction) == pytest.approx(2 * np.mean(expected) - 1)
    assert not metrics.is_multiclass(solution)


def test_random_matrices_with_ties_match_pair_counting():
    rng = np.random.default_rng(0)
    solution = (rng.random((40, 5)) < 0.3).astype(int)
    prediction = np.round(rng.random((40, 5)), 1)  # rounding makes many ties
    expected = [pairwise_auc(solution[:, j], prediction[:, j]) for j in metrics.valid_columns(solution)]
    assert metrics.column_aucs(solution, prediction) == pytest.approx(expected, abs=1e-12)


def test_shape_mismatch_and_nan_are_errors():
    solution = np.array([[1, 0], [0, 1]])
    with pytest.raises(ValueError, match="shape"):
        metrics.nauc(solution, np.zeros((2, 3)))
    with pytest.raises(ValueError, match="NaN"):
        metrics.nauc(solution, np.array([[np.nan, 0.0], [0.0, 1.0]]))


# ------------------------------------------------------------- accuracy etc.

def test_is_multiclass():
    assert metrics.is_multiclass(np.array([[1, 0, 0], [0, 0, 1]]))
    assert not metrics.is_multiclass(np.array([[1, 1, 0], [0, 0, 1]]))
    assert not metrics.is_multiclass(np.array([[0, 0, 0], [0, 0, 1]]))


def test_soft_accuracy_hand_value():
    # row 0: 0.6 / (0.6 + 0.2 + 0.2) = 0.6; row 1: 0.5 / (0.5 + 0.5) = 0.5; row 2: all-zero row -> 0
    solution = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    prediction = np.array([[0.6, 0.2, 0.2], [0.5, 0.5, 0.0], [0.0, 0.0, 0.0]])
    assert metrics.soft_accuracy(solution, prediction) == pytest.approx((0.6 + 0.5 + 0.0) / 3)


# ---------------------------------------------------------- time axis and ALC

def test_transform_time_hand_values():
    # T = 1200, t0 = 60: x(t) = ln(1 + t/60) / ln(21)
    assert metrics.transform_time(10, 1200) == pytest.approx(math.log(7 / 6) / math.log(21))
    assert metrics.transform_time(10, 1200) == pytest.approx(0.0506, abs=1e-4)
    assert metrics.transform_time(60, 1200) == pytest.approx(0.2277, abs=1e-4)  # ln 2 / ln 21
    assert metrics.transform_time(1200, 1200) == pytest.approx(1.0)
    assert metrics.transform_time(0, 300) == 0.0
    # T = 300: x(60) = ln 2 / ln 6
    assert metrics.transform_time(60, 300) == pytest.approx(math.log(2) / math.log(6))


@pytest.mark.parametrize("budget", [1200, 300])
@pytest.mark.parametrize("t,s", [(10.0, 0.8), (60.0, 0.5), (0.0, 1.0)])
def test_alc_single_prediction(budget, t, s):
    # one prediction s at t: the curve is 0 before x(t) and s after -> s * (1 - x(t))
    x = math.log(1 + t / 60) / math.log(1 + budget / 60)
    assert metrics.alc([t], [s], budget) == pytest.approx(s * (1 - x))
    assert metrics.prediction_weight(t, budget) == pytest.approx(1 - x)


def test_alc_step_curve_t1200():
    # predictions 0.2 at 10 s, 0.5 at 60 s, 0.8 at 600 s, T = 1200
    # area = 0.2 (x60 - x10) + 0.5 (x600 - x60) + 0.8 (1 - x600), x(t) = ln(1 + t/60) / ln 21
    x = lambda t: math.log(1 + t / 60) / math.log(21)
    expected = 0.2 * (x(60) - x(10)) + 0.5 * (x(600) - x(60)) + 0.8 * (1 - x(600))
    # with the numbers: x10 = 0.050632, x60 = 0.227670, x600 = 0.787597
    assert expected == pytest.approx(0.2 * 0.177038 + 0.5 * 0.559927 + 0.8 * 0.212403, abs=1e-5)
    assert metrics.alc([10, 60, 600], [0.2, 0.5, 0.8], 1200) == pytest.approx(expected)


def test_alc_step_curve_t300_with_a_drop():
    # scores may go down: 0.6 at 5 s, 0.3 at 100 s, T = 300 -> 0.6 (x100 - x5) + 0.3 (1 - x100)
    x = lambda t: math.log(1 + t / 60) / math.log(6)
    expected = 0.6 * (x(100) - x(5)) + 0.3 * (1 - x(100))
    assert metrics.alc([5, 100], [0.6, 0.3], 300) == pytest.approx(expected)


def test_alc_does_not_clip_late_predictions():
    # like the kit's scores.txt: a prediction after T gets x > 1 and a negative-width last step
    x = lambda t: math.log(1 + t / 60) / math.log(6)
    expected = 0.5 * (x(310) - x(100)) + 0.9 * (1 - x(310))
    assert metrics.alc([100, 310], [0.5, 0.9], 300) == pytest.approx(expected)


def test_alc_edge_cases():
    assert metrics.alc([], [], 1200) == 0.0
    with pytest.raises(ValueError):
        metrics.alc([1.0], [0.5, 0.6], 1200)
    with pytest.raises(ValueError):
        metrics.alc([1.0], [0.5], 0)
