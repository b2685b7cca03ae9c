"""`tools run`: the kit's ingestion + scoring, locally, with live progress and a report.

The ingestion runs in a child process (`python -m tools.ingestion`, its own
process group); this parent plays the kit's scoring program: it scores each new
prediction as it appears, kills the ingestion when start_time + T passes
(SIGTERM, then SIGKILL after a grace period), then writes OUT/scores/
{scores.json, scores.txt, learning-curve.png, report.html}. It also records the
peak resident memory of the ingestion process tree (psutil polling), which the
benchmark reports.

    tools run --code-dir DIR --dataset-dir DIR --time-budget T --out OUT
              [--tf-mode graph|eager] [--init-limit 1200] [--no-progress]
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from tools.errors import UserInputError
from tools.scoring import PredictionFileError, Scorer, read_end_file, read_start_file, write_scores

POLL_SECONDS = 0.2
KILL_GRACE_SECONDS = 5.0
STARTUP_ALLOWANCE_SECONDS = 300.0  # imports + dataset building before Model.__init__ starts
OUTPUTS = ("predictions", "scores", "ingestion.log", "ingestion_status.json")


class MemoryWatcher:
    """Peak resident memory of a process and all its descendants, sampled on each `sample()`."""

    def __init__(self, pid: int):
        self.pid = pid
        self.peak_bytes = 0
        try:
            self.root = psutil.Process(pid)
        except psutil.Error:
            self.root = None

    def sample(self) -> int:
        if self.root is None:
            return self.peak_bytes
        total = 0
        try:
            procs = [self.root] + self.root.children(recursive=True)
        except psutil.Error:
            return self.peak_bytes
        for proc in procs:
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                pass
        self.peak_bytes = max(self.peak_bytes, total)
        return total


def kill_process_group(proc: subprocess.Popen, grace: float = KILL_GRACE_SECONDS) -> None:
    """SIGTERM the child's whole process group, SIGKILL it if still there after `grace` seconds."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # also reaps stragglers (data-loader workers...)
    except ProcessLookupError:
        pass
    proc.wait()


def validate_run_inputs(code_dir, time_budget, init_limit) -> tuple[Path, float]:
    """Clear errors for what every runner takes (`tools run`, `tools run-npz`): (code_dir, time_budget)."""
    code_dir = Path(code_dir)
    if not code_dir.is_dir():
        raise UserInputError(f"code folder not found: {code_dir}")
    if not (code_dir / "model.py").is_file():
        raise UserInputError(f"no model.py in code folder {code_dir}")
    try:
        time_budget = float(time_budget)
    except (TypeError, ValueError):
        raise UserInputError(f"time budget must be a number of seconds, got {time_budget!r}") from None
    if not (time_budget > 0 and math.isfinite(time_budget)):
        raise UserInputError(f"time budget must be a positive number of seconds, got {time_budget}")
    if not (init_limit > 0):
        raise UserInputError(f"init limit must be positive, got {init_limit}")
    return code_dir.resolve(), time_budget


def validate_inputs(code_dir, dataset_dir, time_budget, tf_mode, init_limit):
    """Clear errors for the user's inputs; returns (code_dir, TaskPaths, time_budget)."""
    from autodl_data.autodl_format import check_records, find_task

    code_dir, time_budget = validate_run_inputs(code_dir, time_budget, init_limit)
    if tf_mode not in ("graph", "eager"):
        raise UserInputError(f"tf mode must be 'graph' or 'eager', got {tf_mode!r}")
    task = find_task(dataset_dir)
    check_records(task)
    return code_dir, task, time_budget


class Progress:
    """Live status line (rich) while the run goes on; silent when disabled."""

    def __init__(self, enabled: bool, task_name: str, time_budget: float):
        self.live = None
        self.task_name, self.time_budget = task_name, time_budget
        if enabled:
            from rich.console import Console
            from rich.live import Live

            self.console = Console(stderr=True)
            self.live = Live(self._render(None, None, 0.0), console=self.console, refresh_per_second=4,
                             transient=False)
            self.live.start()

    def _render(self, summary, start_time, mem_bytes):
        from rich.table import Table

        table = Table(show_header=True, header_style="bold", title=f"tools run: {self.task_name}")
        for col in ("elapsed / budget", "predictions", "latest NAUC", "ALC so far", "memory"):
            table.add_column(col)
        if start_time is None:
            elapsed = "initialising"
        else:
            elapsed = f"{time.time() - start_time:6.1f} / {self.time_budget:g} s"
        n = summary.n_predictions if summary else 0
        nauc = f"{summary.final_nauc:.4f}" if summary and summary.final_nauc is not None else "-"
        alc = f"{summary.alc:.4f}" if summary and n else "-"
        table.add_row(elapsed, str(n), nauc, alc, f"{mem_bytes / 1e9:.2f} GB")
        return table

    def update(self, summary, start_time, mem_bytes):
        if self.live is not None:
            self.live.update(self._render(summary, start_time, mem_bytes))

    def stop(self):
        if self.live is not None:
            self.live.stop()
            if not self.console.is_terminal:
                self.console.print()  # the last frame has no newline of its own there


