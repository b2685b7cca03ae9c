"""`AutoDLClassifier`: the solver as a scikit-learn-style estimator, for images held in numpy arrays.

No AutoDL folders and no TensorFlow: the arrays go to the solver through `autodl_core.arrays`, the
in-memory twin of the kit's tf.data input.

The solver is transductive, as the AutoDL protocol is: it trains while it predicts one test set, and its
predictions improve over the time budget (`history_` keeps each one with its time). So the timed run
happens once the test images are known:

    clf = AutoDLClassifier(time_budget=120).fit(X, y)
    proba = clf.predict_proba(X_test)          # runs the 120-s any-time loop on X_test, then returns

    clf = AutoDLClassifier(time_budget=120).fit(X, y, X_test=X_test)   # the same run, inside fit
    proba = clf.predict_proba(X_test)          # the stored result, at once

Each new test set costs one budget; asking again for the same images returns the stored predictions.
Images: one N x H x W [x C] array or a list of H_i x W_i [x C] arrays (1-4 channels, any numeric dtype:
the solver maps the value range it finds). Labels: N class labels (integers or strings), or an N x K
0/1 array (multi-label when a row holds other than exactly one 1).

The pipeline is the solver's default (`PipelineConfig()`); `pipeline=` takes another PipelineConfig, or
a function of the run's metadata such as `meta_db.selector.pipeline_for_run` (the meta-knowledge store's
choice, as the kit submission makes it; autodl_core cannot import the store itself).
"""
from __future__ import annotations

import hashlib
import logging
import time
from typing import Any, Callable, Union

import numpy as np

from autodl_core import metrics
from autodl_core.arrays import ArrayDataset, ArrayMetadata
from autodl_core.config import PipelineConfig

log = logging.getLogger("autodl_core.estimator")

PipelineChoice = Union[PipelineConfig, Callable[[Any], Any], None]


class AutoDLClassifier:
    """Any-time image classifier with a time budget; see the module docstring for the protocol.

    Parameters: `time_budget` (seconds of the timed loop, as the kit's T; the warm-up before it is not
    counted, as the kit does not count `Model.__init__`), `pipeline` (above), `device` ("cpu", "cuda" or
    None for the GPU where there is one), `progress` (a progress bar on the terminal), `name` (the
    dataset's name in the solver's log).

    After a run: `classes_`, `multilabel_`, `history_` (list of (seconds since the clock started,
    N_test x K probabilities)), `init_seconds_`, `stop_reason_`, `pipeline_`.
    """

    def __init__(self, time_budget: float = 300.0, pipeline: PipelineChoice = None, device: str | None = None,
                 progress: bool = False, name: str = "arrays"):
        self.time_budget = time_budget
        self.pipeline = pipeline
        self.device = device
        self.progress = progress
        self.name = name

    # ------------------------------------------------------------------ scikit-learn's interface
    def get_params(self, deep: bool = True) -> dict:
        return {"time_budget": self.time_budget, "pipeline": self.pipeline, "device": self.device,
                "progress": self.progress, "name": self.name}

    def set_params(self, **params) -> "AutoDLClassifier":
        for key, value in params.items():
            if key not in self.get_params():
                raise ValueError(f"AutoDLClassifier has no parameter {key!r}")
            setattr(self, key, value)
        return self

    def fit(self, X, y, X_test=None) -> "AutoDLClassifier":
        """Check and keep the training data; with `X_test`, run the timed loop on it now."""
        budget = float(self.time_budget)
        if not np.isfinite(budget) or budget <= 0:
            raise ValueError(f"time_budget must be a positive number of seconds, got {self.time_budget!r}")
        targets, self.classes_, self.multilabel_ = label_matrix(y)
        self._train = ArrayDataset(X, targets)
        self._test_key = None
        self.history_: list[tuple[float, np.ndarray]] = []
        if X_test is not None:
            self._run(X_test)
        return self

    def predict_proba(self, X) -> np.ndarray:
        """N x K probabilities (columns in `classes_` order) from the last prediction within the budget."""
        self._check_fitted()
        if self._test_key is None or self._test_key != images_key(X):
            self._run(X)
        return self.history_[-1][1]

    def predict(self, X) -> np.ndarray:
        """Class labels; for multi-label data an N x K 0/1 array (probability above 0.5)."""
        proba = self.predict_proba(X)
        if self.multilabel_:
            return (proba > 0.5).astype(int)
        return self.classes_[np.argmax(proba, axis=1)]

    def score(self, X, y) -> float:
        """Normalised AUC (2 AUC - 1, averaged over classes: the challenge's per-prediction score)."""
        return metrics.nauc(self._solution(y), self.predict_proba(X))

    def learning_curve(self, y_test) -> dict:
        """The run's any-time curve against the test labels: times, NAUC per prediction, and the ALC the
        kit would give it with this budget."""
        self._check_fitted()
        if not self.history_:
            raise ValueError("no run yet: call predict_proba (or fit with X_test) first")
        solution = self._solution(y_test)
        times = [t for t, _ in self.history_]
        naucs = [metrics.nauc(solution, p) for _, p in self.history_]
        return {"times": times, "nauc": naucs, "alc": metrics.alc(times, naucs, float(self.time_budget))}

    # ------------------------------------------------------------------ the timed loop
    def _run(self, X_test) -> None:
        from autodl_core.solver import Solver  # torch and the backbones: only when a run starts

        n_classes = int(self._train.labels.shape[1])
        test = ArrayDataset(X_test, np.zeros((_length(X_test), n_classes), np.float32))
        if test.channels != self._train.channels:
            raise ValueError(f"test images have {test.channels} channels, training images {self._train.channels}")
        metadata = ArrayMetadata(self._train, name=self.name)
        self.pipeline_ = self._pipeline_for(metadata)
        budget = float(self.time_budget)
        init_started = time.monotonic()
        solver = Solver(metadata, self.pipeline_, device=self.device)
        self.init_seconds_ = time.monotonic() - init_started
        history: list[tuple[float, np.ndarray]] = []
        with _ProgressBar(self.progress, budget) as bar:
            start = time.monotonic()
            self.stop_reason_ = "done_training"
            while not solver.done_training:
                if start + budget - time.monotonic() <= 0:
                    self.stop_reason_ = "time budget used"
                    break
                solver.train(self._train, start + budget - time.monotonic())
                remaining = start + budget - time.monotonic()
                if remaining <= 0:  # under the kit a call past T is cut off with what it was making
                    self.stop_reason_ = "time budget used"
                    break
                prediction = np.asarray(solver.test(test, remaining), dtype=np.float32)
                seconds = time.monotonic() - start
                if seconds > budget:
                    self.stop_reason_ = "time budget used"
                    break
                history.append((seconds, prediction))
                bar.update(seconds, len(history))
        if not history:  # a budget below the first step: the solver's right-shaped fallback, past T
            history.append((time.monotonic() - start, np.asarray(solver.test(test, 1.0), dtype=np.float32)))
            self.stop_reason_ = "the budget ended before a prediction; returned the solver's fallback"
        log.info("AutoDLClassifier: %d predictions, the last at %.1fs of %.0fs (%s)", len(history), history[-1][0],
                 budget, self.stop_reason_)
        self.history_ = history
        self._test_key = images_key(X_test)

    def _pipeline_for(self, metadata) -> PipelineConfig:
        choice = self.pipeline
        if choice is None:
            return PipelineConfig()
        if isinstance(choice, PipelineConfig):
            return choice
        if callable(choice):
            made = choice(metadata)
            config = made[0] if isinstance(made, tuple) else made
            if isinstance(config, PipelineConfig):
                return config
            raise TypeError(f"pipeline= returned {type(config).__name__}, not a PipelineConfig")
        raise TypeError(f"pipeline= takes a PipelineConfig or a function of the metadata, not {type(choice).__name__}")

    # ------------------------------------------------------------------ checks and label columns
    def _check_fitted(self) -> None:
        if not hasattr(self, "_train"):
            raise ValueError("this AutoDLClassifier is not fitted yet: call fit(X, y) first")

    def _solution(self, y) -> np.ndarray:
        """Labels in the run's columns (`classes_` order)."""
        y = np.asarray(y)
        if self.multilabel_ or y.ndim == 2:
            if y.ndim != 2 or y.shape[1] != len(self.classes_):
                raise ValueError(f"expected an N x {len(self.classes_)} 0/1 label array, got shape {y.shape}")
            return y.astype(np.float32)
        unknown = sorted({str(v) for v in np.setdiff1d(y, self.classes_).tolist()})
        if unknown:
            raise ValueError(f"labels not seen in training: {unknown[:5]}")
        return one_hot(y, self.classes_)


