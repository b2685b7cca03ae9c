"""`tools faults`: build the fault cases, run them, check every promise, write the tables.

    tools faults --out OUT [--cases NAME|CATEGORY ...] [--kit-only | --tools-only]
                 [--cifar10 DIR] [--corpus DIR] [--kit-run PATH] [--kit GITDIR]

Kit cases run one after another through the official kit (tools/kit/run.py; CPU-bound neighbours,
when a case asks for them, run beside it). Tool cases run `python -m tools ...` on hostile files. Each
result is appended to OUT/results.jsonl as soon as it is known (a case already there is skipped:
an interrupted suite resumes); OUT/results.md holds the tables for docs/reliability.md. Exit
status 1 when any promise is broken.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from tools.errors import UserInputError
from tools.faults import checks, kit_cases, tool_cases
from tools.provenance import code_version
from tools.shared_paths import REPO_ROOT, default_kit_run, shared_dir

RESULTS_FILE = "results.jsonl"


# ------------------------------------------------------------------ datasets
def dataset_dir(key: str, data_root: Path, cifar10: Path | None, corpus: Path) -> Path:
    """The AutoDL folder of dataset `key`, built (or converted, for cifar10) on first use."""
    target = data_root / key
    if key == "cifar10" and cifar10 is not None:
        return cifar10
    if (target / f"{key}.solution").is_file():
        return target
    if key == "cifar10":
        source = corpus / "cifar10"
        check_sources([key], data_root, cifar10, corpus)
        print(f"[faults] converting {source} ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "tools", "convert", str(source), "--out", str(data_root),
                        "--name", "cifar10", "-q", "--overwrite"], check=True, cwd=REPO_ROOT)
        return target
    print(f"[faults] building {key} ...", file=sys.stderr)
    return kit_cases.DATASETS[key](data_root, key)


def check_sources(keys, data_root: Path, cifar10: Path | None, corpus: Path) -> None:
    """Fail before the first case when a real dataset the selected cases need can be found nowhere: the
    suite reached its first cifar10 case after twelve minutes of other cases, run from a git worktree
    where the default `--corpus` (../shared/datasets) does not exist."""
    if "cifar10" in keys and cifar10 is None and not (data_root / "cifar10" / "cifar10.solution").is_file():
        source = corpus / "cifar10"
        if not source.is_dir():
            raise UserInputError(f"cifar10 not found in the corpus ({source}); pass --cifar10 or --corpus")


# ------------------------------------------------------------------ kit cases
def stage_code(out: Path) -> Path:
    """The submission's files (model.py and its packages, as `tools package` ships them) copied to
    OUT/code: the kit runs that folder. Not the repository root: the kit's shim treats every module
    under the code folder as submission code, and the repository holds the virtual environment."""
    from tools.package import package_files

    code = out / "code"
    if code.exists():
        shutil.rmtree(code)
    for source, name in package_files(REPO_ROOT):
        target = code / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    return code


@contextmanager
def cpu_neighbours(count: int):
    """`count` CPU-bound processes for the duration (the load a shared machine puts beside a run)."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        yield procs
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def run_kit_case(case: kit_cases.KitCase, dataset: Path, out_dir: Path, code: Path, kit_run: str,
                 kit_git: str) -> dict:
    from autodl_data.autodl_format import find_task, read_solution
    from tools.bench import run_kit_judge

    task = find_task(dataset)
    solution = read_solution(task.solution_path)
    env = {"AUTODL_PIPELINE_JSON": json.dumps(case.pipeline)} if case.pipeline else None
    if out_dir.exists():
        shutil.rmtree(out_dir)
    with cpu_neighbours(case.neighbours):
        result = run_kit_judge(str(code), dataset, case.time_budget, out_dir, case.tf_mode, kit_run, kit_git,
                               no_copy_code=True, extra_env=env)
    log_text = (out_dir / "ingestion.log").read_text(errors="replace") if (out_dir / "ingestion.log").is_file() else ""
    n_files, problems = checks.check_predictions(out_dir / "predictions", task.name, solution.shape)
    overruns = checks.call_overruns(log_text)
    stamps = checks.kit_prediction_times(log_text)
    summary = json.loads((out_dir / "summary.json").read_text()) if (out_dir / "summary.json").is_file() else {}
    row = {
        "case": case.name, "category": case.category, "what": case.what, "tf_mode": case.tf_mode,
        "time_budget": case.time_budget, "neighbours": case.neighbours, "pipeline": case.pipeline,
        "status": result["status"], "error": result.get("error"), "alc": result["alc"],
        "ingestion_rc": summary.get("ingestion_rc"), "scoring_rc": summary.get("scoring_rc"),
        "n_predictions": len(stamps), "scored_predictions": result["n_predictions"], "prediction_files": n_files,
        "first_prediction_s": stamps[0] if stamps else None, "last_prediction_s": stamps[-1] if stamps else None,
        "worst_overrun_s": max(overruns) if overruns else None, "solver_calls": len(overruns),
        "degraded_steps": checks.degradations(log_text),
        "peak_memory_gb": result["peak_rss_bytes"] / 2 ** 30,
        "memory_limit_gb": case.memory_cap_gb + kit_cases.FRAMEWORK_ALLOWANCE_GB,
        "test_shape": list(solution.shape), "prediction_problems": problems[:5],
        "wall_s": result["wall_time"], "code_version": code_version(REPO_ROOT),
    }
    row["broken"] = checks.verdict(row)
    return row


