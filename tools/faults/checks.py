"""What a kit run of the fault suite must satisfy, read from the files the kit and the solver leave.

- every prediction file: (test examples x output_dim) numbers, all finite, all in [0, 1];
- no prediction stamped after T (the kit's own timestamps);
- no solver call that ends more than `MAX_OVERRUN_S` past the deadline it was given, or past its own
  start when that deadline had already passed (the solver logs each call's time left against its
  deadline: "train call 3 (probe) took 2.1s; remaining 14.0s");
- the kit's ingestion ended by itself, its end.txt saying success (the kit runner's status "ok": no crash,
  not killed at T; the runner may still stop an interpreter slow to shut down after that);
- peak memory within the solver's data cap plus the frameworks' allowance.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

MAX_OVERRUN_S = 1.0
_CALL_RE = re.compile(r"(train|test) call (\d+).*? took ([\d.]+)s; remaining (-?[\d.]+)s")
_KIT_PREDICTION_RE = re.compile(r"\[\+\] (\d+) predictions made, time spent so far ([\d.]+) sec")


def prediction_files(pred_dir: Path, task: str) -> list[Path]:
    """The kit's prediction files `<task>.predict_<i>`, in prediction order."""
    files = list(Path(pred_dir).glob(f"{task}.predict_*"))
    return sorted(files, key=lambda p: int(p.name.rsplit("_", 1)[1]) if p.name.rsplit("_", 1)[1].isdigit() else -1)


def check_prediction_file(path: Path, shape: tuple[int, int]) -> str | None:
    """None when the file holds `shape` finite numbers in [0, 1], else what is wrong with it."""
    try:
        values = np.loadtxt(path, ndmin=2, dtype=np.float64)
    except ValueError as exc:
        return f"{path.name}: not a numeric table ({exc})"
    if shape[0] == 0 and values.size == 0:
        return None
    if values.shape != tuple(shape):
        return f"{path.name}: shape {values.shape}, expected {tuple(shape)}"
    if not np.isfinite(values).all():
        return f"{path.name}: {int((~np.isfinite(values)).sum())} non-finite values"
    if values.min() < 0.0 or values.max() > 1.0:
        return f"{path.name}: values in [{values.min():.4g}, {values.max():.4g}], outside [0, 1]"
    return None


def check_predictions(pred_dir: Path, task: str, shape: tuple[int, int]) -> tuple[int, list[str]]:
    """(number of prediction files, problems found in them)."""
    files = prediction_files(pred_dir, task)
    problems = [p for p in (check_prediction_file(f, shape) for f in files) if p]
    return len(files), problems


def call_overruns(log_text: str) -> list[float]:
    """Seconds past its deadline that each solver call ended (<= 0: in time), from the solver's log.

    A call that starts with its deadline already past (a budget below the safety margin) is measured
    from its start instead: it cannot end before it began, it must return at once."""
    return [min(-float(m.group(4)), float(m.group(3))) for m in _CALL_RE.finditer(log_text)]


def kit_prediction_times(log_text: str) -> list[float]:
    """When the kit's ingestion saw each prediction made (its own clock, from its log): the record that
    survives when the kit's scoring cannot score (a solution whose label columns are all equal)."""
    return [float(m.group(2)) for m in _KIT_PREDICTION_RE.finditer(log_text)]


def degradations(log_text: str) -> int:
    """Solver steps that failed and were degraded around (logged with a traceback, never a crash)."""
    return log_text.count("keeping the last good predictions") + log_text.count("returning the last good predictions")


def verdict(row: dict) -> list[str]:
    """The promises a kit-case result row breaks (empty: all kept)."""
    broken = []
    if row.get("status") != "ok":
        broken.append(f"ingestion {row.get('status')} (exit {row.get('ingestion_rc')})")
    if row.get("n_predictions", 0) == 0:
        broken.append("no prediction")
    if row.get("prediction_problems"):
        broken.append("malformed predictions")
    last = row.get("last_prediction_s")
    if last is not None and last > row["time_budget"]:
        broken.append(f"prediction at {last:.1f}s > T")
    if (row.get("worst_overrun_s") or 0.0) > MAX_OVERRUN_S:
        broken.append(f"a call ended {row['worst_overrun_s']:.1f}s past its deadline")
    if row.get("peak_memory_gb", 0.0) > row.get("memory_limit_gb", np.inf):
        broken.append(f"peak memory {row['peak_memory_gb']:.2f} GB > {row['memory_limit_gb']:.2f} GB")
    return broken
