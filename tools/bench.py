"""`tools bench`: solvers x datasets at one time budget, one run after another.

    tools bench --solvers ours,kit:linear --datasets DIR [DIR ...] --time-budget 300 --out OUT
                [--judge kit|local] [--tf-mode graph|eager] [--kit-run PATH] [--kit GITDIR]

Solvers: `ours` (the repo root's model.py), `kit:<baseline>` (a baseline of the
official kit, e.g. kit:linear = AutoDL_simple_baseline_models/linear, always run
by the kit itself through tools/kit/run.py), or a folder holding a model.py (`name=DIR`
or just `DIR`). `--judge kit` (the official judge for the benchmark table) runs
every solver through the kit's runner; `--judge local` runs the non-kit solvers with
`tools run`. Runs never overlap (timing). Each result is appended to
OUT/results.jsonl as soon as it finishes, and rows already there (same solver,
dataset, budget, judge, TF mode) are skipped, so an interrupted bench resumes.
Then OUT/results.md (tables) and OUT/alc.png (bars) are written from the JSONL.
"""
from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import psutil

from tools.contention import BACKGROUND_LIMIT, BackgroundWatch
from tools.errors import UserInputError
from tools.provenance import code_version
from tools.shared_paths import REPO_ROOT, default_kit_run

KIT_BASELINE_DIR = "AutoDL_simple_baseline_models"
RESULTS_FILE = "results.jsonl"


@dataclass(frozen=True)
class Solver:
    name: str
    code_dir: Path | None  # None for kit baselines
    kit_path: str | None = None  # kit_run's `kit:RELPATH` code dir

    @property
    def is_kit(self) -> bool:
        return self.kit_path is not None


def parse_solvers(spec: str, ours_dir: Path = REPO_ROOT) -> list[Solver]:
    """'ours,kit:linear,toy=path/to/dir' -> Solvers, with clear errors for unknown entries."""
    solvers = []
    for item in [s.strip() for s in spec.split(",") if s.strip()]:
        if item == "ours":
            solvers.append(Solver("ours", Path(ours_dir)))
        elif item.startswith("kit:"):
            baseline = item[4:].strip("/")
            if not baseline:
                raise UserInputError("empty kit baseline name in --solvers (e.g. kit:linear)")
            rel = baseline if "/" in baseline else f"{KIT_BASELINE_DIR}/{baseline}"
            solvers.append(Solver(item, None, f"kit:{rel}"))
        else:
            name, _, path = item.rpartition("=")
            path = Path(path)
            if not (path / "model.py").is_file():
                raise UserInputError(f"solver {item!r}: not 'ours', not 'kit:<baseline>', and {path} has no model.py")
            solvers.append(Solver(name or path.resolve().name, path.resolve()))
    if not solvers:
        raise UserInputError("no solver given (--solvers ours,kit:linear)")
    names = [s.name for s in solvers]
    if len(set(names)) != len(names):
        raise UserInputError(f"duplicate solver names in --solvers: {names}")
    return solvers


def kit_available(kit_run: str | None, kit_git: str | None) -> str | None:
    """None when kit_run can run, else the reason it cannot."""
    if not kit_run or not Path(kit_run).is_file():
        return f"kit_run not found ({kit_run}); pass --kit-run"
    if not kit_git or not Path(kit_git).exists():
        return "the starting kit is not available (set AUTODL_KIT_GIT or pass --kit)"
    return None


def _ingestion_rss(root: psutil.Process) -> int:
    """RSS of the kit's ingestion process and its descendants (not kit_run, not scoring)."""
    total = 0
    try:
        procs = root.children(recursive=True)
    except psutil.Error:
        return 0
    seen = set()
    for proc in procs:
        try:
            if any("ingestion.py" in part for part in proc.cmdline()):
                for p in [proc] + proc.children(recursive=True):
                    if p.pid not in seen:
                        seen.add(p.pid)
                        total += p.memory_info().rss
        except psutil.Error:
            continue
    return total