# ------------------------------------------------------------------ tool cases
def _tools_subprocess(argv: list[str], env: dict | None) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "tools", *argv], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=REPO_ROOT, timeout=600)
    return proc.returncode, proc.stderr


def _tools_in_process(argv: list[str], env: dict | None) -> tuple[int, str]:
    """The same command through `tools.cli.main` in this process (the unit tests: no interpreter start,
    no TensorFlow import per case); an exception other than a user-input error comes back as a traceback."""
    import io
    import traceback
    from contextlib import redirect_stderr, redirect_stdout
    from unittest import mock

    from tools.cli import main

    err = io.StringIO()
    try:
        with mock.patch.dict(os.environ, env or {}), redirect_stderr(err), redirect_stdout(io.StringIO()):
            code = main(list(argv))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except Exception:  # noqa: BLE001 - what a user would see: a traceback
        err.write(traceback.format_exc())
        code = 1
    return code, err.getvalue()


def run_tool_case(case: tool_cases.ToolCase, case_dir: Path, in_process: bool = False) -> dict:
    if case_dir.exists():
        shutil.rmtree(case_dir, ignore_errors=True)
    case_dir.mkdir(parents=True)
    call = case.build(case_dir, REPO_ROOT)
    started = time.monotonic()
    returncode, stderr = (_tools_in_process if in_process else _tools_subprocess)(call.argv, call.env)
    message = (stderr.strip().splitlines() or [""])[-1]
    broken = []
    if returncode == 0:
        broken.append("exit status 0")
    if "Traceback" in stderr:
        broken.append("traceback instead of an error message")
    if call.names not in stderr:
        broken.append(f"error does not name {call.names}")
    if not any(word.lower() in stderr.lower() for word in call.expect):
        broken.append(f"error does not say {' / '.join(call.expect)}")
    if call.output.exists():
        broken.append(f"{call.output.name} was written")
    leftovers = [p.name for p in call.output.parent.glob(".*partial*")] if call.output.parent.is_dir() else []
    if leftovers:
        broken.append(f"half-written {leftovers}")
    return {"case": case.name, "category": "tools", "what": case.what, "exit_status": returncode,
            "message": message[:300], "seconds": round(time.monotonic() - started, 1), "broken": broken,
            "code_version": code_version(REPO_ROOT)}


