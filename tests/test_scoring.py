"""tools.scoring: a prediction folder scored like the kit's score.py.

Always checked against hand-computed values; when the starting kit is available
(AUTODL_KIT_GIT), also against the kit's own score.py on the same folders, and
against a whole kit_run whose predictions we rescore.
"""
import json
import math
import os
import subprocess
import sys
import tarfile
import io
from pathlib import Path

import numpy as np
import pytest

from tools import scoring
from tools.shared_paths import default_kit_run
from tools.errors import UserInputError

KIT_GIT = os.environ.get("AUTODL_KIT_GIT")
KIT_RUN = Path(default_kit_run())
needs_kit = pytest.mark.skipif(
    not KIT_GIT or not Path(KIT_GIT).exists() or not KIT_RUN.is_file(),
    reason="starting kit not available (set AUTODL_KIT_GIT; kit_run at AUTODL_KIT_RUN)",
)

# 4 test examples, 3 classes (multi-class)
SOLUTION = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0]])
PRED_0 = np.array([[0.5, 0.3, 0.2], [0.2, 0.2, 0.6], [0.1, 0.1, 0.8], [0.3, 0.4, 0.3]])
PRED_1 = np.array([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [0.6, 0.3, 0.1]])
# PRED_0 column AUCs: col 0 pos {.5,.3} > neg {.2,.1}: 1; col 1 pos .2 vs {.3,.1,.4}: 1/3;
# col 2 pos .8 beats all: 1 -> NAUC = 2 * (7/3)/3 - 1 = 5/9. PRED_1 is perfect -> NAUC 1.
NAUC_0, NAUC_1 = 5 / 9, 1.0
# soft accuracy: PRED_0 rows .5, .2, .8, .3 -> 0.45; PRED_1 rows .9, .8, .8, .6 -> 0.775
ACC_0, ACC_1 = 0.45, 0.775
START, T0, T1, BUDGET = 1000.0, 1005.5, 1100.25, 300


def x(t, budget=BUDGET):
    return math.log(1 + t / 60) / math.log(1 + budget / 60)


EXPECTED_ALC = NAUC_0 * (x(100.25) - x(5.5)) + NAUC_1 * (1 - x(100.25))


def write_folder(root: Path, task="toy", solution=SOLUTION, predictions=(PRED_0, PRED_1),
                 stamps=(T0, T1), budget=BUDGET, end=True):
    """A dataset folder holding only the solution, and a prediction folder as ingestion writes it."""
    sol_dir, pred_dir = root / "sol", root / "pred"
    sol_dir.mkdir(parents=True)
    pred_dir.mkdir(parents=True)
    np.savetxt(sol_dir / f"{task}.solution", solution, fmt="%d")
    lines = [f"ingestion_pid: 999999", f"task_name: {task}", f"time_budget: {budget}", f"start_time: {START}"]
    lines += [f"{k}: {t}" for k, t in enumerate(stamps)]
    (pred_dir / "start.txt").write_text("\n".join(lines) + "\n")
    for k, pred in enumerate(predictions):
        np.savetxt(pred_dir / f"{task}.predict_{k}", pred, fmt="%g")
    if end:
        (pred_dir / "end.txt").write_text("ingestion_duration: 101\ningestion_success: 1\nend_time: 1101\n")
    return sol_dir / f"{task}.solution", pred_dir


def test_hand_computed_folder(tmp_path):
    solution, pred_dir = write_folder(tmp_path)
    s = scoring.score_prediction_dir(solution, pred_dir)
    assert s.task_name == "toy"
    assert s.n_predictions == 2
    assert s.timestamps == pytest.approx([5.5, 100.25])
    assert s.naucs == pytest.approx([NAUC_0, NAUC_1])
    assert s.accuracy == pytest.approx([ACC_0, ACC_1])
    assert s.alc == pytest.approx(EXPECTED_ALC, abs=1e-12)
    assert s.final_nauc == pytest.approx(1.0)
    assert s.duration == pytest.approx(100.25)
    assert s.time_to_first_prediction == pytest.approx(5.5)
    assert s.time_budget == BUDGET


