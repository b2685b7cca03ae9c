"""Frozen passes through an inference engine: chosen by measurement, checked against torch, torch as fallback."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from autodl_core import engines
from autodl_core.engines import EngineChoice, TorchRunner, choose_runner, relative_error


def small_net():
    timm = pytest.importorskip("timm")
    return timm.create_model("mobilenetv2_050", pretrained=False, num_classes=0).eval()


class WrongRunner:
    """An engine whose output is off (a broken export, a precision bug)."""
    name = "onnxruntime"

    def __init__(self, module):
        self.module = module

    def __call__(self, x):
        with torch.no_grad():
            return self.module(x) * 0.5 + 1.0

    def set_threads(self, threads):
        pass


class FastWrongRunner(WrongRunner):
    threads = 1


def test_relative_error_measures_the_difference_against_the_reference():
    a = torch.ones(4, 8)
    assert relative_error(a, a) == 0.0
    assert relative_error(a, a * 1.01) == pytest.approx(0.01, rel=1e-3)
    assert relative_error(a, torch.ones(4, 9)) == float("inf")


def test_an_engine_whose_output_differs_from_torch_is_not_used(monkeypatch):
    net = small_net()
    monkeypatch.setattr(engines, "build_engine", lambda name, module, *a, **k: FastWrongRunner(module))
    monkeypatch.setenv(engines.ENGINE_ENV, "auto")
    choice = choose_runner(net, torch.randn(2, 3, 64, 64), torch.device("cpu"), engines=["torch", "onnxruntime"])
    assert isinstance(choice.runner, TorchRunner)
    assert "differs from torch" in choice.errors["onnxruntime"]


def test_an_engine_that_fails_is_not_used_and_says_why(monkeypatch):
    net = small_net()

    def broken(*args, **kwargs):
        raise RuntimeError("no such operator")

    monkeypatch.setattr(engines, "build_engine", broken)
    choice = choose_runner(net, torch.randn(2, 3, 64, 64), torch.device("cpu"), engines=["torch", "openvino"])
    assert isinstance(choice.runner, TorchRunner)
    assert "no such operator" in choice.errors["openvino"]
    assert "openvino" in choice.summary()


def test_hidden_engines_leave_torch(monkeypatch):
    net = small_net()
    monkeypatch.setattr(engines, "available_engines", lambda: ["torch"])
    choice = choose_runner(net, torch.randn(2, 3, 64, 64), torch.device("cpu"))
    assert isinstance(choice.runner, TorchRunner) and choice.errors == {}
    monkeypatch.setenv(engines.ENGINE_ENV, "torch")
    monkeypatch.setattr(engines, "available_engines", lambda: ["torch", "onnxruntime", "openvino"])
    assert isinstance(choose_runner(net, torch.randn(2, 3, 64, 64), torch.device("cpu")).runner, TorchRunner)


def test_not_on_a_cpu_torch_keeps_the_module(monkeypatch):
    net = small_net()
    monkeypatch.setattr(engines, "available_engines", lambda: ["torch", "onnxruntime"])
    choice = choose_runner(net, torch.randn(2, 3, 64, 64), torch.device("meta"))
    assert isinstance(choice.runner, TorchRunner) and not choice.rates


@pytest.mark.parametrize("name", ["onnxruntime", "openvino"])
def test_a_real_engine_matches_torch_at_two_sizes(name, tmp_path):
    """An export with dynamic batch and spatial axes serves other sizes than the one it was traced at, and
    the engine no longer needs the exported file once built (the export's folder is removed)."""
    import shutil

    pytest.importorskip(name)
    net = small_net()
    (tmp_path / "export").mkdir()
    runner = engines.build_engine(name, net, torch.randn(2, 3, 64, 64), 1, str(tmp_path / "export"))
    shutil.rmtree(tmp_path / "export")
    for size, batch in ((64, 2), (96, 5), (120, 3)):
        x = torch.randn(batch, 3, size, size)
        with torch.no_grad():
            reference = net(x)
        assert relative_error(reference, runner(x)) <= engines.MAX_RELATIVE_ERROR
    runner.set_threads(1)  # rebuilt with another thread count: still right
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert relative_error(net(x), runner(x)) <= engines.MAX_RELATIVE_ERROR


def test_the_solver_notices_a_wrong_engine_and_computes_with_torch(monkeypatch):
    """The warm-up checks each engine's output: a deliberately wrong one is refused, torch runs, and the
    run's predictions are sane."""
    from autodl_core import warmup
    from autodl_core.arrays import ArrayDataset, ArrayMetadata
    from autodl_core.config import PipelineConfig
    from autodl_core.solver import Solver

    monkeypatch.setattr(warmup, "_ENGINE_CACHE", {})
    monkeypatch.setattr(engines, "available_engines", lambda: ["torch", "onnxruntime"])
    monkeypatch.setattr(engines, "build_engine", lambda name, module, *a, **k: FastWrongRunner(module))
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (120, 16, 16, 3), dtype=np.uint8)
    y = np.eye(3, dtype=np.float32)[np.arange(120) % 3]
    x[:, :, :, 0] = (y.argmax(1) * 100)[:, None, None]
    train = ArrayDataset(x[:100], y[:100])
    solver = Solver(ArrayMetadata(train, "t"), PipelineConfig(anytime_steps=False), device="cpu")
    net = solver.ctx.net
    assert isinstance(net.trunk_engine.runner, TorchRunner) and isinstance(net.top_engine.runner, TorchRunner)
    assert "differs from torch" in net.trunk_engine.errors["onnxruntime"]
    solver.train(train, 30)
    probs = solver.test(ArrayDataset(x[100:], y[100:]), 30)
    assert probs.shape == (20, 3) and np.isfinite(probs).all()


def test_engine_choice_summary_lists_rates_best_first():
    choice = EngineChoice(TorchRunner(torch.nn.Identity(), "cpu"), rates={"torch": 10.0, "openvino": 30.0},
                          errors={"onnxruntime": "ImportError"})
    assert choice.summary().index("openvino") < choice.summary().index("torch 10")


def test_openvino_names_its_arithmetic(tmp_path):
    """`tools speed` reckons a bf16 engine's share against the bf16 peak: the plugin's precision property
    (printed as "<Type: 'bfloat16'>") reads back as one of the short names."""
    ov = pytest.importorskip("openvino")
    runner = engines.build_engine("openvino", small_net(), torch.randn(2, 3, 32, 32), 1, str(tmp_path))
    hint = str(ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT")).lower()
    expected = "bf16" if "bfloat16" in hint else "f16" if "float16" in hint else "fp32"
    assert runner.precision == expected


def test_choosing_an_engine_leaves_no_export_behind(monkeypatch, tmp_path):
    """The ONNX export is removed once the engines are built (each run left ~19 MB per backbone part in the
    temporary folder); the chosen engine runs on."""
    import tempfile

    made = []

    def mkdtemp(prefix=""):
        made.append(tmp_path / f"{prefix}{len(made)}")
        made[-1].mkdir()
        return str(made[-1])

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    names = [n for n in engines.available_engines() if n != "torch"]
    if not names:
        pytest.skip("no inference engine imports here")
    net = small_net()
    choice = choose_runner(net, torch.randn(2, 3, 64, 64), torch.device("cpu"), engines=["torch"] + names)
    assert made and not any(path.exists() for path in made)
    assert set(names) <= set(choice.rates), choice.errors
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert relative_error(net(x), choice.runner(x)) <= engines.MAX_RELATIVE_ERROR
