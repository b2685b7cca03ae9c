"""Candidate pool: which models are kept and what the validation split makes the solver predict."""
from __future__ import annotations

import numpy as np

from autodl_core.ensemble import Candidate, CandidatePool
from autodl_core.metrics import nauc


def score(y, p):
    return nauc(y, p)


def noisy_probs(y, rng, noise):
    p = y + noise * rng.standard_normal(y.shape)
    p = np.exp(p)
    return p / p.sum(1, keepdims=True)


def test_pool_keeps_newest_checkpoints_and_one_of_each_other_kind():
    y = np.eye(3)[np.arange(60) % 3]
    pool = CandidatePool(score, max_checkpoints=2)
    for name in ["thumbnails", "probe", "finetune@48x48:10", "finetune@48x48:20", "probe", "finetune@72x72:5"]:
        pool.add(Candidate(name, np.zeros((5, 3)), y))
    names = [c.name for c in pool]
    assert names.count("probe") == 1 and "thumbnails" in names
    assert [n for n in names if n.startswith("finetune")] == ["finetune@48x48:20", "finetune@72x72:5"]
    assert all(c.test_probs.dtype == np.float32 for c in pool)


def test_average_chosen_when_it_beats_every_single_model():
    rng = np.random.default_rng(0)
    y = np.eye(4)[rng.integers(0, 4, 400)]
    pool = CandidatePool(score)
    a, b = noisy_probs(y, rng, 1.5), noisy_probs(y, rng, 1.5)  # independent errors
    pool.add(Candidate("probe", np.full((7, 4), 0.1), a))
    pool.add(Candidate("finetune@64x64:1", np.full((7, 4), 0.3), b))
    group, best = pool.select(y)
    assert len(group) == 2 and best > max(score(y, a), score(y, b))
    probs, _, name = pool.predict(y)
    assert np.allclose(probs, 0.2) and sorted(name.split("+")) == ["finetune@64x64:1", "probe"]


def test_a_bad_candidate_is_left_out_and_tentative_ones_are_scored():
    rng = np.random.default_rng(1)
    y = np.eye(3)[rng.integers(0, 3, 300)]
    pool = CandidatePool(score)
    good = noisy_probs(y, rng, 0.8)
    pool.add(Candidate("probe", np.zeros((2, 3)), good))
    pool.add(Candidate("thumbnails", np.ones((2, 3)), np.full(y.shape, 1 / 3)))  # chance level
    group, best = pool.select(y)
    assert [c.name for c in group] == ["probe"]
    better = Candidate("finetune@64x64:9", None, noisy_probs(y, rng, 0.3))
    group, best_with = pool.select(y, extra=better)
    assert any(c is better for c in group) and best_with > best


def test_too_little_validation_means_the_newest_candidate():
    y = np.eye(2)[[0, 1] * 5]  # 10 examples: below the minimum
    pool = CandidatePool(score)
    pool.add(Candidate("probe", np.zeros((3, 2)), y))
    pool.add(Candidate("finetune@64x64:1", np.ones((3, 2)), 1 - y))
    probs, best, name = pool.predict(y)
    assert name == "finetune@64x64:1" and not np.isfinite(best) and np.allclose(probs, 1)


def test_a_gain_on_a_tiny_split_is_within_noise_but_the_same_gain_on_a_large_one_is_not():
    """The H200 case: on a 25-image validation split a checkpoint 'won' by ~0.1 NAUC and lost 0.12 on test."""
    from autodl_core.ensemble import paired_gain_se
    from autodl_core.metrics import nauc

    rng = np.random.default_rng(3)

    def split(n):
        y = np.eye(2)[rng.integers(0, 2, n)]
        signal = y[:, 1] * 2 - 1
        old = 1 / (1 + np.exp(-(0.9 * signal + rng.normal(0, 1.0, n))))  # the probe
        new = 1 / (1 + np.exp(-(1.2 * signal + rng.normal(0, 1.0, n))))  # a checkpoint, a bit better
        return y, np.stack([1 - new, new], 1), np.stack([1 - old, old], 1)

    y, new, old = split(25)
    se_small = paired_gain_se(y, new, old, nauc)
    y, new, old = split(4000)
    se_large = paired_gain_se(y, new, old, nauc)
    assert se_small > 0.06  # a 0.1 gain is within 2 SE on 25 images
    assert se_large < 0.025  # ... and far beyond it on 4,000
    assert paired_gain_se(y[:1], new[:1], old[:1], nauc) == float("inf")