def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.setdefault("MPLBACKEND", "Agg")
    return env


def _tail(path: Path, n_chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n_chars:]
    except OSError:
        return ""


def run_local(code_dir, dataset_dir, time_budget: float, out_dir, tf_mode: str = "graph",
              init_limit: float = 1200.0, progress: bool = False, kill_grace: float = KILL_GRACE_SECONDS,
              python: str | None = None) -> dict:
    """Run model.py in `code_dir` on the task in `dataset_dir` for `time_budget` seconds; score it.

    Returns the scores.json content: ScoreSummary fields plus status ('ok', 'ingestion_error',
    'time_budget_exceeded', 'ingestion_died', 'init_timeout'), error, peak_rss_bytes, paths, etc.
    """
    code_dir, task, time_budget = validate_inputs(code_dir, dataset_dir, time_budget, tf_mode, init_limit)
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in OUTPUTS:  # a rerun into the same folder starts clean
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    pred_dir, score_dir = out / "predictions", out / "scores"
    pred_dir.mkdir()
    score_dir.mkdir()
    status_path, log_path = out / "ingestion_status.json", out / "ingestion.log"
    scorer = Scorer(task.solution_path, pred_dir, task_name=task.name, time_budget=time_budget)

    cmd = [python or sys.executable, "-m", "tools.ingestion", "--code-dir", str(code_dir),
           "--dataset-dir", str(Path(dataset_dir).resolve()), "--output-dir", str(pred_dir),
           "--time-budget", repr(time_budget), "--tf-mode", tf_mode, "--init-limit", repr(float(init_limit)),
           "--status-file", str(status_path)]
    wall0 = time.time()
    status, note, scoring_error = None, None, None
    display = Progress(progress, task.name, time_budget)
    with open(log_path, "wb") as log:
        # cwd = OUT, so that `-m` does not put the caller's folder (maybe one with a model.py) on sys.path
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=out, env=child_env(),
                                start_new_session=True)
        memory = MemoryWatcher(proc.pid)
        summary = scorer.summary()
        try:
            while True:
                memory.sample()
                start = scorer.start or read_start_file(pred_dir)
                if scoring_error is None:
                    try:
                        summary = scorer.update()
                    except PredictionFileError as exc:
                        scoring_error = str(exc)
                now = time.time()
                display.update(summary, start.start_time if start else None, memory.peak_bytes)
                if proc.poll() is not None:
                    break
                if start is not None and now >= start.start_time + time_budget:
                    kill_process_group(proc, kill_grace)
                    # end.txt written in time means the run was over; only the interpreter's shutdown
                    # (TensorFlow and torch teardown: > 3 s on a loaded 2-core CPU) reached T.
                    finished = read_end_file(pred_dir)
                    status = None if finished is not None else "time_budget_exceeded"
                    if finished is not None:
                        note = "ingestion had ended (end.txt) before T; its interpreter was stopped while shutting down"
                    break
                if start is None and now - wall0 > init_limit + STARTUP_ALLOWANCE_SECONDS:
                    kill_process_group(proc, kill_grace)
                    status = "init_timeout"
                    note = f"no start.txt after {now - wall0:.0f} s (init limit {init_limit:g} s): killed"
                    break
                time.sleep(POLL_SECONDS)
        finally:
            kill_process_group(proc, kill_grace)  # no-op when it already ended
            display.stop()

    if scoring_error is None:
        try:
            summary = scorer.update(final=True)
        except PredictionFileError as exc:
            scoring_error = str(exc)
            summary = scorer.summary()
    child_status = {}
    if status_path.is_file():
        try:
            child_status = json.loads(status_path.read_text())
        except json.JSONDecodeError:
            pass
    end_info = read_end_file(pred_dir)
    error = child_status.get("error")
    if status is None:
        if end_info is not None:
            status = "ok" if int(end_info.get("ingestion_success", 0)) == 1 else "ingestion_error"
        else:
            status = "ingestion_died"
            error = error or (f"ingestion exited with code {proc.returncode} without writing end.txt "
                              f"(stage: {child_status.get('stage')}); log tail:\n{_tail(log_path)}")
    elif status == "time_budget_exceeded":
        note = (f"killed at the time budget during stage '{child_status.get('stage')}' "
                f"(round {child_status.get('round')}); predictions made so far are scored")
    if scoring_error:
        error = f"{error}\n{scoring_error}" if error else scoring_error
        if status == "ok":
            status = "scoring_error"

    extra = {
        "status": status,
        "error": error,
        "note": note,
        "stop_reason": child_status.get("stop_reason"),
        "init_seconds": child_status.get("init_seconds"),
        "peak_rss_bytes": memory.peak_bytes,
        "ingestion_rc": proc.returncode,
        "tf_mode": tf_mode,
        "code_dir": str(code_dir),
        "dataset_dir": str(Path(dataset_dir).resolve()),
        "wall_time": time.time() - wall0,
        "out_dir": str(out),
    }
    write_scores(summary, score_dir, extra)
    result = {**summary.to_dict(), **extra}
    write_report(result, score_dir)
    result["report"] = str(score_dir / "report.html")
    result["learning_curve"] = str(score_dir / "learning-curve.png")
    return result


