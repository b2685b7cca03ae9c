"""tools.runner / tools.ingestion end to end on a tiny AutoDL dataset, with toy model.py files.

The three runs (graph + prior model + done_training; eager + wrong shape; graph +
a model sleeping past the budget) go on concurrently in one module fixture, to keep
the file fast on 2 cores: each run pays ~8 s of torch + TensorFlow import.
"""
import io
import json
import os
import subprocess
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from tools import runner
from tools.errors import UserInputError
from tools.scoring import score_prediction_dir

TOY_MODEL = '''
"""Toy model for the runner tests: behaviour from behaviour.json next to this file."""
import json
import os
import time

import numpy as np
import tensorflow as tf

HERE = os.path.dirname(os.path.abspath(__file__))
CFG = json.load(open(os.path.join(HERE, "behaviour.json")))


def to_numpy(dataset):
    """Labels and per-example mean pixel, read in whichever TF mode ingestion runs."""
    feats, labels = [], []
    if tf.executing_eagerly():
        for x, y in dataset.as_numpy_iterator():
            feats.append(x.mean()); labels.append(y)
    else:
        nxt = tf.compat.v1.data.make_one_shot_iterator(dataset).get_next()
        with tf.compat.v1.Session() as sess:
            try:
                while True:
                    x, y = sess.run(nxt)
                    feats.append(x.mean()); labels.append(y)
            except tf.errors.OutOfRangeError:
                pass
    return np.array(feats), np.array(labels)


class Model:
    def __init__(self, metadata):
        time.sleep(CFG.get("init_sleep", 0))
        self.n_classes = metadata.get_output_size()
        self.done_training = False
        self.k = 0
        self.test_feats = None

    def train(self, dataset, remaining_time_budget=None):
        if self.k == 0:
            _, labels = to_numpy(dataset)
            self.prior = labels.mean(axis=0)
            print(f"[toy] eager={tf.executing_eagerly()} n_train={len(labels)}", flush=True)
        if self.k >= CFG.get("sleep_from", 10**9):
            time.sleep(CFG["sleep_seconds"])

    def test(self, dataset, remaining_time_budget=None):
        if self.test_feats is None:
            self.test_feats, _ = to_numpy(dataset)
        n = len(self.test_feats)
        if self.k == CFG.get("wrong_shape_at"):
            return np.zeros((n, self.n_classes + 1))
        if CFG["predict"] == "prior":
            pred = np.tile(self.prior, (n, 1))
        else:
            pred = np.random.default_rng(self.k).random((n, self.n_classes))
        self.k += 1
        if self.k >= CFG.get("rounds", 10**9):
            self.done_training = True
        return pred
'''


def write_code(root: Path, **behaviour) -> Path:
    root.mkdir(parents=True)
    (root / "model.py").write_text(TOY_MODEL)
    (root / "behaviour.json").write_text(json.dumps(behaviour))
    return root


def import_torch_before_tensorflow():
    """The writer imports TensorFlow in this process; triton after TF segfaults (see common notes)."""
    try:
        import torch  # noqa: F401
        import torch._dynamo  # noqa: F401
    except ImportError:
        pass


