"""The official kit's runner (tools/kit/) without the kit and without TensorFlow: its options and errors,
the dataset and code folders, the kit's scores.txt, the export from git, the shipped shims. One slow
end-to-end run of the kit's linear baseline needs the kit ($AUTODL_KIT_GIT).
"""
from __future__ import annotations

import ast
import importlib.util
import json
import os
import py_compile
import subprocess
import sys
from pathlib import Path

import pytest

from tools import cli
from tools.kit import export, inputs, results
from tools.kit import run as kit_run
from tools.kit.errors import KitRunError
from tools.shared_paths import REPO_ROOT, default_kit_run

SHIM = REPO_ROOT / "tools" / "kit" / "shim"
PROJECT_PACKAGES = {"tools", "autodl_core", "autodl_data", "meta_db", "pretrained"}
GIT_ENV = {**os.environ, "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.org",
           "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.org", "GIT_CONFIG_NOSYSTEM": "1"}


# ------------------------------------------------------------------ building blocks
def git(*args, cwd=None) -> str:
    return subprocess.run(["git", *args], cwd=cwd, env=GIT_ENV, check=True, capture_output=True,
                          text=True).stdout.strip()


# Stand-ins for the kit's two programs, with the kit's arguments and files but no TensorFlow: ingestion
# imports model.py, writes start.txt, $STAND_IN_PREDICTIONS prediction files and end.txt; scoring waits
# for end.txt and writes a scores.txt in the kit's format when there is something to score.
STAND_IN_INGESTION = """import argparse, os, sys, time
p = argparse.ArgumentParser()
for a in ("dataset_dir", "code_dir", "output_dir", "score_dir", "ingestion_program_dir", "time_budget"):
    p.add_argument("--" + a)
args = p.parse_args()
task = [d[:-5] for d in os.listdir(args.dataset_dir) if d.endswith(".data")][0]
sys.path.insert(0, args.code_dir)
import model
start = time.time()
with open(os.path.join(args.output_dir, "start.txt"), "w") as f:
    f.write("ingestion_pid: %d\\nstart_time: %f\\n" % (os.getpid(), start))
for i in range(int(os.environ.get("STAND_IN_PREDICTIONS", "1"))):
    with open(os.path.join(args.output_dir, "%s.predict_%d" % (task, i)), "w") as f:
        f.write("0.5 0.5\\n")
with open(os.path.join(args.output_dir, "end.txt"), "w") as f:
    f.write("ingestion_duration: %f\\ningestion_success: 1\\nend_time: %f\\n" % (time.time() - start, time.time()))
print("stand-in ingestion done, budget", args.time_budget)
"""
STAND_IN_SCORING = """import argparse, os, time
p = argparse.ArgumentParser()
for a in ("solution_dir", "prediction_dir", "score_dir"):
    p.add_argument("--" + a)
args = p.parse_args()
deadline = time.time() + 30
while not os.path.isfile(os.path.join(args.prediction_dir, "end.txt")) and time.time() < deadline:
    time.sleep(0.1)
n = len([f for f in os.listdir(args.prediction_dir) if ".predict_" in f])
if n:
    with open(os.path.join(args.score_dir, "scores.txt"), "w") as f:
        f.write("score: 0.400000\\nDuration: 0.25\\n")
        f.write("timestamps: [%s]\\n" % ", ".join("np.float64(%.2f)" % (0.1 * (i + 1)) for i in range(n)))
        f.write("nauc_scores: [%s]\\n" % ", ".join("np.float64(%.2f)" % (0.5 + 0.1 * i) for i in range(n)))
print("stand-in scoring scored", n)
"""


def make_kit_checkout(root: Path, with_programs: bool = True) -> Path:
    """A git checkout that looks like the starting kit (its two programs, a sample dataset, a README)."""
    root.mkdir(parents=True)
    git("init", "-q", cwd=root)
    (root / "README.md").write_text("a stand-in for the starting kit\n")
    if with_programs:
        for program, source in ((export.INGESTION, STAND_IN_INGESTION), (export.SCORING, STAND_IN_SCORING)):
            (root / program).parent.mkdir(parents=True, exist_ok=True)
            (root / program).write_text(source)
    make_dataset(root / inputs.SAMPLE_DATA / "tiny", "tiny")
    git("add", "-A", cwd=root)
    git("commit", "-q", "-m", "kit", cwd=root)
    return root