def test_write_scores_json_and_kit_text(tmp_path):
    solution, pred_dir = write_folder(tmp_path)
    s = scoring.score_prediction_dir(solution, pred_dir)
    scoring.write_scores(s, tmp_path / "scores", extra={"status": "ok"})
    data = json.loads((tmp_path / "scores" / "scores.json").read_text())
    assert data["alc"] == pytest.approx(EXPECTED_ALC)
    assert data["status"] == "ok" and data["n_predictions"] == 2
    parsed = scoring.parse_kit_scores_text((tmp_path / "scores" / "scores.txt").read_text())
    assert parsed["score"] == pytest.approx(EXPECTED_ALC)
    assert parsed["Duration"] == pytest.approx(100.25)
    assert parsed["nauc_scores"] == pytest.approx([NAUC_0, NAUC_1])
    assert parsed["accuracy"] == pytest.approx([ACC_0, ACC_1])


def test_parse_kit_scores_text_with_numpy2_reprs():
    text = ("score: 0.7291247258829798\nDuration: 100.25\ntimestamps: [5.5, 100.25]\n"
            "nauc_scores: [np.float64(0.5555555555555554), np.float64(1.0)]\n"
            "accuracy: [np.float64(-1.5e-05), np.float64(0.77)]\n")
    parsed = scoring.parse_kit_scores_text(text)
    assert parsed == {"score": 0.7291247258829798, "Duration": 100.25, "timestamps": [5.5, 100.25],
                      "nauc_scores": [0.5555555555555554, 1.0], "accuracy": [-1.5e-05, 0.77]}


def test_multilabel_task_has_no_accuracy(tmp_path):
    solution = np.array([[1, 1], [0, 1], [1, 0], [0, 0]])
    pred = np.array([[0.9, 0.8], [0.1, 0.7], [0.6, 0.2], [0.2, 0.1]])
    sol, pred_dir = write_folder(tmp_path, solution=solution, predictions=(pred,), stamps=(T0,))
    s = scoring.score_prediction_dir(sol, pred_dir)
    assert s.accuracy is None
    assert s.naucs == pytest.approx([1.0])
    assert s.alc == pytest.approx(1.0 - x(5.5))


def test_timestamp_without_file_is_ignored(tmp_path):
    # killed between writing the `1:` line and the file: like the kit, only predict_0 counts
    sol, pred_dir = write_folder(tmp_path, predictions=(PRED_0,), stamps=(T0, T1), end=False)
    s = scoring.score_prediction_dir(sol, pred_dir)
    assert s.n_predictions == 1
    assert s.alc == pytest.approx(NAUC_0 * (1 - x(5.5)))


def test_no_prediction_scores_zero(tmp_path):
    sol, pred_dir = write_folder(tmp_path, predictions=(), stamps=())
    s = scoring.score_prediction_dir(sol, pred_dir)
    assert (s.n_predictions, s.alc, s.final_nauc, s.time_to_first_prediction, s.duration) == (0, 0.0, None, None, 0.0)


def test_wrong_shape_names_the_file(tmp_path):
    sol, pred_dir = write_folder(tmp_path, predictions=(PRED_0, PRED_1[:, :2]))
    with pytest.raises(scoring.PredictionFileError, match=r"toy\.predict_1.*shape \(4, 2\).*\(4, 3\)"):
        scoring.score_prediction_dir(sol, pred_dir)


def test_ragged_and_nan_files_are_errors(tmp_path):
    sol, pred_dir = write_folder(tmp_path)
    (pred_dir / "toy.predict_1").write_text("0.1 0.2 0.3\n0.1 0.2\n0.1 0.1 0.1\n0.1 0.1 0.1\n")
    with pytest.raises(scoring.PredictionFileError, match="toy.predict_1"):
        scoring.score_prediction_dir(sol, pred_dir)
    (pred_dir / "toy.predict_1").write_text("nan 0.2 0.3\n0.1 0.2 0.3\n0.1 0.1 0.1\n0.1 0.1 0.1\n")
    with pytest.raises(scoring.PredictionFileError, match="NaN"):
        scoring.score_prediction_dir(sol, pred_dir)


