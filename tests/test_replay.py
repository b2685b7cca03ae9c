"""`tools replay`: the virtual clock, the comparison of two saved replays, and a short replay that
is bit-identical when run twice (the property a refactor's check relies on)."""
from __future__ import annotations

import time

import numpy as np
import pytest

from tools.replay import VirtualClock, compare, digits_split, multilabel_digits_split, replay, save

pretrained = pytest.importorskip("pretrained")


def test_virtual_clock_advances_by_its_step_at_every_reading():
    clock = VirtualClock(0.5, start=10.0)
    assert [clock(), clock(), clock()] == [10.5, 11.0, 11.5]


def test_the_multilabel_replay_task_adds_a_five_or_more_column():
    (train, test), (ml_train, ml_test) = digits_split(), multilabel_digits_split()
    assert ml_train.labels.shape == (len(train), 11) and ml_test.labels.shape == (len(test), 11)
    digit = train.labels.argmax(axis=1)
    assert np.array_equal(ml_train.labels[:, 10], (digit >= 5).astype(np.float32))
    assert set(ml_train.labels.sum(axis=1)) == {1.0, 2.0} and np.array_equal(ml_train.images, train.images)


def test_compare_names_every_difference(tmp_path):
    a = {"times": np.array([1.0, 2.0]), "labels": np.eye(2), "predictions": [np.zeros((2, 2)), np.ones((2, 2))]}
    b = {"times": np.array([1.0, 2.5]), "labels": np.eye(2), "predictions": [np.zeros((2, 2)), np.full((2, 2), 0.75)]}
    save(tmp_path / "a.npz", a), save(tmp_path / "b.npz", b), save(tmp_path / "c.npz", a)
    assert compare(tmp_path / "a.npz", tmp_path / "c.npz") == []
    problems = compare(tmp_path / "a.npz", tmp_path / "b.npz")
    assert len(problems) == 2 and "times differ" in problems[0] and "prediction_1: max difference 0.25" in problems[1]


@pytest.mark.skipif(not pretrained.weights_available("mobilenetv2_100"), reason="MobileNetV2 weights not installed")
def test_a_replay_is_bit_identical_run_twice_and_leaves_the_clock_alone(tmp_path):
    real_clock = time.monotonic
    first, second = (replay(budget=4.0, step=0.01) for _ in range(2))
    assert time.monotonic is real_clock  # the real clock is back
    assert len(first["predictions"]) >= 1 and first["predictions"][0].shape == (397, 10)
    assert np.array_equal(first["times"], second["times"])
    assert all(np.array_equal(p, q) for p, q in zip(first["predictions"], second["predictions"]))