def make_dataset(folder: Path, name: str) -> Path:
    """The kit's layout without records: <name>.data/{train,test}/metadata.textproto and <name>.solution."""
    for sub in ("train", "test"):
        (folder / f"{name}.data" / sub).mkdir(parents=True)
        (folder / f"{name}.data" / sub / "metadata.textproto").write_text("is_sequence: false\n")
    (folder / f"{name}.solution").write_text("1 0\n0 1\n")
    return folder


def fake_python(tmp_path: Path) -> str:
    """An 'interpreter' that answers the runner's probe as one with every module the kit needs would."""
    script = tmp_path / "fake_python"
    script.write_text("#!/bin/sh\nprintf '\\nTrue\\n'\n")
    script.chmod(0o755)
    return str(script)


def probe_answering_python(tmp_path: Path) -> str:
    """This interpreter, except that it answers the runner's module probe as a complete one would."""
    script = tmp_path / "probe_answering_python"
    script.write_text("#!/bin/sh\nif [ \"$1\" = -c ]; then printf '\\nTrue\\n'; exit 0; fi\n"
                      f"exec {sys.executable} \"$@\"\n")
    script.chmod(0o755)
    return str(script)


def tools_kit(capsys, *argv) -> tuple[int, str]:
    """`tools kit ARGV` in-process: (exit status, stderr)."""
    code = cli.main(["kit", *argv])
    return code, capsys.readouterr().err


# ------------------------------------------------------------------ where it is, what it ships
def test_default_kit_run_is_the_repository_script(monkeypatch, tmp_path):
    monkeypatch.delenv("AUTODL_KIT_RUN", raising=False)
    path = Path(default_kit_run())
    assert path.is_file() and path.resolve().is_relative_to(REPO_ROOT)
    assert path == REPO_ROOT / "tools" / "kit" / "run.py"
    elsewhere = str(tmp_path / "elsewhere" / "runner")
    monkeypatch.setenv("AUTODL_KIT_RUN", elsewhere)
    assert default_kit_run() == elsewhere


@pytest.mark.parametrize("name", ["boot.py", "tf1_estimator.py"])
def test_shims_are_shipped_compile_and_import_nothing_of_ours(tmp_path, name):
    path = SHIM / name
    py_compile.compile(str(path), cfile=str(tmp_path / (name + "c")), doraise=True)
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & PROJECT_PACKAGES
    assert Path(kit_run.BOOT) == SHIM / "boot.py"


def test_the_shim_keeps_the_real_tensorflow_inside_a_client_dir(monkeypatch):
    """With the checkout as the code dir (`--no-copy-code`, as `tools bench` runs ours), the shim's own
    files lie in a client dir; they must still import the real TensorFlow, or building the TF1 alias would
    import the alias. Only the decision is checked here (TensorFlow is not imported)."""
    spec = importlib.util.spec_from_file_location("_boot_under_test", SHIM / "boot.py")
    boot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(boot)  # defines the shim; starts nothing (main() only runs as a script)
    monkeypatch.setattr(boot, "_CLIENT_DIRS", (os.path.join(str(REPO_ROOT), ""),))
    assert boot._is_client({"__file__": str(REPO_ROOT / "model.py")})
    assert not boot._is_client({"__file__": str(SHIM / "boot.py")})
    assert not boot._is_client({"__file__": str(SHIM / "tf1_estimator.py")})
    assert not boot._is_client({"__file__": "/usr/lib/python3/os.py"}) and not boot._is_client({})


