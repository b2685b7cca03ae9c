"""AutoDLClassifier: the solver on numpy arrays, scikit-learn style, without TensorFlow."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from autodl_core.estimator import AutoDLClassifier, images_key, label_matrix

REPO = Path(__file__).resolve().parents[1]


def test_class_labels_become_one_hot_columns_in_sorted_order():
    targets, classes, multilabel = label_matrix(np.array(["dog", "cat", "dog", "bird"]))
    assert classes.tolist() == ["bird", "cat", "dog"] and not multilabel
    assert targets.tolist() == [[0, 0, 1], [0, 1, 0], [0, 0, 1], [1, 0, 0]]


def test_a_label_matrix_is_multilabel_when_a_row_is_not_one_hot():
    assert label_matrix(np.eye(3)[[0, 1, 2, 0]])[2] is False
    targets, classes, multilabel = label_matrix(np.array([[1, 1, 0], [0, 0, 0], [0, 1, 0]]))
    assert multilabel and classes.tolist() == [0, 1, 2] and targets.dtype == np.float32


@pytest.mark.parametrize("y, message", [
    (np.array([3, 3, 3]), "one class"),
    (np.array([[0, 2], [1, 0]]), "only 0 and 1"),
    (np.zeros((2, 2, 2)), "N labels or an N x K"),
    (np.array([]), "empty"),
])
def test_bad_labels_say_what_is_wrong(y, message):
    with pytest.raises(ValueError, match=message):
        label_matrix(y)


def test_fit_checks_its_inputs_before_any_run():
    images = np.zeros((6, 8, 8), np.uint8)
    with pytest.raises(ValueError, match="time_budget"):
        AutoDLClassifier(time_budget=0).fit(images, [0, 1] * 3)
    with pytest.raises(ValueError, match="6 images but 4 label rows"):
        AutoDLClassifier(time_budget=5).fit(images, [0, 1, 0, 1])
    with pytest.raises(ValueError, match="not fitted"):
        AutoDLClassifier().predict_proba(images)


def test_parameters_follow_scikit_learns_conventions():
    from sklearn.base import clone

    clf = AutoDLClassifier(time_budget=7, progress=True)
    copy = clone(clf)
    assert copy.get_params() == clf.get_params() and copy is not clf
    assert clf.set_params(time_budget=9).time_budget == 9
    with pytest.raises(ValueError, match="no parameter"):
        clf.set_params(budget=1)


def test_the_stored_run_is_found_by_the_images_content():
    x = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4)
    assert images_key(x) == images_key(x.copy())
    assert images_key(x) != images_key(x[::-1])
    assert images_key([x[0], x[1]]) != images_key([x[1], x[0]])


DIGITS_RUN = r"""
import json, sys
sys.modules["tensorflow"] = None  # `import tensorflow` now fails: the estimator must not need it
import numpy as np
from sklearn.datasets import load_digits
from autodl_core import AutoDLClassifier
from autodl_core.config import PipelineConfig

digits = load_digits()
x, y = digits.images.astype(np.uint8), digits.target  # 8 x 8 grey, values 0..16
clf = AutoDLClassifier(time_budget=20, pipeline=PipelineConfig(step_backbones=""), name="digits")
clf.fit(x[:1200], y[:1200])
proba = clf.predict_proba(x[1200:])
n_runs = len(clf.history_)
again = clf.predict_proba(x[1200:])
curve = clf.learning_curve(y[1200:])
print(json.dumps({
    "shape": list(proba.shape), "min": float(proba.min()), "max": float(proba.max()),
    "accuracy": float((clf.predict(x[1200:]) == y[1200:]).mean()), "nauc": clf.score(x[1200:], y[1200:]),
    "times": [t for t, _ in clf.history_], "same_result": again is proba and len(clf.history_) == n_runs,
    "alc": curve["alc"], "curve_naucs": curve["nauc"],
    "classes": clf.classes_.tolist(), "tensorflow_loaded": sys.modules.get("tensorflow") is not None,
}))
"""


def test_the_estimator_on_digits_without_tensorflow():
    pytest.importorskip("sklearn")
    pretrained = pytest.importorskip("pretrained")
    if not pretrained.weights_available("mobilenetv2_100"):
        pytest.skip("MobileNetV2 weights not installed")
    done = subprocess.run([sys.executable, "-c", DIGITS_RUN], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["shape"] == [597, 10] and result["classes"] == list(range(10))
    assert 0.0 <= result["min"] and result["max"] <= 1.0
    assert result["accuracy"] > 0.85 and result["nauc"] > 0.9, result
    times = result["times"]
    assert times and times == sorted(times) and times[-1] <= 20.0
    assert result["same_result"] and not result["tensorflow_loaded"]
    assert 0.0 < result["alc"] <= 1.0 and result["curve_naucs"][-1] == pytest.approx(result["nauc"])