def run_kit_judge(code: str, dataset_dir: Path, time_budget: float, out_dir: Path, tf_mode: str,
                  kit_run: str, kit_git: str, no_copy_code: bool, extra_env: dict | None = None) -> dict:
    """One kit_run call, with the ingestion tree's peak RSS sampled meanwhile; returns a result row.
    `extra_env`: variables set for the kit's processes only (e.g. AUTODL_PIPELINE_JSON)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, kit_run, "--code-dir", code, "--dataset-dir", str(dataset_dir),
           "--time-budget", repr(float(time_budget)), "--out", str(out_dir), "--tf-mode", tf_mode, "--kit", kit_git]
    if no_copy_code:
        cmd.append("--no-copy-code")  # ours: the repo root is far too big to copy (venv, runs...)
    env = {**os.environ, "KIT_PYTHON": os.environ.get("KIT_PYTHON", sys.executable), **(extra_env or {})}
    wall0 = time.time()
    peak = 0
    with open(out_dir / "kit_run.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        watched = psutil.Process(proc.pid)
        while proc.poll() is None:
            peak = max(peak, _ingestion_rss(watched))
            time.sleep(0.25)
    wall = time.time() - wall0
    summary_path = out_dir / "summary.json"
    if not summary_path.is_file():
        tail = (out_dir / "kit_run.log").read_text(errors="replace")[-2000:]
        return {"status": "judge_failed", "error": f"kit_run exited {proc.returncode} without summary.json:\n{tail}",
                "alc": 0.0, "final_nauc": None, "n_predictions": 0, "time_to_first_prediction": None,
                "duration": 0.0, "peak_rss_bytes": peak, "wall_time": wall}
    s = json.loads(summary_path.read_text())
    stamps = s.get("timestamps") or []
    return {"status": s.get("status"), "error": s.get("note"), "alc": float(s.get("alc") or 0.0),
            "final_nauc": s.get("nauc_last") if stamps else None, "n_predictions": int(s.get("n_predictions") or 0),
            "time_to_first_prediction": stamps[0] if stamps else None, "duration": float(s.get("duration") or 0.0),
            "peak_rss_bytes": peak, "wall_time": wall, "timestamps": stamps, "naucs": s.get("nauc_scores") or []}


def run_local_judge(code_dir: Path, dataset_dir: Path, time_budget: float, out_dir: Path, tf_mode: str) -> dict:
    from tools.runner import run_local

    r = run_local(code_dir, dataset_dir, time_budget, out_dir, tf_mode=tf_mode)
    keys = ("status", "error", "alc", "final_nauc", "n_predictions", "time_to_first_prediction", "duration",
            "peak_rss_bytes", "wall_time", "timestamps", "naucs")
    return {k: r.get(k) for k in keys}


def row_key(row: dict) -> tuple:
    return (row["solver"], row["dataset"], float(row["time_budget"]), row["judge"], row.get("tf_mode", "graph"))


def load_results(path: Path) -> list[dict]:
    rows = []
    if path.is_file():
        for line_no, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise UserInputError(f"{path}:{line_no}: not a JSON line ({exc}); fix or remove it") from None
    return rows





def pipeline_used(run_out: Path) -> dict:
    """The pipeline our model.py logged in the run's ingestion log: {pipeline_id, pipeline_reason} or {}."""
    from meta_db.selector import parse_choice_log

    log_path = Path(run_out) / "ingestion.log"
    try:
        found = parse_choice_log(log_path.read_text(errors="replace"))
    except OSError:
        return {}
    return {"pipeline_id": found[0], "pipeline_reason": found[1]} if found else {}


