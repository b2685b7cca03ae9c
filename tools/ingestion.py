"""Local ingestion: drive a model.py through the kit's train/test protocol in its own process.

Run by `tools.runner` as `python -m tools.ingestion ...` (a subprocess in its own
process group, so the runner can kill it when the time budget is used up, as the
kit's scoring program does). What it writes follows the kit's ingestion program:

* `start.txt` (ingestion_pid, task_name, time_budget, start_time) once
  `Model.__init__` has returned (init has its own limit and is not scored);
* per prediction k: the line `k: <unix time>` appended to start.txt, THEN
  `<task>.predict_k` (`%g` values, space-separated, written atomically);
* `end.txt` (ingestion_duration, ingestion_success, end_time) when it stops by itself.

Stricter than the kit on purpose: a prediction with NaN/inf values is an error
(the kit would score it silently). A small JSON status file (--status-file) tells
the runner which stage the run is in and why it failed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
import traceback
from pathlib import Path

from tools.tf_support import import_tensorflow

START_FILE = "start.txt"
END_FILE = "end.txt"


class InitTimeout(Exception):
    """Model.__init__ did not return within the init limit."""


class IngestionError(Exception):
    """The model broke the protocol (bad prediction, missing method...)."""


class StatusFile:
    """The stage and outcome of the run, rewritten atomically for the runner to read."""

    def __init__(self, path: str | None):
        self.path = Path(path) if path else None
        self.data: dict = {"stage": "starting", "n_predictions": 0, "error": None}

    def set(self, **fields) -> None:
        self.data.update(fields)
        if self.path is None:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)


def write_start_file(output_dir: Path, task_name: str, time_budget: float, start_time: float) -> None:
    with open(output_dir / START_FILE, "w") as f:
        f.write(f"ingestion_pid: {os.getpid()}\n")
        f.write(f"task_name: {task_name}\n")
        f.write(f"time_budget: {time_budget}\n")
        f.write(f"start_time: {start_time}\n")


def write_prediction(output_dir: Path, task_name: str, k: int, prediction) -> None:
    """Timestamp line first, then the file (renamed into place, so readers never see half of it)."""
    with open(output_dir / START_FILE, "a") as f:
        f.write(f"{k}: {time.time()}\n")
    tmp = output_dir / f".tmp_{task_name}.predict_{k}"
    with open(tmp, "w") as f:
        for row in prediction:
            f.write(" ".join(f"{float(v):g}" for v in row) + "\n")
    os.replace(tmp, output_dir / f"{task_name}.predict_{k}")


def write_end_file(output_dir: Path, start_time: float, success: bool) -> None:
    end_time = time.time()
    with open(output_dir / END_FILE, "w") as f:
        f.write(f"ingestion_duration: {end_time - start_time}\n")
        f.write(f"ingestion_success: {int(success)}\n")
        f.write(f"end_time: {end_time}\n")


def check_prediction(prediction, expected_shape: tuple[int, int], k: int):
    """The kit's shape rule (exactly (n_test, output_dim)) plus finiteness."""
    import numpy as np

    shape = getattr(prediction, "shape", None)
    if shape is None:
        raise IngestionError(f"Model.test returned {type(prediction).__name__}, expected a NumPy array or None")
    if tuple(shape) != tuple(expected_shape):
        raise IngestionError(f"bad prediction shape for prediction {k}: expected {tuple(expected_shape)}, "
                             f"got {tuple(shape)}")
    array = np.asarray(prediction, dtype=np.float64)
    if not np.all(np.isfinite(array)):
        raise IngestionError(f"prediction {k} contains NaN or infinite values")
    return array


def import_model_class(code_dir: Path):
    """`from model import Model` with code_dir APPENDED to sys.path, as the kit does."""
    sys.path.append(str(code_dir))
    import model  # noqa: the participant's model.py

    origin = Path(getattr(model, "__file__", "") or "").resolve()
    if origin.parent != code_dir.resolve():
        raise IngestionError(f"`import model` loaded {origin}, not {code_dir / 'model.py'}: another module "
                             "named 'model' shadows it")
    if not hasattr(model, "Model"):
        raise IngestionError(f"{origin} defines no class Model")
    return model.Model


