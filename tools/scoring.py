"""Score a prediction folder the way the kit's scoring program does.

A prediction folder holds what ingestion writes: `start.txt` (start_time,
time_budget, then one `k: <unix time>` line per prediction), `<task>.predict_k`
files and, at the end, `end.txt`. The NAUC of each prediction and the ALC of the
step learning curve come from `autodl_core.metrics` (the project's single
implementation), with the kit's conventions: prediction k is timed by line `k` of
start.txt, files are taken in k order, and late predictions are not clipped.

`Scorer` scores incrementally (the runner polls it while ingestion runs);
`score_prediction_dir` is the one-shot version, also runnable as
`python -m tools.scoring --solution FILE --prediction-dir DIR [--score-dir DIR]`.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import yaml

from autodl_core import metrics
from tools.errors import UserInputError

START_FILE = "start.txt"
END_FILE = "end.txt"


class PredictionFileError(UserInputError):
    """A prediction file that cannot be scored (unreadable, wrong shape, NaN)."""


@dataclass
class StartInfo:
    """What ingestion recorded in start.txt."""

    start_time: float
    time_budget: float
    task_name: str | None
    ingestion_pid: int | None
    timestamps: list[float]  # unix times of predictions 0, 1, ...


@dataclass
class ScoreSummary:
    """Everything scores.json holds (times are seconds since start_time)."""

    task_name: str
    time_budget: float
    start_time: float | None
    alc: float
    final_nauc: float | None
    n_predictions: int
    duration: float  # t of the last prediction (kit's 'Duration'), 0 without prediction
    time_to_first_prediction: float | None
    timestamps: list[float] = field(default_factory=list)
    naucs: list[float] = field(default_factory=list)
    accuracy: list[float] | None = None  # only for multi-class tasks, as in the kit
    prediction_files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def task_name_from_solution(solution_path: str | os.PathLike) -> str:
    """The kit's rule: the solution file name up to its first dot."""
    return Path(solution_path).name.split(".")[0]


def load_solution(solution_path: str | os.PathLike) -> np.ndarray:
    """Read `<task>.solution` as a 2-D 0/1 array and check that NAUC is defined on it."""
    path = Path(solution_path)
    if not path.is_file():
        raise UserInputError(f"solution file not found: {path}")
    try:
        from autodl_data.autodl_format import read_solution
    except ImportError:  # reader not available: plain text, one row per example
        solution = np.loadtxt(path, ndmin=2)
    else:
        solution = np.asarray(read_solution(path))
    if solution.ndim == 1:
        solution = solution.reshape(-1, 1)
    if solution.size == 0:
        raise UserInputError(f"solution file {path} is empty")
    if len(metrics.valid_columns(solution)) == 0:
        raise UserInputError(
            f"solution file {path}: no label column holds both positives and negatives, "
            "so NAUC is undefined (the kit's scorer would crash on it)"
        )
    return solution


def read_start_file(prediction_dir: str | os.PathLike) -> StartInfo | None:
    """Parse start.txt like the kit (YAML); None while it does not exist or is half-written."""
    path = Path(prediction_dir) / START_FILE
    if not path.is_file():
        return None
    try:
        info = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return None  # a line is being appended right now
    if not isinstance(info, dict) or "start_time" not in info or "time_budget" not in info:
        return None
    timestamps = []
    while len(timestamps) in info:
        timestamps.append(float(info[len(timestamps)]))
    pid = info.get("ingestion_pid")
    task = info.get("task_name")
    return StartInfo(
        start_time=float(info["start_time"]),
        time_budget=float(info["time_budget"]),
        task_name=None if task is None else str(task),
        ingestion_pid=None if pid is None else int(pid),
        timestamps=timestamps,
    )


def read_end_file(prediction_dir: str | os.PathLike) -> dict | None:
    """end.txt as a dict (ingestion_duration, ingestion_success, end_time), None if absent."""
    path = Path(prediction_dir) / END_FILE
    if not path.is_file():
        return None
    try:
        info = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return None
    return info if isinstance(info, dict) else None