def _hardware() -> str:
    """What the rows ran on, with the CPU model: machines of one stratum key differ in ALC (cpu_model)."""
    from meta_db.metafeatures import cpu_model

    model = cpu_model()
    return (f"{platform.machine()} {psutil.cpu_count(logical=True)} cpu, "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB" + (f", {model}" if model else ""))


def run_bench(solvers: list[Solver], dataset_dirs: list[Path], time_budget: float, out_dir: Path,
              judge: str = "kit", tf_mode: str = "graph", kit_run: str | None = None, kit_git: str | None = None,
              rerun_disturbed: bool = False, log=print) -> list[dict]:
    """Run what is missing from OUT/results.jsonl, sequentially; return the rows of this configuration.
    `rerun_disturbed`: a row whose latest run saw other processes use more than BACKGROUND_LIMIT of the
    machine counts as missing (the new row replaces it in the tables; the old one stays in the file)."""
    from autodl_data.autodl_format import find_task
    from meta_db.metafeatures import machine_instance

    if not (time_budget > 0 and math.isfinite(time_budget)):
        raise UserInputError(f"time budget must be a positive number of seconds, got {time_budget}")
    if judge not in ("kit", "local"):
        raise UserInputError(f"judge must be 'kit' or 'local', got {judge!r}")
    tasks = []
    for d in dataset_dirs:
        task = find_task(d)
        tasks.append((task.name, Path(d).resolve()))
    names = [n for n, _ in tasks]
    if len(set(names)) != len(names):
        raise UserInputError(f"two dataset folders hold tasks of the same name: {names}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results_path = out_dir / RESULTS_FILE
    # a judge that crashed (no summary) is retried; any other outcome, even a failed run, is a result
    done = {key for key, r in latest_by_key(load_results(results_path)).items()
            if r.get("status") != "judge_failed"
            and not (rerun_disturbed and (r.get("background_cpu") or 0) > BACKGROUND_LIMIT)}
    kit_problem = kit_available(kit_run, kit_git)
    hardware = _hardware()
    instance = machine_instance()  # which boot of which machine: measuring batches can differ (meta_db/batches.py)
    # the code that ran: the solver's own folder (e.g. a snapshot given as --ours-dir), else this checkout
    versions = {s.name: code_version(s.code_dir if s.code_dir is not None else REPO_ROOT) for s in solvers}

    for dataset, dataset_dir in tasks:
        for solver in solvers:
            row_judge = "kit" if solver.is_kit else judge
            key = (solver.name, dataset, float(time_budget), row_judge, tf_mode)
            if key in done:
                log(f"[bench] skip {solver.name} on {dataset}: already in {results_path.name}")
                continue
            if row_judge == "kit" and kit_problem:
                log(f"[bench] skip {solver.name} on {dataset}: {kit_problem}")
                continue
            run_out = out_dir / "runs" / f"{dataset}__{solver.name.replace(':', '_').replace('/', '_')}"
            log(f"[bench] {solver.name} on {dataset} (T={time_budget:g}s, judge={row_judge}, tf={tf_mode}) ...")
            with BackgroundWatch() as watch:
                if row_judge == "kit":
                    code = solver.kit_path or str(solver.code_dir)
                    result = run_kit_judge(code, dataset_dir, time_budget, run_out, tf_mode, kit_run, kit_git,
                                           no_copy_code=not solver.is_kit)
                else:
                    result = run_local_judge(solver.code_dir, dataset_dir, time_budget, run_out, tf_mode)
            result["background_cpu"] = round(watch.share, 4)
            if watch.share > BACKGROUND_LIMIT:
                log(f"[bench]   warning: other processes used {watch.share:.0%} of the machine during this run; "
                    f"its ALC is not comparable (and --import-bench skips it)")
            row = {"solver": solver.name, "dataset": dataset, "time_budget": float(time_budget), "judge": row_judge,
                   "tf_mode": tf_mode, **result, **({} if solver.is_kit else pipeline_used(run_out)), "dataset_dir": str(dataset_dir), "out_dir": str(run_out),
                   "code_version": versions[solver.name], "hardware": hardware, "machine_instance": instance,
                   "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            with open(results_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            done.add(key)
            log(f"[bench]   ALC={row['alc']:.4f} status={row['status']} n={row['n_predictions']} "
                f"wall={row['wall_time']:.0f}s")
    wanted_solvers = {s.name for s in solvers}
    wanted_datasets = set(names)
    return list(latest_by_key(
        r for r in load_results(results_path)
        if (r["solver"] in wanted_solvers and r["dataset"] in wanted_datasets
            and float(r["time_budget"]) == float(time_budget) and r.get("tf_mode", "graph") == tf_mode
            and (r["judge"] == judge or (r["judge"] == "kit" and r["solver"].startswith("kit:"))))).values())


def latest_by_key(rows) -> dict:
    """{row_key: row}, the last row of each key winning: a rerun (a retried judge failure, a run repeated
    with --rerun-disturbed) replaces the earlier row."""
    return {row_key(r): r for r in rows}


def _cell(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, fmt)


def markdown_tables(rows: list[dict], solvers: list[str], datasets: list[str], time_budget: float,
                    judge: str) -> str:
    """ALC table (dataset x solver, with a mean row) plus one detail row per run."""
    by = {(r["dataset"], r["solver"]): r for r in rows}
    lines = [f"# Benchmark: T = {time_budget:g} s, judge = {judge}", "",
             "## ALC", "", "| dataset | " + " | ".join(solvers) + " |",
             "|---|" + "---|" * len(solvers)]
    for d in datasets:
        cells = []
        for s in solvers:
            r = by.get((d, s))
            cells.append("-" if r is None else _cell(r["alc"], ".4f") + ("" if r["status"] == "ok" else "*"))
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    means = []
    for s in solvers:
        alcs = [by[(d, s)]["alc"] for d in datasets if (d, s) in by]
        means.append(_cell(sum(alcs) / len(alcs), ".4f") + ("" if len(alcs) == len(datasets) else
                                                            f" ({len(alcs)}/{len(datasets)})") if alcs else "-")
    lines.append("| **mean ALC** | " + " | ".join(means) + " |")
    lines += ["", "`*`: status other than ok (see the details).", "", "## Details", "",
              "| dataset | solver | ALC | final NAUC | first prediction (s) | peak memory (GB) | status | predictions |"
              " wall (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for d in datasets:
        for s in solvers:
            r = by.get((d, s))
            if r is None:
                continue
            mem = r.get("peak_rss_bytes")
            lines.append(f"| {d} | {s} | {_cell(r['alc'], '.4f')} | {_cell(r.get('final_nauc'), '.4f')} | "
                         f"{_cell(r.get('time_to_first_prediction'), '.2f')} | "
                         f"{_cell(mem / 1e9 if mem else None, '.2f')} | {r['status']} | {r['n_predictions']} | "
                         f"{_cell(r.get('wall_time'), '.0f')} |")
    return "\n".join(lines) + "\n"


def plot_alc_bars(rows: list[dict], solvers: list[str], datasets: list[str], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    by = {(r["dataset"], r["solver"]): r["alc"] for r in rows}
    width = 0.8 / max(len(solvers), 1)
    x = np.arange(len(datasets))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(datasets) + 2), 4.5))
    for i, s in enumerate(solvers):
        vals = [by.get((d, s), np.nan) for d in datasets]
        ax.bar(x + (i - (len(solvers) - 1) / 2) * width, vals, width, label=s)
    ax.set_xticks(x)
    ax.set_xticklabels(datasets, rotation=30, ha="right")
    ax.set_ylabel("ALC")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_title(title)
    ax.legend()
    ax.grid(True, axis="y", alpha=0.4)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _cli(args) -> int:
    solvers = parse_solvers(args.solvers, Path(args.ours_dir))
    rows = run_bench(solvers, [Path(d) for d in args.datasets], args.time_budget, Path(args.out), judge=args.judge,
                     tf_mode=args.tf_mode, kit_run=args.kit_run, kit_git=args.kit, rerun_disturbed=args.rerun_disturbed)
    from autodl_data.autodl_format import find_task

    datasets = [find_task(d).name for d in args.datasets]
    names = [s.name for s in solvers]
    out = Path(args.out)
    (out / "results.md").write_text(markdown_tables(rows, names, datasets, args.time_budget, args.judge))
    plot_alc_bars(rows, names, datasets, out / "alc.png", f"ALC, T = {args.time_budget:g} s, judge = {args.judge}")
    print((out / "results.md").read_text())
    print(f"[bench] wrote {out / 'results.md'}, {out / 'alc.png'}, {out / RESULTS_FILE}", file=sys.stderr)
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="benchmark solvers x datasets at one time budget",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("--solvers", default="ours,kit:linear",
                        help="comma-separated: ours, kit:<baseline>, [name=]DIR_WITH_MODEL_PY (default ours,kit:linear)")
    parser.add_argument("--datasets", nargs="+", required=True, help="AutoDL dataset folders")
    parser.add_argument("--time-budget", type=float, default=300.0, help="T in seconds (default 300)")
    parser.add_argument("--out", required=True, help="output folder (results.jsonl, results.md, alc.png, runs/)")
    parser.add_argument("--judge", choices=("kit", "local"), default="kit",
                        help="kit (default; the official judge, via tools/kit/run.py) or local "
                             "(tools run)")
    parser.add_argument("--tf-mode", choices=("graph", "eager"), default="graph",
                        help="TensorFlow mode of the ingestion: graph (default; TF1 semantics, as the challenge "
                             "platform runs the kit) or eager (TF2)")
    parser.add_argument("--kit-run", default=default_kit_run(),
                        help="the kit's runner (default $AUTODL_KIT_RUN, else the repository's "
                             "tools/kit/run.py)")
    parser.add_argument("--kit", default=os.environ.get("AUTODL_KIT_GIT"),
                        help="starting-kit git dir (default $AUTODL_KIT_GIT)")
    parser.add_argument("--ours-dir", default=str(REPO_ROOT), help="folder of `ours` model.py (default: repo root)")
    parser.add_argument("--rerun-disturbed", action="store_true",
                        help="run again the rows whose run saw other processes use more than "
                             f"{BACKGROUND_LIMIT:.0%}% of the machine (the new row replaces them in the tables)")  # %% for argparse
    parser.set_defaults(func=_cli)
