"""Run the OFFICIAL AutoDL starting kit (ingestion + scoring, unmodified) on a `model.py`, as an external
judge, under a modern Python 3 / TensorFlow 2.x stack.

  python tools/kit/run.py --code-dir DIR --dataset-dir DIR --time-budget SECONDS --out DIR
                          [--kit GITDIR] [--tf-mode graph|eager] [--python PY] [-v]
  (also `python -m tools.kit.run ...` and `tools kit ...`)

* The kit is exported from its git snapshot (--kit, default $AUTODL_KIT_GIT) into a fresh temporary
  directory at every run; nothing of the kit is edited.
* Compatibility fixes live in tools/kit/shim/ (see shim/boot.py and tools/kit/README.md): each kit
  program is started as `PY shim/boot.py <kit>/AutoDL_.../<program>.py <its usual arguments>`.
* Ingestion and scoring run in parallel, as the kit's run_local_test.py and the challenge platform do;
  scoring kills ingestion when the time budget is used up.
* The last line printed on stdout is
      ALC=<float> NAUC=<float> n_predictions=<int> duration=<s>
  parsed from the kit's own scores.txt (NAUC = score of the last prediction, duration = kit's
  'Duration' = time of the last prediction after ingestion start). Human-readable details go to
  stderr; everything is also saved in OUT/summary.json.

--dataset-dir is a kit-style dataset folder holding ONE `<name>.data/` and its `<name>.solution`
(e.g. AutoDL_sample_data/miniciao). `kit:NAME` means the kit's own AutoDL_sample_data/NAME.
--code-dir is a folder with model.py; `kit:RELPATH` means a folder of the kit (e.g.
kit:AutoDL_simple_baseline_models/linear). The code dir is copied to OUT/code before the run, as
the platform unpacks a submission.

Exit status: 0 when at least one prediction was scored (including when ingestion was stopped at the
time budget or failed after some predictions; see the status line / summary.json), 3 when no
prediction was scored (the final line then reports zeros), 2 on usage/setup errors.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as `python tools/kit/run.py`: import the sibling modules as tools.kit.*, from this checkout,
    # and keep this folder off sys.path so that its module names shadow nothing.
    sys.path[0] = str(Path(__file__).resolve().parents[2])

from tools.kit import export, inputs, results, supervise  # noqa: E402
from tools.kit.errors import KitRunError  # noqa: E402
from tools.kit.interpreter import check_python  # noqa: E402
from tools.kit.processes import KitProcess  # noqa: E402

BOOT = str(Path(__file__).resolve().parent / "shim" / "boot.py")
# What a run writes into OUT, removed first so that nothing of an earlier run is read as this one's.
OUR_OUTPUTS = ("code", "predictions", "scores", "run", "ingestion.log", "scoring.log", "summary.json")


def info(msg: str) -> None:
    sys.stderr.write("[kit_run] %s\n" % msg)
    sys.stderr.flush()


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The runner's options, shared by this script and `tools kit`."""
    ap.add_argument("--code-dir", required=True, help="folder with model.py (or kit:RELPATH)")
    ap.add_argument("--dataset-dir", required=True,
                    help="folder with <name>.data/ and <name>.solution (or kit:NAME for the kit's sample data)")
    ap.add_argument("--time-budget", type=float, required=True, help="ingestion time budget T in seconds")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--kit", default=os.environ.get("AUTODL_KIT_GIT"),
                    help="starting-kit git dir (bare or .git) or exported kit folder; default $AUTODL_KIT_GIT")
    ap.add_argument("--kit-rev", default="HEAD", help="git revision (HEAD)")
    ap.add_argument("--tf-mode", choices=("graph", "eager"), default=os.environ.get("KIT_TF_MODE", "graph"),
                    help="graph (default): `import tensorflow` in kit and model code = tf.compat.v1 with v2 "
                         "behaviour disabled, like the challenge's TF 1.13; eager: TF2 API, eager tf.data "
                         "datasets (TF1-style tf.Session code fails)")
    ap.add_argument("--python", default=os.environ.get("KIT_PYTHON", sys.executable),
                    help="interpreter for the kit programs (default: $KIT_PYTHON or the one running the runner)")
    ap.add_argument("--keep-kit", action="store_true", help="export the kit into OUT/kit and keep it")
    ap.add_argument("--no-copy-code", action="store_true", help="run model.py in place instead of from OUT/code")
    ap.add_argument("-v", "--verbose", action="store_true", help="echo ingestion/scoring output to stderr")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Run the genuine AutoDL starting kit on a model.py.",
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    add_arguments(ap)
    return ap


def clear_outputs(out: str) -> None:
    for name in OUR_OUTPUTS + ("kit",):
        p = os.path.join(out, name)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        elif os.path.lexists(p):
            os.remove(p)


def kit_env(tf_mode: str, kit_dir: str, code_dir: str) -> dict:
    """The kit programs' environment: ours, plus what boot.py reads (TF mode, whose `import tensorflow`
    gets the TF1 alias) and quiet, unbuffered, headless defaults."""
    env = dict(os.environ)
    env["KIT_SHIM_TF_MODE"] = tf_mode
    env["KIT_SHIM_CLIENT_DIRS"] = os.pathsep.join([kit_dir, code_dir])
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.setdefault("MPLBACKEND", "Agg")
    return env


def run_kit(args: argparse.Namespace) -> int:
    """One run; returns the exit status (0: scored, 3: nothing scored). Setup problems raise KitRunError
    (exit status 2); the temporary kit export is removed in every case."""
    if args.time_budget <= 0:
        raise KitRunError("--time-budget must be > 0")

    def _on_term(signum, frame):  # run the cleanup in `finally` below
        raise SystemExit(128 + signum)

    previous_handler = signal.signal(signal.SIGTERM, _on_term)
    try:
        return _run(args)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)