def list_prediction_files(prediction_dir: str | os.PathLike, task_name: str) -> list[tuple[int, Path]]:
    """`<task>.predict_k` files sorted by k (temporary files of an atomic write are ignored)."""
    pattern = re.compile(re.escape(task_name) + r"\.predict_(\d+)")
    found = []
    for path in Path(prediction_dir).iterdir():
        match = pattern.fullmatch(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def read_prediction(path: str | os.PathLike, expected_shape: tuple[int, int]) -> np.ndarray:
    """Load one prediction file, refusing anything the solution cannot be scored against."""
    path = Path(path)
    try:
        prediction = np.loadtxt(path, ndmin=2, dtype=np.float64)
    except (ValueError, OSError) as exc:
        raise PredictionFileError(f"cannot read prediction file {path}: {exc}") from exc
    if prediction.shape != tuple(expected_shape):
        raise PredictionFileError(
            f"prediction file {path} has shape {prediction.shape}, expected {tuple(expected_shape)} "
            "(one row per test example, one column per class)"
        )
    if not np.all(np.isfinite(prediction)):
        raise PredictionFileError(f"prediction file {path} contains NaN or infinite values")
    return prediction


class Scorer:
    """Incremental scorer of one prediction folder against one solution.

    `update()` scores the prediction files that appeared since the last call and
    returns the current `ScoreSummary`; it is cheap to call every second.
    """

    def __init__(self, solution_path: str | os.PathLike, prediction_dir: str | os.PathLike,
                 task_name: str | None = None, time_budget: float | None = None):
        self.solution_path = Path(solution_path)
        self.prediction_dir = Path(prediction_dir)
        self.task_name = task_name or task_name_from_solution(solution_path)
        self.solution = load_solution(solution_path)
        self.multiclass = metrics.is_multiclass(self.solution)
        self.time_budget = time_budget
        self.start: StartInfo | None = None
        self.files: list[Path] = []
        self.naucs: list[float] = []
        self.accuracy: list[float] = []

    def update(self, final: bool = False) -> ScoreSummary:
        """Score new predictions. With `final`, a missing start.txt or timestamp is an error."""
        start = read_start_file(self.prediction_dir)
        if start is None:
            if final and list_prediction_files(self.prediction_dir, self.task_name):
                raise UserInputError(f"{self.prediction_dir / START_FILE} is missing or unreadable")
            return self.summary()
        self.start = start
        for k, path in list_prediction_files(self.prediction_dir, self.task_name):
            if k < len(self.files):
                continue
            if k > len(self.files):
                raise PredictionFileError(
                    f"prediction {path.name} found but {self.task_name}.predict_{len(self.files)} is missing"
                )
            if k >= len(start.timestamps):
                if final:
                    raise PredictionFileError(
                        f"prediction {path.name} has no '{k}: <time>' line in {START_FILE}"
                    )
                break  # its timestamp line has not been read yet; next poll
            prediction = read_prediction(path, self.solution.shape)
            self.naucs.append(metrics.nauc(self.solution, prediction))
            if self.multiclass:
                self.accuracy.append(metrics.soft_accuracy(self.solution, prediction))
            self.files.append(path)
        return self.summary()

    def summary(self) -> ScoreSummary:
        budget = self.time_budget
        if budget is None:
            budget = self.start.time_budget if self.start else float("nan")
        n = len(self.files)
        times = []
        if self.start is not None:
            times = [t - self.start.start_time for t in self.start.timestamps[:n]]
        return ScoreSummary(
            task_name=self.task_name,
            time_budget=budget,
            start_time=self.start.start_time if self.start else None,
            alc=metrics.alc(times, self.naucs, budget) if n else 0.0,
            final_nauc=self.naucs[-1] if n else None,
            n_predictions=n,
            duration=times[-1] if n else 0.0,
            time_to_first_prediction=times[0] if n else None,
            timestamps=times,
            naucs=list(self.naucs),
            accuracy=list(self.accuracy) if self.multiclass else None,
            prediction_files=[p.name for p in self.files],
        )


def score_prediction_dir(solution_path: str | os.PathLike, prediction_dir: str | os.PathLike,
                         task_name: str | None = None) -> ScoreSummary:
    """Score every prediction of a finished run."""
    prediction_dir = Path(prediction_dir)
    if not prediction_dir.is_dir():
        raise UserInputError(f"prediction folder not found: {prediction_dir}")
    scorer = Scorer(solution_path, prediction_dir, task_name=task_name)
    summary = scorer.update(final=True)
    if scorer.start is None:
        raise UserInputError(f"{prediction_dir / START_FILE} is missing: not an ingestion output folder")
    return summary


def kit_scores_text(summary: ScoreSummary) -> str:
    """scores.txt in the kit's layout (score = ALC, Duration = t of the last prediction)."""
    lines = [
        f"score: {summary.alc!r}",
        f"Duration: {summary.duration!r}",
        f"timestamps: {[float(t) for t in summary.timestamps]}",
        f"nauc_scores: {[float(s) for s in summary.naucs]}",
    ]
    if summary.accuracy is not None:
        lines.append(f"accuracy: {[float(a) for a in summary.accuracy]}")
    return "\n".join(lines) + "\n"


def parse_kit_scores_text(text: str) -> dict:
    """Numbers from a scores.txt (ours or the kit's, whose lists may print `np.float64(x)`)."""
    number = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|nan|inf"
    out: dict = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        values = [float(v) for v in re.findall(number, value.replace("np.float64", ""))]
        if key in ("score", "Duration") and values:
            out[key] = values[0]
        elif key in ("timestamps", "nauc_scores", "accuracy"):
            out[key] = values
    return out


def write_scores(summary: ScoreSummary, score_dir: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write scores.json (summary plus `extra`, e.g. status and peak memory) and a kit-like scores.txt."""
    score_dir = Path(score_dir)
    score_dir.mkdir(parents=True, exist_ok=True)
    data = summary.to_dict()
    data.update(extra or {})
    json_path = score_dir / "scores.json"
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, allow_nan=True) + "\n")
    os.replace(tmp, json_path)
    (score_dir / "scores.txt").write_text(kit_scores_text(summary))
    return json_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.scoring", description=__doc__.splitlines()[0])
    parser.add_argument("--solution", required=True, help="the task's <task>.solution file")
    parser.add_argument("--prediction-dir", required=True, help="folder with start.txt and <task>.predict_k")
    parser.add_argument("--score-dir", help="where to write scores.json and scores.txt")
    args = parser.parse_args(argv)
    try:
        summary = score_prediction_dir(args.solution, args.prediction_dir)
    except UserInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.score_dir:
        write_scores(summary, args.score_dir)
    final = float("nan") if summary.final_nauc is None else summary.final_nauc
    print(f"ALC={summary.alc:.6f} NAUC={final:.6f} n_predictions={summary.n_predictions} "
          f"duration={summary.duration:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