def make_tiny_dataset(root: Path) -> Path:
    """A 3-class dataset of tiny random images, or the kit's miniciao sample when the writer is missing."""
    try:
        from autodl_data.autodl_format import write_autodl_dataset
    except ImportError:
        write_autodl_dataset = None
    if write_autodl_dataset is not None:
        import_torch_before_tensorflow()
        rng = np.random.default_rng(0)
        n_train, n_test, k = 30, 12, 3
        images = rng.integers(0, 256, size=(n_train + n_test, 8, 8, 3), dtype=np.uint8)
        labels = np.eye(k, dtype=int)[np.arange(n_train + n_test) % k]
        examples = list(zip(images, labels))
        write_autodl_dataset(root, "tiny", examples[:n_train], examples[n_train:], output_dim=k)
        return root / "tiny"
    kit = os.environ.get("AUTODL_KIT_GIT")
    if not kit or not Path(kit).exists():
        pytest.skip("no dataset writer in autodl_data.autodl_format yet and no starting kit (AUTODL_KIT_GIT)")
    tar = subprocess.run(["git", f"--git-dir={kit}", "archive", "--format=tar", "HEAD",
                          "AutoDL_sample_data/miniciao"], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        archive.extractall(root / "kit", filter="data")
    return root / "kit" / "AutoDL_sample_data" / "miniciao"


SCENARIOS = {
    # prior-only predictions, stops after 2 rounds through done_training
    "prior_graph": dict(behaviour=dict(predict="prior", rounds=2), tf_mode="graph", budget=60),
    # third prediction has one column too many: error, the first two are kept
    "wrong_shape_eager": dict(behaviour=dict(predict="random", wrong_shape_at=2), tf_mode="eager", budget=60),
    # sleeps 120 s in the second train call: killed at T, the first prediction is scored
    "sleeper_graph": dict(behaviour=dict(predict="random", sleep_from=1, sleep_seconds=120), tf_mode="graph",
                          budget=4),
    # __init__ sleeps past the init limit: no model, failed run, no prediction
    "slow_init": dict(behaviour=dict(predict="random", init_sleep=60), tf_mode="graph", budget=5, init_limit=1),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runner")
    dataset = make_tiny_dataset(root)

    def one(name):
        spec = SCENARIOS[name]
        code = write_code(root / name / "code", **spec["behaviour"])
        return runner.run_local(code, dataset, spec["budget"], root / name / "out", tf_mode=spec["tf_mode"],
                                init_limit=spec.get("init_limit", 1200), kill_grace=2.0)

    with ThreadPoolExecutor(len(SCENARIOS)) as pool:
        results = dict(zip(SCENARIOS, pool.map(one, SCENARIOS)))
    return results


def log_of(result) -> str:
    return (Path(result["out_dir"]) / "ingestion.log").read_text(errors="replace")


def test_prior_model_graph_mode_stops_at_done_training(runs):
    r = runs["prior_graph"]
    assert r["status"] == "ok", r["error"]
    assert r["stop_reason"] == "done_training"
    assert r["n_predictions"] == 2
    assert r["naucs"] == pytest.approx([0.0, 0.0])  # constant columns: AUC 1/2 everywhere
    assert r["alc"] == pytest.approx(0.0)
    assert "[toy] eager=False" in log_of(r)
    assert 0 < r["time_to_first_prediction"] <= r["duration"] < 60
    assert r["peak_rss_bytes"] > 100e6  # TensorFlow alone is several hundred MB


def test_outputs_are_written_and_consistent(runs):
    r = runs["prior_graph"]
    out = Path(r["out_dir"])
    pred = out / "predictions"
    assert (pred / "start.txt").is_file() and (pred / "end.txt").is_file()
    task = r["task_name"]
    assert sorted(p.name for p in pred.glob(f"{task}.predict_*")) == [f"{task}.predict_0", f"{task}.predict_1"]
    for name in ("scores.json", "scores.txt", "learning-curve.png", "report.html"):
        assert (out / "scores" / name).stat().st_size > 0
    saved = json.loads((out / "scores" / "scores.json").read_text())
    assert saved["alc"] == r["alc"] and saved["status"] == "ok" and saved["peak_rss_bytes"] == r["peak_rss_bytes"]
    html = (out / "scores" / "report.html").read_text()
    assert "data:image/png;base64," in html and "status: ok" in html
    # rescoring the folder from scratch gives the same numbers
    from autodl_data.autodl_format import find_task

    again = score_prediction_dir(find_task(r["dataset_dir"]).solution_path, pred)
    assert again.alc == pytest.approx(r["alc"], abs=1e-12) and again.naucs == pytest.approx(r["naucs"])
    # predictions are %g text, one row per test example
    rows = (pred / f"{task}.predict_0").read_text().splitlines()
    assert len(rows) == len(np.loadtxt(find_task(r["dataset_dir"]).solution_path, ndmin=2))


def test_wrong_shape_in_eager_mode_keeps_earlier_predictions(runs):
    r = runs["wrong_shape_eager"]
    assert r["status"] == "ingestion_error"
    assert "bad prediction shape" in r["error"] and "got (" in r["error"]
    assert r["n_predictions"] == 2
    assert "[toy] eager=True" in log_of(r)
    end = (Path(r["out_dir"]) / "predictions" / "end.txt").read_text()
    assert "ingestion_success: 0" in end


def test_model_sleeping_past_the_budget_is_killed(runs):
    r = runs["sleeper_graph"]
    assert r["status"] == "time_budget_exceeded"
    assert r["n_predictions"] == 1
    assert r["alc"] != 0.0 or r["naucs"] == [0.0]
    assert "stage 'train'" in r["note"]
    assert not (Path(r["out_dir"]) / "predictions" / "end.txt").exists()
    # killed within the grace period of T, not after the 120 s sleep
    assert r["wall_time"] < 100


def test_init_over_the_limit_fails_the_run(runs):
    r = runs["slow_init"]
    assert r["status"] == "ingestion_error"
    assert "init limit of 1 s" in r["error"]
    assert r["n_predictions"] == 0 and r["alc"] == 0.0 and r["time_to_first_prediction"] is None
    assert runner.final_line(r).endswith("n_predictions=0 duration=0.00 first_prediction=none")


def test_final_line_format(runs):
    line = runner.final_line(runs["prior_graph"])
    assert line.startswith("ALC=0.000000 NAUC=0.000000 n_predictions=2 duration=")
    assert "first_prediction=" in line


# --------------------------------------------------------------- input errors (no subprocess)

def test_bad_inputs_are_clear_errors(tmp_path):
    code = write_code(tmp_path / "code", predict="prior")
    dataset = tmp_path / "nodata"
    dataset.mkdir()
    with pytest.raises(UserInputError, match="code folder not found"):
        runner.run_local(tmp_path / "missing", dataset, 10, tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError, match="no model.py"):
        runner.run_local(tmp_path / "empty", dataset, 10, tmp_path / "out")
    with pytest.raises(UserInputError, match="positive"):
        runner.run_local(code, dataset, 0, tmp_path / "out")
    with pytest.raises(UserInputError, match="positive"):
        runner.run_local(code, dataset, -5, tmp_path / "out")
    with pytest.raises(UserInputError, match=r"\.data"):
        runner.run_local(code, dataset, 10, tmp_path / "out")
    with pytest.raises(UserInputError, match="not found"):
        runner.run_local(code, tmp_path / "nowhere", 10, tmp_path / "out")


def test_cli_reports_bad_input_with_exit_code_2(tmp_path, capsys):
    from tools.cli import main

    rc = main(["run", "--code-dir", str(tmp_path / "missing"), "--dataset-dir", str(tmp_path),
               "--time-budget", "5", "--out", str(tmp_path / "out")])
    assert rc == 2
    assert "code folder not found" in capsys.readouterr().err
