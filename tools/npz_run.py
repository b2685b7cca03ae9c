"""`tools run-npz`: the kit's ingestion and scoring in this process, on a corpus data.npz, without TensorFlow.

For machines where TensorFlow cannot be installed (a GPU box with torch only). The corpus folder is
loaded into `autodl_core.arrays` datasets (in the order `tools convert` gives the kit); model.py
from --code-dir gets an ArrayMetadata and plays the kit's protocol as tools.ingestion runs it:
Model.__init__ (with the import of model.py) timed apart and unscored, then the clock starts and
train/test alternate until done_training, a None prediction or the end of the budget. Where
`tools run` kills the ingestion at start + T, a SIGALRM at start + T interrupts the model here (a
BaseException, which the solver's own error handling does not swallow) and nothing returned after T
counts. Predictions are checked and written as tools.ingestion writes them (start.txt,
<task>.predict_k, end.txt), next to the test labels as OUT/<task>.solution, and scored by
tools.scoring from those files, so `python -m tools.scoring` rescoring the folder gets the same
numbers. Outputs: OUT/scores/{scores.json, scores.txt, learning-curve.png, report.html}.

    tools run-npz --code-dir DIR --dataset-dir CORPUS_DIR --time-budget T --out OUT
                  [--pipeline-json JSON] [--init-limit 1200] [--no-progress]
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import resource
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

from tools.errors import UserInputError
from tools.ingestion import IngestionError, StatusFile, create_model, run_loop, write_end_file, write_start_file

OUTPUTS = ("predictions", "scores")


class BudgetExceeded(BaseException):
    """Raised into the model at start + T, where `tools run` would kill the ingestion."""


def validate_inputs(code_dir, dataset_dir, time_budget, init_limit) -> tuple[Path, Path, float]:
    from tools.runner import validate_run_inputs

    code_dir, time_budget = validate_run_inputs(code_dir, time_budget, init_limit)
    dataset_dir = Path(dataset_dir)
    if not (dataset_dir / "data.npz").is_file():
        raise UserInputError(f"no data.npz in {dataset_dir} (expected a corpus dataset folder)")
    return code_dir, dataset_dir.resolve(), time_budget


def run_npz(code_dir, dataset_dir, time_budget: float, out_dir, pipeline_json: str | None = None,
            init_limit: float = 1200.0, progress: bool = False, data: tuple | None = None) -> dict:
    """Run model.py in `code_dir` on the corpus folder `dataset_dir` for `time_budget` seconds; score it.

    `data`: what `load_corpus_npz(dataset_dir)` returned, when the caller has decoded the folder
    already (a benchmark running several pipelines on it). Returns the scores.json content: tools run's
    fields (ScoreSummary, status 'ok' / 'ingestion_error' / 'time_budget_exceeded' / 'scoring_error',
    error, note, init_seconds, peak_rss_bytes: this process's peak so far...) plus device,
    gpu_peak_bytes, solver_stats and tensorflow_imported.
    """
    code_dir, dataset_dir, time_budget = validate_inputs(code_dir, dataset_dir, time_budget, init_limit)
    # model.py and the packages next to it come first (a packaged submission runs its own autodl_core,
    # as under the kit), so nothing from autodl_core may be imported before this line.
    sys.path.insert(0, str(code_dir))
    with _pipeline_env(pipeline_json):
        return _run(code_dir, dataset_dir, time_budget, Path(out_dir).resolve(), pipeline_json, init_limit, progress,
                    data)


@contextlib.contextmanager
def _pipeline_env(value: str | None):
    """AUTODL_PIPELINE_JSON set for the run (checked first: a bad value is the user's error), then restored."""
    if value is None:
        yield
        return
    from meta_db.selector import ENV_PIPELINE, forced_pipeline

    try:
        forced_pipeline(value)
    except ValueError as exc:
        raise UserInputError(f"--pipeline-json: {exc}") from None
    previous = os.environ.get(ENV_PIPELINE)
    os.environ[ENV_PIPELINE] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(ENV_PIPELINE, None)
        else:
            os.environ[ENV_PIPELINE] = previous


def _run(code_dir: Path, dataset_dir: Path, time_budget: float, out: Path, pipeline_json, init_limit: float,
         progress: bool, data) -> dict:
    from autodl_data.corpus_npz import load_corpus_npz
    from tools.scoring import PredictionFileError, Scorer, write_scores

    try:
        train, test, info = data or load_corpus_npz(dataset_dir)
    except ValueError as exc:
        raise UserInputError(str(exc)) from None
    out.mkdir(parents=True, exist_ok=True)
    for name in OUTPUTS:  # a rerun into the same folder starts clean
        shutil.rmtree(out / name, ignore_errors=True)
    pred_dir, score_dir = out / "predictions", out / "scores"
    pred_dir.mkdir()
    task = re.sub(r"[^A-Za-z0-9_\-]+", "_", info["name"])  # scoring cuts the task name at its first dot
    solution_path = out / f"{task}.solution"
    solution_path.write_text("".join(" ".join(f"{v:g}" for v in row) + "\n" for row in test.labels))
    scorer = Scorer(solution_path, pred_dir, task_name=task, time_budget=time_budget)

    wall0 = time.time()
    run = _ingest(code_dir, train, test, pred_dir, task, time_budget, init_limit, progress, scorer.solution,
                  info["name"])
    try:
        summary = scorer.update(final=True)
    except PredictionFileError as exc:
        run.error = f"{run.error}\n{exc}" if run.error else str(exc)
        run.status = "scoring_error" if run.status == "ok" else run.status
        summary = scorer.summary()

    torch = sys.modules.get("torch")  # only a model that imported torch can hold GPU memory
    cuda = torch is not None and torch.cuda.is_available()
    extra = {
        "status": run.status, "error": run.error, "note": run.note, "stop_reason": run.reason,
        "init_seconds": run.init_seconds, "peak_rss_bytes": _peak_rss_bytes(),
        "gpu_peak_bytes": int(torch.cuda.max_memory_allocated()) if cuda else None,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "solver_stats": run.solver_stats,
        "tensorflow_imported": "tensorflow" in sys.modules,
        "runner": "run-npz", "code_dir": str(code_dir), "dataset_dir": str(dataset_dir),
        "solution": str(solution_path), "n_train": len(train), "n_test": len(test), "pipeline_json": pipeline_json,
        "wall_time": time.time() - wall0, "out_dir": str(out),
    }
    write_scores(summary, score_dir, extra)
    result = {**summary.to_dict(), **extra}
    write_report(result, score_dir)
    result["report"] = str(score_dir / "report.html")
    result["learning_curve"] = str(score_dir / "learning-curve.png")
    return result


def _peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (the kernel's own maximum: no polling gap)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def _ingest(code_dir: Path, train, test, pred_dir: Path, task: str, time_budget: float, init_limit: float,
            progress: bool, solution, dataset_name: str) -> SimpleNamespace:
    """tools.ingestion.ingest in this process; returns status, error, note, reason, init_seconds, solver_stats."""
    from autodl_core import arrays
    from tools.runner import Progress

    run = SimpleNamespace(status=None, error=None, note=None, reason=None, init_seconds=None, solver_stats=None)
    display = Progress(progress, task, time_budget)
    stage = StatusFile(None)  # in memory: which stage the budget or an error stopped
    stage.set(stage="init")
    model, init_error = None, None
    init_t0 = time.time()
    try:
        sys.modules.pop("model", None)  # an earlier run in this process imported another model.py
        model = create_model(code_dir, arrays.ArrayMetadata(train, name=dataset_name), init_limit)
    except Exception as exc:  # noqa: BLE001 - any failure of participant code is reported, not raised
        init_error = exc
        traceback.print_exc()
    run.init_seconds = time.time() - init_t0

    start_time = time.time()
    write_start_file(pred_dir, task, time_budget, start_time)
    live = _LiveScores(display, solution, start_time, time_budget)
    try:
        if init_error is not None:
            raise IngestionError(f"model initialisation failed: {type(init_error).__name__}: {init_error}")
        # the kit's loop, with what `tools run`'s kill at start + T means in-process: the alarm, and a call
        # that returned after start + T does not count
        run.reason = _until(start_time + time_budget, run_loop, model, train, test, pred_dir, task, start_time,
                            time_budget, (len(test), int(test.labels.shape[1])), stage,
                            after_call=lambda: _check_budget(start_time, time_budget), on_prediction=live.add, log=None)
        run.status = "ok"
    except BudgetExceeded:
        run.status = "time_budget_exceeded"
        run.note = (f"stopped at the time budget during stage '{stage.data['stage']}' (round "
                    f"{stage.data.get('round')}), where `tools run` kills the ingestion; predictions made so far "
                    "are scored")
    except Exception as exc:  # noqa: BLE001
        if not isinstance(exc, IngestionError) or init_error is None:
            traceback.print_exc()
        run.status = "ingestion_error"
        run.error = str(exc) if isinstance(exc, IngestionError) else f"{type(exc).__name__}: {exc}"
        print(f"[run-npz] failed in stage {stage.data['stage']}: {run.error}", file=sys.stderr, flush=True)
    finally:
        display.stop()
    if run.status != "time_budget_exceeded":  # a killed ingestion writes no end.txt
        write_end_file(pred_dir, start_time, run.status == "ok")
    run.solver_stats = _solver_stats(model)
    return run


def _until(end_time: float, fn, *args, **kwargs):
    """fn(*args, **kwargs) with BudgetExceeded raised into it at `end_time` (SIGALRM); the alarm is off on any
    exit, and one that fires on the way out still surfaces as BudgetExceeded, never inside the caller's handlers."""
    previous = signal.signal(signal.SIGALRM, _raise_budget_exceeded)
    signal.setitimer(signal.ITIMER_REAL, max(end_time - time.time(), 1e-3))
    try:
        return fn(*args, **kwargs)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _raise_budget_exceeded(signum, frame):
    raise BudgetExceeded()


def _check_budget(start_time: float, time_budget: float) -> None:
    """A call that returned after start + T (inside C code the alarm waits for it) would have been killed."""
    if time.time() >= start_time + time_budget:
        raise BudgetExceeded()


class _LiveScores:
    """NAUC/ALC so far for the progress display; computed only when it is shown (it costs the model time)."""

    def __init__(self, display, solution, start_time: float, time_budget: float):
        self.display, self.solution = display, solution
        self.start_time, self.time_budget = start_time, time_budget
        self.times: list[float] = []
        self.naucs: list[float] = []
        display.update(None, start_time, _peak_rss_bytes())

    def add(self, t: float, prediction) -> None:
        if self.display.live is None:
            return
        from autodl_core import metrics

        self.times.append(t)
        self.naucs.append(metrics.nauc(self.solution, prediction))
        summary = SimpleNamespace(n_predictions=len(self.naucs), final_nauc=self.naucs[-1],
                                  alc=metrics.alc(self.times, self.naucs, self.time_budget))
        self.display.update(summary, self.start_time, _peak_rss_bytes())


def _solver_stats(model):
    """model.solver.stats() when the model has one (the project's solver), JSON-ready; None otherwise."""
    stats = getattr(getattr(model, "solver", None), "stats", None)
    if not callable(stats):
        return None
    try:
        return json.loads(json.dumps(stats(), default=lambda v: v.item() if hasattr(v, "item") else str(v)))
    except Exception as exc:  # noqa: BLE001 - a half-updated solver (stopped at the budget) must not lose the run
        return {"error": f"{type(exc).__name__}: {exc}"}


def write_report(result: dict, score_dir: Path) -> None:
    from tools.report import plot_learning_curve, write_html_report

    png = plot_learning_curve(result["timestamps"], result["naucs"], result["time_budget"],
                              score_dir / "learning-curve.png", alc=result["alc"],
                              title=f"{result['task_name']} ({result['status']}, run-npz)")
    details = {"code dir": result["code_dir"], "dataset dir": result["dataset_dir"],
               "readers": "numpy, no TensorFlow (tools run-npz)", "device": result["device"],
               "GPU peak (GB)": "-" if result["gpu_peak_bytes"] is None else f"{result['gpu_peak_bytes'] / 1e9:.2f}",
               "init (s, unscored)": "-" if result["init_seconds"] is None else f"{result['init_seconds']:.2f}",
               "wall time (s)": f"{result['wall_time']:.1f}"}
    if result.get("note"):
        details["note"] = result["note"]
    write_html_report(result, png, score_dir / "report.html", details=details)


def key_numbers(result: dict) -> dict:
    """The JSON line printed before the final line: what a benchmark script collects."""
    keys = ("task_name", "status", "alc", "final_nauc", "n_predictions", "time_to_first_prediction", "duration",
            "init_seconds", "peak_rss_bytes", "gpu_peak_bytes", "device", "time_budget")
    return {key: result.get(key) for key in keys}


def _cli(args) -> int:
    from tools.runner import final_line

    progress = not args.no_progress
    if progress and importlib.util.find_spec("rich") is None:
        print("note: rich is not installed; running without the progress display", file=sys.stderr)
        progress = False
    result = run_npz(args.code_dir, args.dataset_dir, args.time_budget, args.out, pipeline_json=args.pipeline_json,
                     init_limit=args.init_limit, progress=progress)
    print(f"status: {result['status']}", file=sys.stderr)
    for key in ("error", "note"):
        if result.get(key):
            print(f"{key}: {result[key]}", file=sys.stderr)
    print(f"report: {result['report']}", file=sys.stderr)
    print(json.dumps(key_numbers(result)), flush=True)
    print(final_line(result), flush=True)
    return 0 if result["n_predictions"] > 0 else 3


def register(subparsers) -> None:
    parser = subparsers.add_parser("run-npz", help="run a model.py on a corpus data.npz without TensorFlow, "
                                                   "in-process, and score it like the kit",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("--code-dir", required=True, help="folder holding model.py")
    parser.add_argument("--dataset-dir", required=True, help="corpus dataset folder holding data.npz (+ info.json)")
    parser.add_argument("--time-budget", type=float, required=True, help="time budget T in seconds")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--pipeline-json", help="force a pipeline: a JSON object of PipelineConfig fields or a "
                                                "path to one (sets AUTODL_PIPELINE_JSON for the run)")
    parser.add_argument("--init-limit", type=float, default=1200.0,
                        help="seconds allowed to import model.py and run Model.__init__ (not scored)")
    parser.add_argument("--no-progress", action="store_true", help="no live progress display")
    parser.set_defaults(func=_cli)