def write_report(result: dict, score_dir: Path) -> None:
    from tools.report import plot_learning_curve, write_html_report

    png = plot_learning_curve(result["timestamps"], result["naucs"], result["time_budget"],
                              score_dir / "learning-curve.png", alc=result["alc"],
                              title=f"{result['task_name']} ({result['status']})")
    details = {"code dir": result["code_dir"], "dataset dir": result["dataset_dir"], "TF mode": result["tf_mode"],
               "init (s, unscored)": _fmt_opt(result.get("init_seconds")), "wall time (s)": f"{result['wall_time']:.1f}"}
    if result.get("note"):
        details["note"] = result["note"]
    write_html_report(result, png, score_dir / "report.html", details=details)


def _fmt_opt(value):
    return "-" if value is None else f"{value:.2f}"


def final_line(result: dict) -> str:
    """The one-line summary, in the kit runner's format plus the time to the first prediction."""
    nauc = result["final_nauc"] if result["final_nauc"] is not None else 0.0
    first = result["time_to_first_prediction"]
    first_txt = "none" if first is None else f"{first:.2f}"
    return (f"ALC={result['alc']:.6f} NAUC={nauc:.6f} n_predictions={result['n_predictions']} "
            f"duration={result['duration']:.2f} first_prediction={first_txt}")


def _cli(args) -> int:
    from tools.tf_support import require_tensorflow

    require_tensorflow("the ingestion reads the dataset's TFRecords with it")
    result = run_local(args.code_dir, args.dataset_dir, args.time_budget, args.out, tf_mode=args.tf_mode,
                       init_limit=args.init_limit, progress=not args.no_progress)
    print(f"status: {result['status']}", file=sys.stderr)
    if result.get("error"):
        print(f"error: {result['error']}", file=sys.stderr)
    if result.get("note"):
        print(f"note: {result['note']}", file=sys.stderr)
    print(f"report: {result['report']}", file=sys.stderr)
    print(final_line(result), flush=True)
    return 0 if result["n_predictions"] > 0 else 3


def register(subparsers) -> None:
    parser = subparsers.add_parser("run", help="run a model.py on one AutoDL dataset and score it like the kit",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("--code-dir", required=True, help="folder holding model.py")
    parser.add_argument("--dataset-dir", required=True, help="AutoDL dataset folder (<name>.data/, <name>.solution)")
    parser.add_argument("--time-budget", type=float, required=True, help="time budget T in seconds")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--tf-mode", choices=("graph", "eager"), default="graph",
                        help="graph (default, the challenge's TF1 semantics) or eager (TF2 datasets)")
    parser.add_argument("--init-limit", type=float, default=1200.0,
                        help="seconds allowed to import model.py and run Model.__init__ (not scored)")
    parser.add_argument("--no-progress", action="store_true", help="no live progress display")
    parser.set_defaults(func=_cli)