def create_model(code_dir: Path, metadata, init_limit: float):
    """Import model.py and build Model(metadata) under a SIGALRM limit (not counted in the budget)."""

    def on_alarm(signum, frame):
        raise InitTimeout(f"Model.__init__ (with the import of model.py) exceeded the init limit of {init_limit:g} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, init_limit)
    try:
        model_class = import_model_class(code_dir)
        return model_class(metadata)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _log(message: str) -> None:
    print(f"[ingestion] {message}", flush=True)


def run_loop(model, train_ds, test_ds, output_dir: Path, task_name: str, start_time: float, time_budget: float,
             expected_shape: tuple[int, int], status: StatusFile, after_call=None, on_prediction=None,
             log=_log) -> str:
    """train/test rounds until done_training, a None prediction or the end of the budget; returns why it stopped.

    The kit's loop for both runners: `tools run` (here, in the ingestion's own process, killed from outside at
    start + T) and `tools run-npz` (in-process). What differs is passed in: `after_call()` runs after each
    train and each test call (run-npz raises there when the call ended past start + T), `on_prediction(t,
    array)` after prediction k is written at t seconds (run-npz's live scores), `log(message)` prints the
    progress lines (None: silent).
    """
    for method in ("train", "test"):
        if not callable(getattr(model, method, None)):
            raise IngestionError(f"the Model object has no method `{method}`")
    if log is not None and not hasattr(model, "done_training"):
        log("warning: Model has no attribute `done_training`; it runs until test returns None or the budget ends")
    k = 0
    while not getattr(model, "done_training", False):
        remaining = start_time + time_budget - time.time()
        status.set(stage="train", round=k)
        model.train(train_ds, remaining_time_budget=remaining)
        if after_call is not None:
            after_call()
        remaining = start_time + time_budget - time.time()
        status.set(stage="test", round=k)
        prediction = model.test(test_ds, remaining_time_budget=remaining)
        if after_call is not None:
            after_call()
        if prediction is None:
            return "test returned None"
        array = check_prediction(prediction, expected_shape, k)
        write_prediction(output_dir, task_name, k, array)
        if on_prediction is not None:
            on_prediction(time.time() - start_time, array)
        k += 1
        status.set(n_predictions=k)
        if log is not None:
            log(f"prediction {k - 1} written at t={time.time() - start_time:.2f}s")
        if start_time + time_budget - time.time() <= 0:
            return "time budget used"
    return "done_training"


def ingest(code_dir: str, dataset_dir: str, output_dir: str, time_budget: float, tf_mode: str = "graph",
           init_limit: float = 1200.0, status_path: str | None = None) -> int:
    """The whole ingestion; returns the process exit code (0 success, 1 model/protocol failure)."""
    status = StatusFile(status_path)
    code_dir_p, output_dir_p = Path(code_dir), Path(output_dir)
    output_dir_p.mkdir(parents=True, exist_ok=True)

    status.set(stage="import")
    import_tensorflow(mode=tf_mode, quiet=False)
    from autodl_data.autodl_format import AutoDLDataset, find_task

    status.set(stage="datasets")
    task = find_task(dataset_dir, check_solution=False)
    train = AutoDLDataset(task.train_dir)
    test = AutoDLDataset(task.test_dir)
    test_meta = test.get_metadata()
    expected_shape = (test_meta.size(), test_meta.get_output_size())
    train_ds, test_ds = train.get_dataset(), test.get_dataset()

    status.set(stage="init")
    model, init_error = None, None
    init_t0 = time.time()
    try:
        model = create_model(code_dir_p, train.get_metadata(), init_limit)
    except BaseException as exc:  # noqa: BLE001 - any failure of participant code is reported, not raised
        if isinstance(exc, KeyboardInterrupt):
            raise
        init_error = exc
        traceback.print_exc()
    init_seconds = time.time() - init_t0

    start_time = time.time()
    write_start_file(output_dir_p, task.name, time_budget, start_time)
    status.set(stage="running", start_time=start_time, init_seconds=init_seconds)
    success, reason = False, None
    try:
        if init_error is not None:
            raise IngestionError(f"model initialisation failed: {type(init_error).__name__}: {init_error}")
        reason = run_loop(model, train_ds, test_ds, output_dir_p, task.name, start_time, time_budget,
                          expected_shape, status)
        success = True
    except Exception as exc:  # noqa: BLE001
        if not isinstance(exc, IngestionError) or init_error is None:
            traceback.print_exc()
        message = str(exc) if isinstance(exc, IngestionError) else f"{type(exc).__name__}: {exc}"
        status.set(error=message)
        print(f"[ingestion] failed in stage {status.data['stage']}: {message}", flush=True)
    write_end_file(output_dir_p, start_time, success)
    status.set(stage="finished", success=success, stop_reason=reason)
    print(f"[ingestion] end: success={success} reason={reason} duration={time.time() - start_time:.2f}s", flush=True)
    return 0 if success else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.ingestion", description=__doc__.splitlines()[0])
    parser.add_argument("--code-dir", required=True)
    parser.add_argument("--dataset-dir", required=True)
    parser.add_argument("--output-dir", required=True, help="prediction folder (start.txt, predictions, end.txt)")
    parser.add_argument("--time-budget", type=float, required=True)
    parser.add_argument("--tf-mode", choices=("graph", "eager"), default="graph")
    parser.add_argument("--init-limit", type=float, default=1200.0)
    parser.add_argument("--status-file")
    args = parser.parse_args(argv)
    if not (args.time_budget > 0 and math.isfinite(args.time_budget)):
        parser.error("--time-budget must be a positive number")
    return ingest(args.code_dir, args.dataset_dir, args.output_dir, args.time_budget, args.tf_mode,
                  args.init_limit, args.status_file)


if __name__ == "__main__":
    sys.exit(main())