def test_gap_and_missing_timestamp_are_errors(tmp_path):
    sol, pred_dir = write_folder(tmp_path)
    (pred_dir / "toy.predict_1").rename(pred_dir / "toy.predict_2")
    with pytest.raises(scoring.PredictionFileError, match="predict_1 is missing"):
        scoring.score_prediction_dir(sol, pred_dir)
    sol2, pred_dir2 = write_folder(tmp_path / "b", stamps=(T0,))
    with pytest.raises(scoring.PredictionFileError, match="no '1: <time>' line"):
        scoring.score_prediction_dir(sol2, pred_dir2)


def test_missing_start_file_and_useless_solution(tmp_path):
    sol, pred_dir = write_folder(tmp_path)
    (pred_dir / "start.txt").unlink()
    with pytest.raises(UserInputError, match="start.txt"):
        scoring.score_prediction_dir(sol, pred_dir)
    bad = tmp_path / "bad.solution"
    bad.write_text("1 0\n1 0\n")
    with pytest.raises(UserInputError, match="NAUC is undefined"):
        scoring.Scorer(bad, pred_dir)


def test_incremental_scorer_sees_new_files(tmp_path):
    sol, pred_dir = write_folder(tmp_path, predictions=(PRED_0,), stamps=(T0,), end=False)
    scorer = scoring.Scorer(sol, pred_dir)
    assert scorer.update().n_predictions == 1
    # a file whose timestamp line is not there yet waits for the next poll
    np.savetxt(pred_dir / "toy.predict_1", PRED_1, fmt="%g")
    assert scorer.update().n_predictions == 1
    with open(pred_dir / "start.txt", "a") as f:
        f.write(f"1: {T1}\n")
    s = scorer.update()
    assert s.n_predictions == 2 and s.alc == pytest.approx(EXPECTED_ALC)


def test_module_cli(tmp_path):
    sol, pred_dir = write_folder(tmp_path)
    out = subprocess.run([sys.executable, "-m", "tools.scoring", "--solution", str(sol),
                          "--prediction-dir", str(pred_dir), "--score-dir", str(tmp_path / "s")],
                         capture_output=True, text=True, check=True)
    assert f"ALC={EXPECTED_ALC:.6f}" in out.stdout
    assert (tmp_path / "s" / "scores.json").is_file()


# ------------------------------------------------------------------ the kit itself

