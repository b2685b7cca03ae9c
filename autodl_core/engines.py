"""Frozen forward passes through the fastest inference engine this machine offers, chosen by measurement.

On a 2-core CPU the solver is compute-bound, and most of its compute is frozen passes: the probe's
features, the trunk activations the top is fine-tuned on, test features. Dedicated CPU engines run
the same network several times faster than torch eager (MobileNetV2 at 224 px on an AVX-512/bf16
EPYC: torch bf16 91 img/s, ONNX Runtime 236, OpenVINO 311). So, in `Model.__init__` (which the kit
does not time), each frozen module (the trunk and the frozen top) is exported once to ONNX with
dynamic batch and spatial axes (no re-export when the resolution grows or images vary in size),
loaded into every engine that imports, checked against torch fp32 on the same input, timed, and
the fastest kept. Any error or mismatch drops that engine, with a log line saying why; where none
imports (a GPU machine, a platform without the wheels) the torch path runs exactly as before.

A runner maps a float32 NCHW tensor to the module's float32 output; the caller keeps its own
batching, deadlines and storage.

`AUTODL_ENGINE` forces one engine ("torch", "onnxruntime", "openvino"; "auto", the default, measures).
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

log = logging.getLogger("autodl_core.engines")

ENGINE_ENV = "AUTODL_ENGINE"
ENGINES = ("torch", "onnxruntime", "openvino")
# Relative error (norm of the difference over that of torch fp32's output) an engine may show on the
# check input (random images): bf16 arithmetic gives 0.02-0.06 on these networks, torch's own bf16
# autocast as much as OpenVINO's bf16 (MobileNetV2 at 64 px: 0.061 and 0.060); a wrong graph gives ~1.
MAX_RELATIVE_ERROR = 0.1
# An engine replaces torch only when measured at least this much faster (timings on a busy CPU are noisy).
MIN_SPEEDUP = 1.1


class TorchRunner:
    """The module in torch, eval mode, inference mode; bf16 autocast on CPUs where that was measured faster."""

    def __init__(self, module: nn.Module, device: torch.device, bf16: bool = False):
        from autodl_core.learner import inference_autocast  # one autocast rule for every frozen pass

        self.module, self.device, self.bf16 = module, torch.device(device), bool(bf16)
        self._autocast = lambda: inference_autocast(self.device, self.bf16)
        self.name = "torch-bf16" if self.bf16 and self.device.type == "cpu" else "torch"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.module.eval()
        with torch.inference_mode(), self._autocast():
            return self.module(x).float()

    def set_threads(self, threads: int) -> None:
        """torch's threads are process-wide (torch.set_num_threads), set by the caller."""


class OnnxRuntimeRunner:
    """ONNX Runtime's CPU provider (fp32, graph optimisations on)."""

    name = "onnxruntime"

    def __init__(self, onnx_path: str, threads: int):
        import onnxruntime as ort

        self._ort = ort
        # The model's bytes, not its path: a new thread count builds a new session later in the run, and the
        # export's folder is removed once the engines are chosen (one model per backbone part: up to ~20 MB).
        with open(onnx_path, "rb") as f:
            self._model = f.read()
        self.set_threads(threads)

    def set_threads(self, threads: int) -> None:
        options = self._ort.SessionOptions()
        options.intra_op_num_threads = max(1, int(threads))
        options.inter_op_num_threads = 1
        options.graph_optimization_level = self._ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        self.session = self._ort.InferenceSession(self._model, options, providers=["CPUExecutionProvider"])
        self.threads = max(1, int(threads))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {"x": _as_numpy(x)})[0]
        return torch.from_numpy(out)


class OpenVinoRunner:
    """OpenVINO's CPU plugin with the latency hint (one request uses every thread it is given; it runs
    bf16 where the CPU has bf16 units, fp32 elsewhere)."""

    name = "openvino"

    def __init__(self, onnx_path: str, threads: int):
        import openvino as ov

        self._ov = ov
        self.core = ov.Core()
        self.model = self.core.read_model(onnx_path)
        self.model.reshape({0: ov.PartialShape([-1, self.model.inputs[0].partial_shape[1], -1, -1])})
        self.set_threads(threads)

    def set_threads(self, threads: int) -> None:
        self.compiled = self.core.compile_model(self.model, "CPU", {
            "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": max(1, int(threads))})
        self.request = self.compiled.create_infer_request()
        self.threads = max(1, int(threads))

    @property
    def precision(self) -> str:
        """"bf16", "f16" or "fp32": the arithmetic the plugin chose (its property prints as
        "<Type: 'bfloat16'>", which a search for "bf16" misses)."""
        try:
            hint = str(self.compiled.get_property("INFERENCE_PRECISION_HINT")).lower()
        except Exception:  # pragma: no cover - older plugins
            return "?"
        for name, words in (("bf16", ("bf16", "bfloat16")), ("f16", ("f16", "float16")), ("fp32", ("f32", "float32"))):
            if any(word in hint for word in words):
                return name
        return hint

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.request.infer({0: _as_numpy(x)})
        # The request's output buffer is reused by the next call: copy it out.
        return torch.from_numpy(np.array(self.request.get_output_tensor(0).data, copy=True))


Runner = Callable[[torch.Tensor], torch.Tensor]


def _as_numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().to("cpu", torch.float32).contiguous().numpy()


def available_engines() -> list[str]:
    """The engines whose Python package imports here (torch always)."""
    found = ["torch"]
    for name, module in (("onnxruntime", "onnxruntime"), ("openvino", "openvino")):
        try:
            __import__(module)
            found.append(name)
        except Exception:  # ImportError, or a wheel whose native library fails to load
            continue
    return found