def label_matrix(y) -> tuple[np.ndarray, np.ndarray, bool]:
    """(N x K float32 targets, the K classes, multi-label?) from class labels or a 0/1 matrix."""
    y = np.asarray(y)
    if y.ndim == 1:
        if len(y) == 0:
            raise ValueError("y is empty")
        classes = np.unique(y)
        if len(classes) < 2:
            raise ValueError(f"y holds one class only ({classes[0]!r}): a classifier needs at least two")
        return one_hot(y, classes), classes, False
    if y.ndim == 2:
        if y.shape[1] < 2:
            raise ValueError(f"a label matrix needs at least two columns, got shape {y.shape}")
        if not np.isin(y, (0, 1)).all():
            raise ValueError("a 2-D y must hold only 0 and 1 (one-hot or multi-hot rows)")
        multilabel = bool((y.sum(axis=1) != 1).any())
        return y.astype(np.float32), np.arange(y.shape[1]), multilabel
    raise ValueError(f"y must be N labels or an N x K 0/1 array, got shape {y.shape}")


def one_hot(y: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """N x K float32 rows, a 1 in the column of each label's class (`classes` in column order)."""
    return (np.asarray(y)[:, None] == classes[None, :]).astype(np.float32)


def images_key(X) -> str:
    """A digest of the images (shape, dtype and bytes): which test set a stored run predicted."""
    digest = hashlib.blake2b(digest_size=16)
    for image in (X if isinstance(X, (list, tuple)) else [X]):
        image = np.ascontiguousarray(image)
        digest.update(f"{image.shape}{image.dtype}".encode())
        digest.update(image.tobytes())
    return digest.hexdigest()


def _length(X) -> int:
    return len(X) if isinstance(X, (list, tuple)) else int(np.asarray(X).shape[0])


class _ProgressBar:
    """A rich progress bar over the budget's seconds, when asked for (and rich imports)."""

    def __init__(self, enabled: bool, budget: float):
        self.enabled, self.budget, self.bar, self.task = enabled, budget, None, None

    def __enter__(self) -> "_ProgressBar":
        if self.enabled:
            try:
                from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

                self.bar = Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), transient=False)
                self.bar.start()
                self.task = self.bar.add_task("AutoDL run", total=self.budget)
            except ImportError:
                self.bar = None
        return self

    def update(self, seconds: float, n_predictions: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=min(seconds, self.budget),
                            description=f"AutoDL run: {n_predictions} predictions, last at {seconds:.1f}s")

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()