def export_kit_scoring(dest: Path) -> Path:
    """The kit's scoring program, exported from git into a temporary folder (never into the project)."""
    tar = subprocess.run(["git", f"--git-dir={KIT_GIT}", "archive", "--format=tar", "HEAD",
                          "AutoDL_scoring_program"], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        archive.extractall(dest, filter="data")
    return dest / "AutoDL_scoring_program" / "score.py"


def run_kit_score(tmp_path: Path, sol: Path, pred_dir: Path) -> dict:
    score_py = export_kit_scoring(tmp_path / "kit")
    # The repository's runner keeps its shims in tools/kit/shim/; a runner given by $AUTODL_KIT_RUN (the
    # layout before 0.3.0) in kit_shim/ beside it.
    boot = next((p for p in (KIT_RUN.parent / "shim" / "boot.py", KIT_RUN.parent / "kit_shim" / "boot.py")
                 if p.is_file()), KIT_RUN.parent / "shim" / "boot.py")
    score_dir = tmp_path / "kit_scores"
    subprocess.run([sys.executable, str(boot), str(score_py), f"--solution_dir={sol.parent}",
                    f"--prediction_dir={pred_dir}", f"--score_dir={score_dir}"],
                   capture_output=True, text=True, timeout=120, check=True,
                   env={**os.environ, "MPLBACKEND": "Agg"})
    return scoring.parse_kit_scores_text((score_dir / "scores.txt").read_text())


@needs_kit
def test_kit_score_py_on_hand_folder(tmp_path):
    sol, pred_dir = write_folder(tmp_path)
    kit = run_kit_score(tmp_path, sol, pred_dir)
    ours = scoring.score_prediction_dir(sol, pred_dir)
    assert kit["score"] == pytest.approx(ours.alc, abs=1e-6)
    assert kit["score"] == pytest.approx(EXPECTED_ALC, abs=1e-6)
    assert kit["nauc_scores"] == pytest.approx(ours.naucs, abs=1e-6)
    assert kit["accuracy"] == pytest.approx(ours.accuracy, abs=1e-6)
    assert kit["Duration"] == pytest.approx(ours.duration, abs=1e-6)


@needs_kit
def test_kit_score_py_on_random_multilabel_folder_with_ties(tmp_path):
    rng = np.random.default_rng(1)
    solution = (rng.random((30, 6)) < 0.3).astype(int)
    solution[:, 5] = 0  # a column without positives: both scorers must drop it
    preds = [np.round(rng.random((30, 6)), 1) for _ in range(4)]
    stamps = [START + t for t in (0.7, 3.2, 40.0, 130.5)]
    sol, pred_dir = write_folder(tmp_path, solution=solution, predictions=preds, stamps=stamps, budget=120)
    kit = run_kit_score(tmp_path, sol, pred_dir)
    ours = scoring.score_prediction_dir(sol, pred_dir)
    assert kit["score"] == pytest.approx(ours.alc, abs=1e-6)
    assert kit["nauc_scores"] == pytest.approx(ours.naucs, abs=1e-9)
    assert "accuracy" not in kit and ours.accuracy is None


KIT_TOY_MODEL = '''
"""Three random predictions, reading the test set once in the kit's graph mode to count it."""
import time
import numpy as np
import tensorflow as tf

class Model:
    def __init__(self, metadata):
        self.k = metadata.get_output_size()
        self.done_training = False
        self.calls = 0
        self.n_test = None

    def train(self, dataset, remaining_time_budget=None):
        time.sleep(0.3)

    def test(self, dataset, remaining_time_budget=None):
        if self.n_test is None:
            nxt = tf.compat.v1.data.make_one_shot_iterator(dataset).get_next()
            n = 0
            with tf.compat.v1.Session() as sess:
                try:
                    while True:
                        sess.run(nxt)
                        n += 1
                except tf.errors.OutOfRangeError:
                    pass
            self.n_test = n
        self.calls += 1
        self.done_training = self.calls >= 3
        return np.random.default_rng(self.calls).random((self.n_test, self.k))
'''


@needs_kit
def test_rescore_kit_run_output(tmp_path):
    """kit_run on the kit's miniciao sample; our ALC on its predictions equals the kit's scores.txt."""
    code = tmp_path / "code"
    code.mkdir()
    (code / "model.py").write_text(KIT_TOY_MODEL)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(KIT_RUN), "--code-dir", str(code), "--dataset-dir", "kit:miniciao",
                           "--time-budget", "60", "--out", str(out)],
                          capture_output=True, text=True, timeout=240,
                          env={**os.environ, "KIT_PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr[-3000:]
    kit = scoring.parse_kit_scores_text((out / "scores" / "scores.txt").read_text())
    assert len(kit["nauc_scores"]) == 3
    # the solution is the kit's own sample file: export it next to nothing else
    tar = subprocess.run(["git", f"--git-dir={KIT_GIT}", "archive", "--format=tar", "HEAD",
                          "AutoDL_sample_data/miniciao/miniciao.solution"], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        archive.extractall(tmp_path / "sol", filter="data")
    sol = tmp_path / "sol" / "AutoDL_sample_data" / "miniciao" / "miniciao.solution"
    ours = scoring.score_prediction_dir(sol, out / "predictions")
    assert ours.alc == pytest.approx(kit["score"], abs=1e-6)
    assert ours.naucs == pytest.approx(kit["nauc_scores"], abs=1e-6)
    assert ours.timestamps == pytest.approx(kit["timestamps"], abs=1e-6)
    assert ours.duration == pytest.approx(kit["Duration"], abs=1e-6)
    print(f"kit ALC={kit['score']:.9f} ours={ours.alc:.9f}")