# ------------------------------------------------------------------ reporting
def load_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _fmt(value, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


def markdown(rows: list[dict]) -> str:
    kit = [r for r in rows if r["category"] != "tools"]
    tools = [r for r in rows if r["category"] == "tools"]
    lines = []
    if kit:
        lines += ["| case | category | mode | T (s) | status | predictions | first / last prediction (s) | "
                  "worst call overrun (s) | peak memory / limit (GB) | predictions well-formed | promises |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in kit:
            shape_ok = "yes" if not r["prediction_problems"] and r["prediction_files"] else "**no**"
            lines.append(
                f"| {r['case']} | {r['category']} | {r['tf_mode']} | {r['time_budget']:g} | {r['status']} | "
                f"{r['n_predictions']} | {_fmt(r['first_prediction_s'], '.1f')} / {_fmt(r['last_prediction_s'], '.1f')} | "
                f"{_fmt(r['worst_overrun_s'], '+.1f')} | {r['peak_memory_gb']:.2f} / {r['memory_limit_gb']:.2f} | "
                f"{shape_ok} {'x'.join(map(str, r['test_shape']))} | "
                f"{'kept' if not r['broken'] else '**broken: ' + '; '.join(r['broken']) + '**'} |")
    if tools:
        lines += ["", "| case | what | exit | error message | promises |", "|---|---|---|---|---|"]
        for r in tools:
            message = r["message"].replace("|", "\\|")
            lines.append(f"| {r['case']} | {r['what']} | {r['exit_status']} | {message} | "
                         f"{'kept' if not r['broken'] else '**broken: ' + '; '.join(r['broken']) + '**'} |")
    counts: dict[str, list[int]] = {}
    for r in rows:
        kept, total = counts.setdefault(r["category"], [0, 0])
        counts[r["category"]] = [kept + (not r["broken"]), total + 1]
    lines += ["", "| category | cases | all promises kept |", "|---|---|---|"]
    lines += [f"| {c} | {t} | {k} |" for c, (k, t) in counts.items()]
    return "\n".join(lines) + "\n"


def select_cases(names: list[str] | None) -> tuple[list[kit_cases.KitCase], list[tool_cases.ToolCase]]:
    """The kit and tool cases named (by case name or category; "tools" = every tool case); all when None."""
    if not names:
        return list(kit_cases.CASES), list(tool_cases.CASES)
    kit = [c for c in kit_cases.CASES if c.name in names or c.category in names]
    tools = [c for c in tool_cases.CASES if c.name in names or "tools" in names]
    known = {c.name for c in kit_cases.CASES} | {c.name for c in tool_cases.CASES} | set(kit_cases.CATEGORIES)
    unknown = [n for n in names if n not in known and n != "tools"]
    if unknown:
        raise UserInputError(f"unknown fault case(s) {unknown}; categories: {', '.join(kit_cases.CATEGORIES)}, tools")
    return kit, tools


def run_suite(out: Path, names: list[str] | None, kit: bool, tools: bool, cifar10: Path | None, corpus: Path,
              kit_run: str, kit_git: str | None) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    results = out / RESULTS_FILE
    done = {r["case"] for r in load_rows(results)}
    selected_kit, selected_tools = select_cases(names)
    selected_kit = selected_kit if kit else []
    selected_tools = selected_tools if tools else []
    if selected_kit:
        from tools.bench import kit_available

        problem = kit_available(kit_run, kit_git)
        if problem:
            raise UserInputError(problem)
        check_sources({c.dataset for c in selected_kit if c.name not in done}, out / "data", cifar10, corpus)
    code = stage_code(out) if selected_kit else None
    with open(results, "a") as sink:
        for case in selected_tools:
            if case.name in done:
                continue
            row = run_tool_case(case, out / "tool_cases" / case.name)
            print(f"[faults] {case.name}: {'kept' if not row['broken'] else row['broken']}", file=sys.stderr)
            sink.write(json.dumps(row) + "\n")
            sink.flush()
        for case in selected_kit:
            if case.name in done:
                continue
            dataset = dataset_dir(case.dataset, out / "data", cifar10, corpus)
            print(f"[faults] {case.name} (T={case.time_budget:g}s, {case.tf_mode}) ...", file=sys.stderr)
            row = run_kit_case(case, dataset, out / "runs" / case.name, code, kit_run, kit_git)
            print(f"[faults] {case.name}: {row['status']}, {row['n_predictions']} predictions, "
                  f"{'kept' if not row['broken'] else row['broken']}", file=sys.stderr)
            sink.write(json.dumps(row) + "\n")
            sink.flush()
    rows = load_rows(results)
    (out / "results.md").write_text(markdown(rows))
    return rows


def _cli(args) -> int:
    from tools.tf_support import require_tensorflow

    require_tensorflow("the cases are AutoDL datasets, written and read with it")
    names = list(args.cases or [])
    rows = run_suite(Path(args.out), names or None, kit=not args.tools_only, tools=not args.kit_only,
                     cifar10=Path(args.cifar10) if args.cifar10 else None, corpus=Path(args.corpus),
                     kit_run=args.kit_run, kit_git=args.kit)
    print(markdown(rows))
    broken = [r["case"] for r in rows if r["broken"]]
    print(f"[faults] {len(rows) - len(broken)} of {len(rows)} cases kept every promise"
          + (f"; broken: {broken}" if broken else ""), file=sys.stderr)
    return 1 if broken else 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("faults", help="run the fault and load suite (docs/reliability.md)",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder (results.jsonl, results.md, runs/, data/)")
    parser.add_argument("--cases", nargs="+", help="case names or categories (sizes, values, labels, budgets, "
                                                    "load, tools); default: all")
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--kit-only", action="store_true", help="only the kit cases")
    only.add_argument("--tools-only", action="store_true", help="only the hostile-file cases of the tools")
    parser.add_argument("--cifar10", help="cifar10 already converted to the AutoDL format (else converted from "
                                          "--corpus)")
    parser.add_argument("--corpus", default=str(shared_dir() / "datasets"), help="dev corpus (default ../shared/datasets)")
    parser.add_argument("--kit-run", default=default_kit_run(),
                        help="the kit's runner (default $AUTODL_KIT_RUN, else tools/kit/run.py)")
    parser.add_argument("--kit", default=os.environ.get("AUTODL_KIT_GIT"), help="starting-kit git dir")
    parser.set_defaults(func=_cli)