def export_onnx(module: nn.Module, example: torch.Tensor, path: str) -> str:
    """`module` (eval mode) as ONNX with dynamic batch, height and width (one export serves every
    resolution and batch size the run will use)."""
    module.eval()
    example = example.detach().float().clone().contiguous()  # a plain tensor (inference-mode ones cannot be traced)
    dims = {0: "batch", 2: "height", 3: "width"}
    out_dims = {0: "batch"}
    with torch.no_grad():
        out = module(example)
    if out.dim() == 4:
        out_dims = {0: "batch", 2: "out_height", 3: "out_width"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation notice
        torch.onnx.export(module, (example,), path, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": dims, "y": out_dims}, opset_version=17, dynamo=False)
    return path


def relative_error(reference: torch.Tensor, other: torch.Tensor) -> float:
    reference, other = reference.float(), other.float()
    if reference.shape != other.shape:
        return float("inf")
    norm = float(torch.linalg.vector_norm(reference))
    return float(torch.linalg.vector_norm(reference - other)) / max(norm, 1e-12)


def images_per_s(runner: Runner, x: torch.Tensor, repeats: int = 2) -> float:
    """Steady-state images/s of `runner` on `x` (after an untimed call at the same shape: the first call at
    a shape is slow, and OpenVINO prepares its kernels per input shape)."""
    runner(x)
    started = time.monotonic()  # the solver's clock (a virtual one under `tools replay`)
    for _ in range(repeats):
        runner(x)
    return repeats * len(x) / max(1e-9, time.monotonic() - started)


@dataclass
class EngineChoice:
    """What was chosen for one frozen module, and what every engine measured (images/s or why not)."""
    runner: Runner
    rates: dict = field(default_factory=dict)  # engine name -> images/s on the check input
    errors: dict = field(default_factory=dict)  # engine name -> why it was not used

    @property
    def name(self) -> str:
        return getattr(self.runner, "name", "torch")

    def summary(self) -> str:
        parts = [f"{k} {v:.0f} img/s" for k, v in sorted(self.rates.items(), key=lambda kv: -kv[1])]
        parts += [f"{k}: {v}" for k, v in self.errors.items()]
        return f"{self.name} ({'; '.join(parts)})"


def build_engine(name: str, module: nn.Module, example: torch.Tensor, threads: int, workdir: str) -> Runner:
    """One engine's runner for `module` (exported once into `workdir`)."""
    if name not in ("onnxruntime", "openvino"):
        raise ValueError(f"unknown engine {name!r}: one of {', '.join(ENGINES)}")
    path = os.path.join(workdir, "module.onnx")
    if not os.path.exists(path):
        export_onnx(module, example, path)
    return OnnxRuntimeRunner(path, threads) if name == "onnxruntime" else OpenVinoRunner(path, threads)


def choose_runner(module: nn.Module, example: torch.Tensor, device: torch.device, bf16: bool = False,
                  threads: int | None = None, engines: list[str] | None = None, label: str = "module",
                  timing_input: torch.Tensor | None = None) -> EngineChoice:
    """The fastest runner for frozen passes of `module` among torch and the engines that import here.

    Each engine's output on `example` is checked against torch fp32 (relative error <= MAX_RELATIVE_ERROR);
    the rates are measured on `timing_input` (default: `example`). Not on a GPU: torch keeps it.
    """
    device = torch.device(device)
    torch_runner = TorchRunner(module, device, bf16)
    choice = EngineChoice(torch_runner)
    forced = os.environ.get(ENGINE_ENV, "auto").strip().lower() or "auto"
    if device.type != "cpu":
        return choice
    if forced not in ("auto",) + ENGINES:
        log.warning("%s=%s is not an engine (%s): measuring all", ENGINE_ENV, forced, ", ".join(ENGINES))
        forced = "auto"
    threads = threads or torch.get_num_threads()
    names = engines if engines is not None else available_engines()
    if forced != "auto":
        names = [forced] if forced in names or forced == "torch" else []
        if forced != "torch" and not names:
            choice.errors[forced] = "forced but not importable"
    example = example.detach().float().clone()
    timing = (timing_input if timing_input is not None else example).detach().float().clone()
    # Checked at two sizes: an export that froze a size-dependent step (e.g. "same" padding) into
    # constants is right only at the size it was traced at.
    checks = [example] + ([timing[:4]] if timing.shape[2:] != example.shape[2:] else [])
    with torch.inference_mode():
        references = [module.eval()(x.float()).float() for x in checks]
    if forced in ("auto", "torch"):
        choice.rates[torch_runner.name] = images_per_s(torch_runner, timing)
    # The export lives only while the engines load it: each run used to leave ~19 MB per backbone part in
    # the temporary folder (1,950 folders, 37 GB, on the machine that ran the benchmarks).
    workdir = tempfile.mkdtemp(prefix="autodl-engine-")
    best_rate = choice.rates.get(torch_runner.name, 0.0)
    try:
        for name in names:
            if name == "torch":
                continue
            try:
                runner = build_engine(name, module, example, threads, workdir)
                error = max(relative_error(ref, runner(x)) for ref, x in zip(references, checks))
                if not error <= MAX_RELATIVE_ERROR:
                    choice.errors[name] = f"output differs from torch (relative error {error:.3g})"
                    continue
                rate = images_per_s(runner, timing)
            except Exception as exc:  # an engine that cannot take this module: torch keeps it
                choice.errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
                continue
            choice.rates[name] = rate
            if forced == name or rate > MIN_SPEEDUP * best_rate:
                choice.runner, best_rate = runner, rate
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    log.info("frozen %s on %s", label, choice.summary())
    return choice