def _run(args: argparse.Namespace) -> int:
    wall0 = time.time()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    clear_outputs(out)

    has_tf_keras = check_python(args.python)
    if args.tf_mode == "graph" and not has_tf_keras:
        info("note: tf_keras not installed; tf.layers / graph-mode tf.keras will be unavailable to TF1-style "
             "models (pip install --no-deps tf-keras==<your TF version>)")

    if args.keep_kit:
        kit_dir = os.path.join(out, "kit")
        os.makedirs(kit_dir)
        tmp_root = None
    else:
        tmp_root = tempfile.mkdtemp(prefix="autodl_kit_")
        kit_dir = os.path.join(tmp_root, "kit")
        os.makedirs(kit_dir)
    procs: list[KitProcess] = []
    try:
        kit_desc = export.export(args.kit, args.kit_rev, kit_dir)
        ingestion_py = os.path.join(kit_dir, export.INGESTION)
        score_py = os.path.join(kit_dir, export.SCORING)
        for p in (ingestion_py, score_py):
            if not os.path.isfile(p):
                raise KitRunError("kit export lacks %s" % p)

        dataset_dir = inputs.resolve(args.dataset_dir, kit_dir, "dataset")
        task = inputs.dataset_task(dataset_dir)
        code_src = inputs.resolve(args.code_dir, kit_dir, "code")
        inputs.check_code_dir(code_src)
        if args.no_copy_code:
            code_dir = code_src
        else:
            code_dir = os.path.join(out, "code")
            shutil.copytree(code_src, code_dir, ignore=shutil.ignore_patterns(".git", "__pycache__", "*.pyc"))

        pred_dir = os.path.join(out, "predictions")
        score_dir = os.path.join(out, "scores")
        run_dir = os.path.join(out, "run")
        for d in (pred_dir, score_dir, run_dir):
            os.makedirs(d)

        env = kit_env(args.tf_mode, kit_dir, code_dir)
        cmd_ing = [args.python, BOOT, ingestion_py, "--dataset_dir=" + dataset_dir, "--code_dir=" + code_dir,
                   "--output_dir=" + pred_dir, "--score_dir=" + score_dir,
                   "--ingestion_program_dir=" + os.path.dirname(ingestion_py),
                   "--time_budget=" + repr(float(args.time_budget))]
        cmd_sco = [args.python, BOOT, score_py, "--solution_dir=" + dataset_dir, "--prediction_dir=" + pred_dir,
                   "--score_dir=" + score_dir]
        info("kit: " + kit_desc)
        info("task=%s  T=%gs  tf-mode=%s  code=%s" % (task, args.time_budget, args.tf_mode, code_src))
        info("logs: %s/{ingestion,scoring}.log" % out)

        # Both started at once, scoring first, as the kit's run_local_test.py does.
        t_launch = time.time()
        scoring = KitProcess("scoring", cmd_sco, env, run_dir, os.path.join(out, "scoring.log"), args.verbose)
        ingestion = KitProcess("ingestion", cmd_ing, env, run_dir, os.path.join(out, "ingestion.log"),
                               args.verbose)
        procs = [ingestion, scoring]

        start_txt = os.path.join(pred_dir, "start.txt")
        end_txt = os.path.join(pred_dir, "end.txt")
        note = supervise.wait_for_scoring(ingestion, scoring, pred_dir, score_dir, task, args.time_budget,
                                          t_launch)
        supervise.let_ingestion_exit(ingestion, end_txt, note)
        for p in procs:
            p.stop()
        for p in procs:
            p.close()

        wall = time.time() - wall0
        with open(os.path.join(out, "scoring.log"), errors="replace") as f:
            scoring_log = f.read()
        end_info = results.read_key_values(end_txt)
        status = results.run_status(end_info, results.read_key_values(start_txt), scoring_log,
                                    ingestion.p.returncode)
        if note:
            info(note)
        summary = {
            "task": task, "time_budget": args.time_budget, "tf_mode": args.tf_mode, "status": status,
            "note": note, "kit": kit_desc, "code_dir": code_src, "dataset_dir": dataset_dir,
            "ingestion_rc": ingestion.p.returncode, "scoring_rc": scoring.p.returncode,
            "ingestion_duration": (float(end_info["ingestion_duration"])
                                   if "ingestion_duration" in end_info else None),
            "wall_time": wall, "out": out,
        }
        n_pred_files = results.count_predictions(pred_dir, task)
        if not results.add_scores(summary, os.path.join(score_dir, "scores.txt")):
            info("no scores.txt produced (no prediction scored): reporting zeros")
        rc = results.exit_status(summary)
        if n_pred_files != summary["n_predictions"]:
            info("warning: %d prediction files but %d scored" % (n_pred_files, summary["n_predictions"]))
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        info("status=%s ingestion_rc=%s scoring_rc=%s wall=%.1fs"
             % (status, ingestion.p.returncode, scoring.p.returncode, wall))
        info("learning curve: %s" % os.path.join(score_dir, "learning-curve-%s.png" % task))
        print(results.score_line(summary))
        sys.stdout.flush()
        return rc
    finally:
        for p in procs:
            if p.alive():
                p.stop(grace=1)
        if tmp_root is not None:
            shutil.rmtree(tmp_root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_kit(args)
    except KitRunError as exc:
        info("ERROR: %s" % exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