def test_runner_imports_neither_tensorflow_nor_the_solver():
    """`tools package --verify` runs the runner under an import guard: our packages must not load there."""
    code = ("import sys, tools.kit.run, tools.kit.command; "
            "print(sorted(m for m in ('tensorflow', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    code = "import sys, tools.kit.run; print('autodl_core' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("how", ["script", "module"])
def test_runner_starts_as_a_script_and_as_a_module(tmp_path, how):
    head = [str(REPO_ROOT / "tools" / "kit" / "run.py")] if how == "script" else ["-m", "tools.kit.run"]
    cwd = tmp_path if how == "script" else REPO_ROOT  # the script finds its package from anywhere
    out = subprocess.run([sys.executable, *head, "--help"], cwd=cwd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for option in ("--code-dir", "--dataset-dir", "--time-budget", "--out", "--kit", "--kit-rev", "--tf-mode",
                   "--python", "--keep-kit", "--no-copy-code", "--verbose", "Exit status"):
        assert option in out.stdout
    out = subprocess.run([sys.executable, *head, "--code-dir", "x"], cwd=cwd, capture_output=True, text=True)
    assert out.returncode == 2 and "required" in out.stderr


# ------------------------------------------------------------------ options and errors
def test_options_and_their_defaults(monkeypatch, tmp_path):
    kit_git, python = str(tmp_path / "kit.git"), str(tmp_path / "python")
    monkeypatch.setenv("AUTODL_KIT_GIT", kit_git)
    monkeypatch.setenv("KIT_PYTHON", python)
    monkeypatch.delenv("KIT_TF_MODE", raising=False)
    args = kit_run.build_parser().parse_args(["--code-dir", "c", "--dataset-dir", "kit:miniciao",
                                              "--time-budget", "60", "--out", "o"])
    assert (args.kit, args.kit_rev, args.python, args.tf_mode) == (kit_git, "HEAD", python, "graph")
    assert args.time_budget == 60.0 and not (args.verbose or args.keep_kit or args.no_copy_code)
    with pytest.raises(SystemExit) as exit_info:
        kit_run.build_parser().parse_args(["--code-dir", "c", "--dataset-dir", "d", "--time-budget", "60",
                                           "--out", "o", "--tf-mode", "lazy"])
    assert exit_info.value.code == 2


def test_runner_usage_errors_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("AUTODL_KIT_GIT", raising=False)
    base = ["--code-dir", str(tmp_path), "--dataset-dir", str(tmp_path), "--out", str(tmp_path / "out"),
            "--python", fake_python(tmp_path)]
    assert kit_run.main(base + ["--time-budget", "0"]) == 2
    assert "--time-budget must be > 0" in capsys.readouterr().err
    assert kit_run.main(base + ["--time-budget", "5"]) == 2
    err = capsys.readouterr().err
    assert "[kit_run] ERROR: no kit given" in err and "Traceback" not in err


def test_tools_kit_names_a_missing_or_wrong_kit(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("AUTODL_KIT_GIT", raising=False)
    dataset = make_dataset(tmp_path / "data", "toy")
    code = tmp_path / "code"
    code.mkdir()
    (code / "model.py").write_text("")
    base = ["--code-dir", str(code), "--dataset-dir", str(dataset), "--time-budget", "10",
            "--out", str(tmp_path / "out")]

    status, err = tools_kit(capsys, *base)
    assert status == 2 and "no kit given" in err and "AUTODL_KIT_GIT" in err and "Traceback" not in err
    status, err = tools_kit(capsys, *base, "--kit", "")
    assert status == 2 and "no kit given" in err
    status, err = tools_kit(capsys, *base, "--kit", str(tmp_path / "nowhere.git"))
    assert status == 2 and "does not exist" in err
    status, err = tools_kit(capsys, *base, "--kit", str(code))  # a folder, neither git nor a kit
    assert status == 2 and "neither a git repository of the starting kit nor an exported kit directory" in err
    other = make_kit_checkout(tmp_path / "other_repo", with_programs=False)
    status, err = tools_kit(capsys, *base, "--kit", str(other))
    assert status == 2 and "not the AutoDL starting kit" in err and "ingestion.py" in err
    kit = make_kit_checkout(tmp_path / "kit")
    status, err = tools_kit(capsys, *base, "--kit", str(kit), "--kit-rev", "no-such-branch")
    assert status == 2 and "cannot resolve no-such-branch" in err
    assert not (tmp_path / "out").exists()  # nothing started, nothing written


def test_tools_kit_names_a_wrong_dataset_or_code_folder(tmp_path, monkeypatch, capsys):
    kit = make_kit_checkout(tmp_path / "kit")
    monkeypatch.setenv("AUTODL_KIT_GIT", str(kit / ".git"))
    code = tmp_path / "code"
    code.mkdir()
    (code / "model.py").write_text("")
    good = make_dataset(tmp_path / "data", "toy")

    def attempt(dataset, code_dir=code):
        return tools_kit(capsys, "--code-dir", str(code_dir), "--dataset-dir", str(dataset), "--time-budget", "10",
                         "--out", str(tmp_path / "out"), "--python", fake_python(tmp_path))

    status, err = attempt(tmp_path / "missing")
    assert status == 2 and "dataset dir not found" in err
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "x.tfrecord").write_text("")
    status, err = attempt(flat)
    assert status == 2 and "exactly one *.data folder and one *.solution file" in err
    no_meta = make_dataset(tmp_path / "no_meta", "nm")
    (no_meta / "nm.data" / "test" / "metadata.textproto").unlink()
    status, err = attempt(no_meta)
    assert status == 2 and "missing nm.data/test/metadata.textproto" in err
    status, err = attempt(good, code_dir=tmp_path)
    assert status == 2 and "no model.py in code dir" in err
    # A `kit:` name is looked up in the run's export of the kit (found missing there: no process started).
    status, err = attempt("kit:not_a_sample")
    assert status == 2 and "dataset dir not found" in err and "AutoDL_sample_data" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "predictions").exists()


def test_tools_kit_is_registered():
    assert cli.SUBCOMMANDS["kit"] == "tools.kit.command"
    help_text = cli.build_parser("kit").format_help()
    assert "kit" in help_text


# ------------------------------------------------------------------ dataset and code folders
def test_kit_names_resolve_inside_the_kit(tmp_path):
    kit_dir = tmp_path / "kit"
    (kit_dir / "AutoDL_sample_data" / "miniciao").mkdir(parents=True)
    (kit_dir / "AutoDL_simple_baseline_models" / "linear").mkdir(parents=True)
    assert inputs.resolve("kit:miniciao", str(kit_dir), "dataset") == str(kit_dir / "AutoDL_sample_data" / "miniciao")
    assert inputs.resolve("kit:AutoDL_sample_data/miniciao/", str(kit_dir), "dataset") == \
        str(kit_dir / "AutoDL_sample_data" / "miniciao")
    assert inputs.resolve("kit:AutoDL_simple_baseline_models/linear", str(kit_dir), "code") == \
        str(kit_dir / "AutoDL_simple_baseline_models" / "linear")
    assert inputs.resolve(str(kit_dir), "unused", "dataset") == str(kit_dir)
    with pytest.raises(KitRunError, match="code dir not found"):
        inputs.resolve("kit:nothing", str(kit_dir), "code")


def test_dataset_task_of_kit_style_folders(tmp_path):
    assert inputs.dataset_task(str(make_dataset(tmp_path / "a", "flowers"))) == "flowers"
    two = make_dataset(tmp_path / "b", "one")
    make_dataset(two, "two")
    with pytest.raises(KitRunError, match="exactly one"):
        inputs.dataset_task(str(two))
    no_solution = make_dataset(tmp_path / "c", "ns")
    (no_solution / "ns.solution").unlink()
    with pytest.raises(KitRunError, match="exactly one"):
        inputs.dataset_task(str(no_solution))
    no_train = make_dataset(tmp_path / "d", "nt")
    (no_train / "nt.data" / "train" / "metadata.textproto").unlink()
    with pytest.raises(KitRunError, match="nt.data/train/metadata.textproto"):
        inputs.dataset_task(str(no_train))


# ------------------------------------------------------------------ the kit's scores
SCORES_TXT = """score: 0.254840
Duration: 1.55
timestamps: [np.float64(0.8), np.float64(1.55)]
nauc_scores: [np.float64(0.2), 0.260897]
accuracy: [0.5, 6.5e-01]
"""


def test_parse_scores_and_the_summary_line(tmp_path):
    path = tmp_path / "scores.txt"
    path.write_text(SCORES_TXT)
    assert results.parse_scores(str(path)) == {"score": 0.25484, "Duration": 1.55, "timestamps": [0.8, 1.55],
                                               "nauc_scores": [0.2, 0.260897], "accuracy": [0.5, 0.65]}
    summary = {}
    assert results.add_scores(summary, str(path))
    assert summary["nauc_last"] == 0.260897 and summary["n_predictions"] == 2 and summary["alc"] == 0.25484
    assert results.exit_status(summary) == 0
    assert results.score_line(summary) == "ALC=0.254840 NAUC=0.260897 n_predictions=2 duration=1.55"

    empty = {}
    assert not results.add_scores(empty, str(tmp_path / "absent.txt"))
    assert results.exit_status(empty) == 3
    assert results.score_line(empty) == "ALC=0.000000 NAUC=0.000000 n_predictions=0 duration=0.00"
    assert "accuracy" not in empty  # as the kit's former runner wrote it

    path.write_text("score: \nDuration: nan\nnauc_scores: []\n")
    scored_nothing = {}
    results.add_scores(scored_nothing, str(path))
    assert scored_nothing["n_predictions"] == 0 and scored_nothing["nauc_last"] is None
    assert results.exit_status(scored_nothing) == 3


def test_key_values_status_and_prediction_count(tmp_path):
    (tmp_path / "end.txt").write_text("ingestion_duration: 12.5\ningestion_success: 1\nend_time: 3.0\n")
    end_info = results.read_key_values(str(tmp_path / "end.txt"))
    assert end_info == {"ingestion_duration": "12.5", "ingestion_success": "1", "end_time": "3.0"}
    assert results.read_key_values(str(tmp_path / "absent.txt")) == {}
    assert results.run_status(end_info, {}, "", 0) == "ok"
    assert results.run_status({"ingestion_success": "0"}, {}, "", 1) == "ingestion_error"
    assert results.run_status({}, {}, "Detected time budget is used up", None) == "time_budget_exceeded"
    assert results.run_status({}, {"start_time": "1"}, "", -15) == "time_budget_exceeded"
    assert results.run_status({}, {}, "", -15) == "ingestion_died"
    assert results.run_status({}, {"start_time": "1"}, "", 1) == "ingestion_died"
    for name in ("toy.predict_0", "toy.predict_1", "start.txt", "other.predict_0"):
        (tmp_path / name).write_text("")
    assert results.count_predictions(str(tmp_path), "toy") == 2


# ------------------------------------------------------------------ the kit's export
def test_export_from_git_checkout_bare_clone_and_folder(tmp_path):
    kit = make_kit_checkout(tmp_path / "kit")
    (kit / "uncommitted.txt").write_text("only in the work tree\n")
    commit = git("rev-parse", "HEAD", cwd=kit)
    git("clone", "-q", "--bare", str(kit), str(tmp_path / "kit.git"))

    for given, git_dir in ((kit, kit / ".git"), (kit / ".git", kit / ".git"),
                           (tmp_path / "kit.git", tmp_path / "kit.git")):
        dest = tmp_path / ("export_" + given.name)
        dest.mkdir()
        described = export.export(str(given), "HEAD", str(dest))
        assert described == f"git {git_dir} @ {commit}"
        assert (dest / "README.md").read_text() == "a stand-in for the starting kit\n"
        assert (dest / export.INGESTION).is_file() and (dest / "AutoDL_sample_data" / "tiny").is_dir()
        assert not (dest / "uncommitted.txt").exists() and not (dest / ".git").exists()
        assert export.check(str(given)) == described

    plain = tmp_path / "plain_kit"  # a kit folder without git: copied as it is
    subprocess.run(["cp", "-r", str(kit), str(plain)], check=True)
    subprocess.run(["rm", "-rf", str(plain / ".git")], check=True)
    dest = tmp_path / "export_plain"
    dest.mkdir()
    assert export.export(str(plain), "HEAD", str(dest)) == f"directory {plain}"
    assert (dest / "uncommitted.txt").is_file() and (dest / export.SCORING).is_file()
    assert export.check(str(plain)) == f"directory {plain}"


def test_export_picks_the_revision_asked_for(tmp_path):
    kit = make_kit_checkout(tmp_path / "kit")
    first = git("rev-parse", "HEAD", cwd=kit)
    (kit / "README.md").write_text("second version\n")
    git("commit", "-q", "-am", "second", cwd=kit)
    dest = tmp_path / "dest"
    dest.mkdir()
    assert export.export(str(kit), first, str(dest)).endswith(first)
    assert (dest / "README.md").read_text() == "a stand-in for the starting kit\n"


# ------------------------------------------------------------------ a whole run, with stand-in programs
SUMMARY_KEYS = ["task", "time_budget", "tf_mode", "status", "note", "kit", "code_dir", "dataset_dir", "ingestion_rc",
                "scoring_rc", "ingestion_duration", "wall_time", "out", "alc", "duration", "nauc_scores",
                "timestamps", "accuracy", "nauc_last", "n_predictions"]


@pytest.mark.parametrize("predictions", [2, 0])
def test_a_whole_run_with_stand_in_kit_programs(tmp_path, predictions):
    """The runner's orchestration through the real shim/boot.py: export, both programs in parallel, the
    summary, the last line and the exit status (0 when scored, 3 when nothing was)."""
    kit = make_kit_checkout(tmp_path / "kit")
    code = tmp_path / "code"
    code.mkdir()
    (code / "model.py").write_text("class Model: pass\n")
    out = tmp_path / "out"
    (out / "predictions").mkdir(parents=True)
    (out / "predictions" / "stale.predict_9").write_text("")  # an earlier run's output: removed first
    env = {**os.environ, "STAND_IN_PREDICTIONS": str(predictions)}
    env.pop("AUTODL_KIT_GIT", None)
    completed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools" / "kit" / "run.py"), "--code-dir", str(code),
         "--dataset-dir", "kit:tiny", "--time-budget", "30", "--out", str(out), "--kit", str(kit),
         "--python", probe_answering_python(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    summary = json.loads((out / "summary.json").read_text())
    last = completed.stdout.strip().splitlines()[-1]
    assert (out / "code" / "model.py").is_file() and not (out / "predictions" / "stale.predict_9").exists()
    assert "stand-in ingestion done, budget 30.0" in (out / "ingestion.log").read_text()
    assert summary["status"] == "ok" and summary["task"] == "tiny" and summary["kit"].startswith("git ")
    assert summary["ingestion_rc"] == 0 and summary["scoring_rc"] == 0 and summary["note"] is None
    assert summary["dataset_dir"].endswith(os.path.join("AutoDL_sample_data", "tiny"))
    assert not Path(summary["dataset_dir"]).exists()  # the kit's export is removed after the run
    if predictions:
        assert completed.returncode == 0, completed.stderr
        assert list(summary) == SUMMARY_KEYS
        assert summary["nauc_scores"] == [0.5, 0.6] and summary["timestamps"] == [0.1, 0.2]
        assert last == "ALC=0.400000 NAUC=0.600000 n_predictions=2 duration=0.25"
    else:
        assert completed.returncode == 3, completed.stderr
        assert list(summary) == [k for k in SUMMARY_KEYS if k != "accuracy"]
        assert last == "ALC=0.000000 NAUC=0.000000 n_predictions=0 duration=0.00"
        assert "no scores.txt produced" in completed.stderr


# ------------------------------------------------------------------ end to end, through the real kit
@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("AUTODL_KIT_GIT"), reason="needs the official starting kit ($AUTODL_KIT_GIT)")
def test_kit_linear_baseline_on_miniciao(tmp_path):
    out = tmp_path / "out"
    completed = subprocess.run(
        [sys.executable, "-m", "tools", "kit", "--code-dir", "kit:AutoDL_simple_baseline_models/linear",
         "--dataset-dir", "kit:miniciao", "--time-budget", "60", "--out", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=1800)
    assert completed.returncode == 0, completed.stderr[-3000:]
    last = completed.stdout.strip().splitlines()[-1]
    scores = dict(token.split("=") for token in last.split())
    assert set(scores) == {"ALC", "NAUC", "n_predictions", "duration"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "miniciao"
    assert summary["n_predictions"] == int(scores["n_predictions"]) >= 1
    # The linear baseline can score below chance on miniciao (ALC -0.087 at T = 60 s): NAUC spans -1..1.
    assert -1.0 <= summary["alc"] <= 1.0 and abs(summary["alc"] - float(scores["ALC"])) < 1e-6
    assert summary["status"] in ("ok", "time_budget_exceeded")
    assert (out / "scores" / "scores.txt").is_file() and (out / "ingestion.log").is_file()
    assert summary["kit"].startswith(("git ", "directory "))
